"""famtune hook implementations for ChatGLM3 and GLM-4; each dispatches to one module.

torch and transformers are imported inside the hooks only, so ``famtune --help`` stays fast.
"""
from __future__ import annotations

import os
from typing import Any

import famtune

from famtune_chatglm import families


@famtune.hookimpl
def famtune_families() -> list[str]:
    return list(families.FAMILIES)


@famtune.hookimpl
def famtune_claim_checkpoint(config: dict[str, Any], path: str) -> str | None:
    return families.claim(config, path)


@famtune.hookimpl
def famtune_conversation_template(family: str):
    from famtune_chatglm import template

    return template.conversation_template(family)


@famtune.hookimpl
def famtune_chat_template(family: str) -> str:
    from famtune_chatglm import template

    return template.chat_template(family)


@famtune.hookimpl
def famtune_masking_policies(family: str) -> list[str]:
    from famtune_chatglm import template

    return template.masking_policies(family)


@famtune.hookimpl
def famtune_encode_conversation(family: str, tokenizer: Any, messages: list[dict[str, str]], masking: str,
                                add_generation_prompt: bool):
    from famtune_chatglm import template

    return template.encode_conversation(family, tokenizer, messages, masking, add_generation_prompt)


@famtune.hookimpl
def famtune_lora_target_modules(family: str, model: Any, mode: str) -> list[str]:
    from famtune_chatglm import defaults

    return defaults.lora_target_modules(model, mode)


@famtune.hookimpl
def famtune_generation_defaults(family: str, tokenizer: Any):
    from famtune_chatglm import defaults

    return defaults.generation_defaults(family, tokenizer)


@famtune.hookimpl
def famtune_load_tokenizer(family: str, path: str, trust_remote_code: bool) -> Any:
    # The rebuilt tokenizer is used even with trust_remote_code: the remote ChatGLM tokenizers
    # break on transformers >= 4.45 (_pad() got an unexpected keyword argument 'padding_side').
    from famtune_chatglm import template, tokenizer

    return tokenizer.load_tokenizer(family, path, template.chat_template(family))


@famtune.hookimpl
def famtune_load_model(family: str, path: str, load_kwargs: dict[str, Any]) -> Any:
    from famtune.checkpoint import read_json

    config = read_json(os.path.join(path, "config.json"))
    if not families.is_original_layout(config):
        return None
    from transformers import AutoModelForCausalLM

    from famtune_chatglm import layout

    native_dir = layout.ensure_native(path, family, config)
    return AutoModelForCausalLM.from_pretrained(str(native_dir), **load_kwargs)


@famtune.hookimpl
def famtune_write_original_layout(family: str, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool | None:
    if not families.is_original_layout(original_config):
        return None  # trained on a native checkpoint: there is no other layout to go back to
    from famtune_chatglm import layout

    layout.write_original(native_dir, out_dir, original_config)
    return True


@famtune.hookimpl
def famtune_supports_packing(family: str) -> bool:
    # ChatGLM3 and GLM-4 load as native Glm: restarting position ids drive both its partial
    # RoPE and the per-sample block-diagonal mask.
    return True


@famtune.hookimpl
def famtune_tiny_checkpoint(family: str, out_dir: str, corpus: list[str]) -> bool:
    from famtune_chatglm import tiny

    return tiny.write_tiny_checkpoint(family, out_dir, corpus)


@famtune.hookimpl
def famtune_recipe_dirs() -> list[str]:
    # Built-in recipes and their small data sets ship as package data beside this module.
    return [os.path.join(os.path.dirname(__file__), "recipes")]
