"""famtune hook implementations for the Qwen families.

Families: ``qwen1`` (Qwen-7B-Chat, original remote-code layout mapped onto Qwen2), ``qwen2``
(Qwen1.5 and Qwen2, which share one chat template), ``qwen2.5`` and ``qwen3``.
"""
from __future__ import annotations

import json
import os
from typing import Any

import famtune

FAMILIES = ["qwen1", "qwen2", "qwen2.5", "qwen3"]
# Qwen2.5's default system prompt is the one reliable marker that tells it from Qwen1.5/Qwen2,
# which share the model_type "qwen2".
QWEN25_MARKER = "You are Qwen, created by Alibaba Cloud"


def _chat_template_text(path: str) -> str:
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            tpl = json.load(f).get("chat_template") or ""
    except (OSError, ValueError):
        tpl = ""
    jinja = os.path.join(path, "chat_template.jinja")
    if not tpl and os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            tpl = f.read()
    return tpl if isinstance(tpl, str) else json.dumps(tpl)


@famtune.hookimpl
def famtune_families() -> list[str]:
    return list(FAMILIES)


@famtune.hookimpl
def famtune_claim_checkpoint(config: dict[str, Any], path: str) -> str | None:
    marked = config.get("famtune_family")
    if marked is not None:
        return marked if marked in FAMILIES else None
    model_type = config.get("model_type")
    if model_type == "qwen":
        from famtune_qwen import qwen1_convert

        return "qwen1" if qwen1_convert.is_original(config) else None
    if model_type == "qwen3":
        return "qwen3"
    if model_type == "qwen2":
        return "qwen2.5" if QWEN25_MARKER in _chat_template_text(path) else "qwen2"
    return None


def _qwen1_template():
    from famtune_qwen import qwen1_template

    return qwen1_template


@famtune.hookimpl
def famtune_conversation_template(family: str):
    if family == "qwen1":
        return _qwen1_template().CONVERSATION
    from famtune_qwen import template

    return template.conversation(family)


@famtune.hookimpl
def famtune_chat_template(family: str) -> str:
    if family == "qwen1":
        return _qwen1_template().CHAT_TEMPLATE
    from famtune_qwen import template

    return template.chat_template(family)


@famtune.hookimpl
def famtune_masking_policies(family: str) -> list[str]:
    if family == "qwen1":
        return list(_qwen1_template().POLICIES)
    from famtune_qwen import template

    return list(template.POLICIES)


@famtune.hookimpl
def famtune_encode_conversation(family, tokenizer, messages, masking, add_generation_prompt):
    if family == "qwen1":
        return _qwen1_template().encode(tokenizer, messages, masking, add_generation_prompt)
    from famtune_qwen import template

    return template.encode(family, tokenizer, messages, masking, add_generation_prompt)


@famtune.hookimpl
def famtune_lora_target_modules(family: str, model: Any, mode: str) -> list[str]:
    from famtune_qwen import template

    if mode == "all-linear":
        # Every linear layer of the decoder; the same set as the default for this architecture.
        return list(template.TARGETS_DEFAULT)
    return list(_qwen1_template().TARGETS_DEFAULT if family == "qwen1" else template.TARGETS_DEFAULT)


@famtune.hookimpl
def famtune_generation_defaults(family: str, tokenizer: Any):
    if family == "qwen1":
        return _qwen1_template().generation_defaults(tokenizer)
    from famtune_qwen import template

    return template.generation_defaults(family, tokenizer)


@famtune.hookimpl
def famtune_load_tokenizer(family: str, path: str, trust_remote_code: bool):
    if family == "qwen1" and os.path.exists(os.path.join(path, "qwen.tiktoken")) and not trust_remote_code:
        from famtune_qwen import qwen1_tokenizer

        return qwen1_tokenizer.load_tokenizer(path)
    return None


@famtune.hookimpl
def famtune_load_model(family: str, path: str, load_kwargs: dict[str, Any]):
    if family != "qwen1" or load_kwargs.get("trust_remote_code"):
        return None
    from famtune_qwen import qwen1_convert

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if not qwen1_convert.is_original(config):
        return None
    return qwen1_convert.load_model(path, load_kwargs)


@famtune.hookimpl
def famtune_write_original_layout(family: str, native_dir: str, out_dir: str, original_config: dict[str, Any]):
    if family != "qwen1":
        return None
    from famtune_qwen import qwen1_convert

    return qwen1_convert.write_original_layout(native_dir, out_dir, original_config)


@famtune.hookimpl
def famtune_tiny_checkpoint(family: str, out_dir: str, corpus: list[str]):
    if family == "qwen1":
        return None
    from famtune_qwen import tiny

    return tiny.write_tiny_checkpoint(family, out_dir, corpus)


@famtune.hookimpl
def famtune_supports_packing(family: str) -> bool:
    # Every Qwen family loads as native Qwen2/Qwen3, whose mask builder turns restarting position
    # ids into a per-sample block-diagonal mask and whose RoPE takes the same position ids.
    return True


@famtune.hookimpl
def famtune_recipe_dirs() -> list[str]:
    # Built-in recipes and their small data sets ship as package data beside this module.
    return [os.path.join(os.path.dirname(__file__), "recipes")]
