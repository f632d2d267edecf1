"""famtune hook implementations for Llama-3 Instruct (Meta-Llama-3-8B-Instruct, -70B-Instruct).

Llama-3 ships in the native transformers layout (``LlamaForCausalLM``), so the plugin needs no
converter: famtune loads the weights and the tokenizer itself (``famtune_load_model`` and
``famtune_load_tokenizer`` are left out), and there is no other layout to write back.
"""
from __future__ import annotations

import json
import os
from typing import Any

import famtune

FAMILY = "llama3"
MARKER_KEY = "famtune_family"  # written into the tiny checkpoint's config.json
VOCAB_SIZE = 128256
HEADER = "<|start_header_id|>"
# Llama-3.1 and later add a dated system preamble to every conversation: a different family.
LLAMA31_MARKER = "Cutting Knowledge Date"


def _chat_template_text(path: str) -> str:
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            tpl = json.load(f).get("chat_template") or ""
    except (OSError, ValueError):
        return ""
    return tpl if isinstance(tpl, str) else json.dumps(tpl)


@famtune.hookimpl
def famtune_families() -> list[str]:
    return [FAMILY]


@famtune.hookimpl
def famtune_claim_checkpoint(config: dict[str, Any], path: str) -> str | None:
    marked = config.get(MARKER_KEY)
    if marked is not None:
        return FAMILY if marked == FAMILY else None
    # Plain "llama" is shared by many families; only Llama-3's vocabulary and header tokens mark it.
    if config.get("model_type") != "llama" or config.get("vocab_size") != VOCAB_SIZE:
        return None
    tpl = _chat_template_text(path)
    return FAMILY if HEADER in tpl and LLAMA31_MARKER not in tpl else None


@famtune.hookimpl
def famtune_conversation_template(family: str):
    from famtune_llama3 import template

    return template.conversation()


@famtune.hookimpl
def famtune_chat_template(family: str) -> str:
    from famtune_llama3 import template

    return template.CHAT_TEMPLATE


@famtune.hookimpl
def famtune_masking_policies(family: str) -> list[str]:
    from famtune.encoding import GENERIC_POLICIES

    return list(GENERIC_POLICIES)


@famtune.hookimpl
def famtune_encode_conversation(family, tokenizer, messages, masking, add_generation_prompt):
    from famtune_llama3 import template

    return template.encode(tokenizer, messages, masking, add_generation_prompt)


@famtune.hookimpl
def famtune_lora_target_modules(family: str, model: Any, mode: str) -> list[str]:
    from famtune_llama3 import template

    return template.all_linear(model) if mode == "all-linear" else list(template.TARGETS_DEFAULT)


@famtune.hookimpl
def famtune_generation_defaults(family: str, tokenizer: Any):
    from famtune_llama3 import template

    return template.generation_defaults(tokenizer)


@famtune.hookimpl
def famtune_tiny_checkpoint(family: str, out_dir: str, corpus: list[str]) -> bool:
    from famtune_llama3 import tiny

    return tiny.write_tiny_checkpoint(out_dir, corpus)


@famtune.hookimpl
def famtune_supports_packing(family: str) -> bool:
    # Native Llama builds a per-sample block-diagonal mask from restarting position ids, and its
    # RoPE takes the same ids; `famtune plugins check llama3` verifies it on the tiny model.
    return True
