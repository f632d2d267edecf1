"""famtune hook implementations for Baichuan2-7B-Chat and Baichuan2-13B-Chat.

Both families share the chat format and tokenizer; they differ in position encoding (7B RoPE,
loaded as ``LlamaForCausalLM``; 13B ALiBi, loaded as famtune's own model in ``modeling_alibi``).
"""
from __future__ import annotations

import os
from typing import Any

import famtune
from famtune_baichuan2.convert import ALIBI_MODEL_TYPE, FAMILIES, FAMILY_13B, MARKER_KEY, is_original, original_variant


@famtune.hookimpl
def famtune_families() -> list[str]:
    return list(FAMILIES)


@famtune.hookimpl
def famtune_claim_checkpoint(config: dict[str, Any], path: str) -> str | None:
    marked = config.get(MARKER_KEY)
    if marked is not None:
        return marked if marked in FAMILIES else None
    if config.get("model_type") == ALIBI_MODEL_TYPE:
        return FAMILY_13B
    return original_variant(config) if is_original(config) else None


@famtune.hookimpl
def famtune_conversation_template(family: str):
    from famtune_baichuan2 import template

    return template.conversation()


@famtune.hookimpl
def famtune_chat_template(family: str) -> str:
    from famtune_baichuan2 import template

    return template.CHAT_TEMPLATE


@famtune.hookimpl
def famtune_masking_policies(family: str) -> list[str]:
    from famtune_baichuan2 import template

    return list(template.POLICIES)


@famtune.hookimpl
def famtune_encode_conversation(family, tokenizer, messages, masking, add_generation_prompt):
    from famtune_baichuan2 import template

    return template.encode(tokenizer, messages, masking, add_generation_prompt)


@famtune.hookimpl
def famtune_lora_target_modules(family: str, model: Any, mode: str) -> list[str]:
    if mode == "all-linear":
        from famtune_baichuan2 import loader

        return loader.linear_module_names(model)
    from famtune_baichuan2 import template

    return list(template.TARGETS_DEFAULT)


@famtune.hookimpl
def famtune_generation_defaults(family: str, tokenizer: Any):
    from famtune_baichuan2 import template

    return template.generation_defaults(tokenizer)


@famtune.hookimpl
def famtune_load_tokenizer(family: str, path: str, trust_remote_code: bool):
    if trust_remote_code:
        return None  # the user asked for the checkpoint's own tokenizer code
    from famtune_baichuan2 import tokenizer

    return tokenizer.load_tokenizer(path)


@famtune.hookimpl
def famtune_load_model(family: str, path: str, load_kwargs: dict[str, Any]):
    from famtune_baichuan2 import loader

    return loader.load_model(path, load_kwargs)


@famtune.hookimpl
def famtune_write_original_layout(family: str, native_dir: str, out_dir: str, original_config: dict[str, Any]):
    from famtune_baichuan2 import loader

    return loader.write_original_layout(native_dir, out_dir, original_config)


@famtune.hookimpl
def famtune_tiny_checkpoint(family: str, out_dir: str, corpus: list[str]):
    from famtune_baichuan2 import tiny

    return tiny.write_tiny_checkpoint(family, out_dir, corpus)


@famtune.hookimpl
def famtune_supports_packing(family: str) -> bool:
    # Baichuan2-7B loads as native Llama and honours restarting position ids. Baichuan2-13B's
    # ALiBi model builds its bias from absolute offsets and ignores position ids, so packed
    # samples would attend to each other.
    return family == "baichuan2-7b"


@famtune.hookimpl
def famtune_recipe_dirs() -> list[str]:
    # Built-in recipes and their small data sets ship as package data beside this module.
    return [os.path.join(os.path.dirname(__file__), "recipes")]
