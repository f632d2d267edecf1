"""famtune hook implementations for InternLM2 / InternLM2.5 chat (family ``internlm2``).

Thin dispatch only; torch and transformers are imported inside the modules the hooks call.
Original checkpoints always load natively (as ``LlamaForCausalLM``), even when the user allows
remote code: the published remote code was written for transformers 4.x and breaks on newer
releases, while the native model gives the same logits.
"""
from __future__ import annotations

import json
import os
from typing import Any

import famtune

from famtune_internlm2.convert import ARCHITECTURE, FAMILY, MARKER_KEY, MODEL_TYPE  # torch-free module

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _is_original(config: dict[str, Any]) -> bool:
    if config.get("model_type") != MODEL_TYPE:
        return False
    # InternLM2 reward models share the model_type but not the causal-LM head.
    archs = list(config.get("architectures") or [])
    auto = list((config.get("auto_map") or {}).values())
    return not archs or ARCHITECTURE in archs or any(str(a).endswith("." + ARCHITECTURE) for a in auto)


@famtune.hookimpl
def famtune_families() -> list[str]:
    return [FAMILY]


@famtune.hookimpl
def famtune_claim_checkpoint(config: dict[str, Any], path: str) -> str | None:
    if config.get(MARKER_KEY) is not None:
        return FAMILY if config.get(MARKER_KEY) == FAMILY else None
    return FAMILY if _is_original(config) else None


@famtune.hookimpl
def famtune_conversation_template(family: str):
    from famtune_internlm2 import template

    return template.conversation_template()


@famtune.hookimpl
def famtune_chat_template(family: str) -> str:
    from famtune_internlm2 import template

    return template.CHAT_TEMPLATE


@famtune.hookimpl
def famtune_masking_policies(family: str) -> list[str]:
    from famtune_internlm2 import template

    return template.masking_policies()


@famtune.hookimpl
def famtune_encode_conversation(family: str, tokenizer: Any, messages: list[dict[str, str]], masking: str,
                                add_generation_prompt: bool):
    from famtune_internlm2 import template

    return template.encode_conversation(tokenizer, messages, masking, add_generation_prompt)


@famtune.hookimpl
def famtune_lora_target_modules(family: str, model: Any, mode: str) -> list[str]:
    if mode == "default":
        # The native names of wqkv, wo, w1, w2 and w3; never the head.
        return list(DEFAULT_TARGETS)
    if mode != "all-linear":
        raise ValueError(f"unknown LoRA target mode {mode!r}; expected default or all-linear")
    import torch

    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    found: list[str] = []
    for name, module in model.named_modules():
        # bitsandbytes' Linear4bit subclasses nn.Linear, so QLoRA bases are covered too.
        if isinstance(module, torch.nn.Linear) and module is not head:
            suffix = name.rsplit(".", 1)[-1]
            if suffix not in head_names and suffix not in found:
                found.append(suffix)
    return found


@famtune.hookimpl
def famtune_generation_defaults(family: str, tokenizer: Any):
    from famtune.types import GenerationDefaults

    stop_ids: list[int] = []
    for token in (tokenizer.eos_token, "<|im_end|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in stop_ids:
            stop_ids.append(tid)
    # The remote chat() samples with these values and stops on eos or <|im_end|>.
    return GenerationDefaults(stop_ids=stop_ids, sampling={"do_sample": True, "temperature": 0.8, "top_p": 0.8})


@famtune.hookimpl
def famtune_load_tokenizer(family: str, path: str, trust_remote_code: bool):
    from famtune_internlm2 import tokenizer

    if tokenizer.is_original_tokenizer_dir(path):
        return tokenizer.load_tokenizer(path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None  # a tokenizer famtune saved (merge): AutoTokenizer reads it natively
    raise FileNotFoundError(
        f"{path}: no InternLM2 tokenizer files (tokenizer.model and tokenizer_config.json); "
        "copy them from the original checkpoint into this directory"
    )


@famtune.hookimpl
def famtune_load_model(family: str, path: str, load_kwargs: dict[str, Any]):
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if not _is_original(config):
        return None
    from transformers import AutoModelForCausalLM

    from famtune_internlm2 import files

    native_dir = files.native_cache_dir(path)
    return AutoModelForCausalLM.from_pretrained(str(native_dir), **load_kwargs)


@famtune.hookimpl
def famtune_write_original_layout(family: str, native_dir: str, out_dir: str, original_config: dict[str, Any]):
    from famtune_internlm2 import files

    files.write_original_layout(native_dir, out_dir, original_config)
    return True


@famtune.hookimpl
def famtune_tiny_checkpoint(family: str, out_dir: str, corpus: list[str]):
    from famtune_internlm2 import tiny

    return tiny.write_tiny_checkpoint(out_dir, corpus)


@famtune.hookimpl
def famtune_supports_packing(family: str) -> bool:
    # InternLM2 loads as native Llama: restarting position ids drive both RoPE and the
    # per-sample block-diagonal mask.
    return True


@famtune.hookimpl
def famtune_recipe_dirs() -> list[str]:
    # Built-in recipes and their small data sets ship as package data beside this module.
    return [os.path.join(os.path.dirname(__file__), "recipes")]
