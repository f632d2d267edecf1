"""InternLM2 / InternLM2.5 chat (family ``internlm2``) as a famtune model family.

Original checkpoints always load natively (as ``LlamaForCausalLM``), even when the user allows
remote code: the published remote code was written for transformers 4.x and breaks on newer
releases, while the native model gives the same logits.
"""

from __future__ import annotations

import os
from typing import Any

from famtune.family import ModelFamily
from famtune_internlm2.convert import ARCHITECTURE, FAMILY, MODEL_TYPE  # torch-free module
from famtune_internlm2.template import INTERNLM2


def is_original(config: dict[str, Any]) -> bool:
    if config.get("model_type") != MODEL_TYPE:
        return False
    # InternLM2 reward models share the model_type but not the causal-LM head.
    archs = list(config.get("architectures") or [])
    auto = list((config.get("auto_map") or {}).values())
    return not archs or ARCHITECTURE in archs or any(str(a).endswith("." + ARCHITECTURE) for a in auto)


class InternLM2(ModelFamily):
    name = FAMILY
    chat_format = INTERNLM2
    # The native names of wqkv, wo, w1, w2 and w3; never the head.
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # The remote chat() samples with these values.
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.8}
    # Loaded as native Llama: restarting position ids drive both RoPE and the per-sample mask.
    supports_packing = True

    def claims(self, config: dict[str, Any], path: str) -> bool:
        return is_original(config)

    def load_tokenizer(self, path: str, trust_remote_code: bool) -> Any:
        from famtune_internlm2 import tokenizer

        if tokenizer.is_original_tokenizer_dir(path):
            return tokenizer.load_tokenizer(path)
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return None  # a tokenizer famtune saved (merge): AutoTokenizer reads it natively
        raise FileNotFoundError(
            f"{path}: no InternLM2 tokenizer files (tokenizer.model and tokenizer_config.json); "
            "copy them from the original checkpoint into this directory"
        )

    def load_model(self, path: str, load_kwargs: dict[str, Any]) -> Any:
        from famtune.convert import read_json

        if not is_original(read_json(os.path.join(path, "config.json"))):
            return None
        from transformers import AutoModelForCausalLM

        from famtune_internlm2 import convert

        return AutoModelForCausalLM.from_pretrained(str(convert.native_cache_dir(path)), **load_kwargs)

    def write_original_layout(self, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool:
        from famtune_internlm2 import convert

        convert.write_original_layout(native_dir, out_dir, original_config)
        return True

    def tiny_checkpoint(self, out_dir: str, corpus: list[str]) -> bool:
        from famtune_internlm2 import tiny

        return tiny.write_tiny_checkpoint(out_dir, corpus)
