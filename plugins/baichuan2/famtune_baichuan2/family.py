"""Baichuan2-7B-Chat and Baichuan2-13B-Chat as famtune model families.

Both share the chat format and tokenizer; they differ in position encoding (7B RoPE, loaded as
``LlamaForCausalLM``; 13B ALiBi, loaded as famtune's own model in ``modeling_alibi``). Original
checkpoints are converted once into a cached native copy (``famtune.convert.native_copy``), which
also keeps the un-normalised heads for writing the original layout back.
"""

from __future__ import annotations

import os
from typing import Any

from famtune.family import ModelFamily
from famtune_baichuan2 import template
from famtune_baichuan2.convert import ALIBI_MODEL_TYPE, FAMILY_7B, FAMILY_13B, is_original, original_variant


def register_alibi_model() -> None:
    """Makes ``AutoModelForCausalLM`` know famtune's ALiBi model (registered at its import)."""
    from famtune_baichuan2 import modeling_alibi  # noqa: F401


class Baichuan2(ModelFamily):
    chat_format = template.BAICHUAN2
    masking_policies = tuple(template.POLICIES)
    lora_targets = tuple(template.TARGETS_DEFAULT)
    sampling = template.SAMPLING

    def __init__(self, name: str) -> None:
        self.name = name
        # 7B loads as native Llama and honours restarting position ids. 13B's ALiBi model builds
        # its bias from absolute offsets and ignores position ids: packed samples would mix.
        self.supports_packing = name == FAMILY_7B

    def claims(self, config: dict[str, Any], path: str) -> bool:
        if config.get("model_type") == ALIBI_MODEL_TYPE:
            return self.name == FAMILY_13B
        return is_original(config) and original_variant(config) == self.name

    def load_tokenizer(self, path: str, trust_remote_code: bool) -> Any:
        if trust_remote_code:
            return None  # the user asked for the checkpoint's own tokenizer code
        from famtune_baichuan2 import tokenizer

        return tokenizer.load_tokenizer(path)

    def load_model(self, path: str, load_kwargs: dict[str, Any]) -> Any:
        from famtune_baichuan2 import convert

        config = convert.read_json(os.path.join(path, "config.json"))
        if not is_original(config):
            if config.get("model_type") == ALIBI_MODEL_TYPE:
                register_alibi_model()
            return None
        if load_kwargs.get("trust_remote_code"):
            return None  # the user asked for the checkpoint's own code
        target = convert.native_dir(path, config)
        if original_variant(config) == FAMILY_13B:
            register_alibi_model()
        from transformers import AutoModelForCausalLM

        kwargs = {k: v for k, v in load_kwargs.items() if k != "trust_remote_code"}
        return AutoModelForCausalLM.from_pretrained(target, **kwargs)

    def write_original_layout(self, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool:
        from famtune_baichuan2 import convert

        return convert.write_original_layout(native_dir, out_dir, original_config)

    def tiny_checkpoint(self, out_dir: str, corpus: list[str]) -> bool:
        from famtune_baichuan2 import tiny

        return tiny.write_tiny_checkpoint(self.name, out_dir, corpus)
