"""Llama-3 Instruct (Meta-Llama-3-8B-Instruct, -70B-Instruct) as a famtune model family.

Llama-3 ships in the native transformers layout (``LlamaForCausalLM``), so the family needs no
converter: famtune loads the weights and the tokenizer itself, and there is no other layout to
write back.
"""
from __future__ import annotations

from typing import Any

from famtune.family import ModelFamily, chat_template_of
from famtune_llama3.template import LLAMA3

VOCAB_SIZE = 128256
# Llama-3.1 and later add a dated system preamble to every conversation: a different family.
NEWER_TEMPLATE_MARKER = "Cutting Knowledge Date"


class Llama3(ModelFamily):
    name = "llama3"
    chat_format = LLAMA3
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Meta-Llama-3-8B-Instruct's generation_config.json.
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    # Native Llama builds a per-sample block-diagonal mask from restarting position ids, and its
    # RoPE takes the same ids; `famtune plugins check llama3` verifies it on the tiny model.
    supports_packing = True

    def claims(self, config: dict[str, Any], path: str) -> bool:
        # Plain "llama" is shared by many families; only Llama-3's vocabulary and header tokens mark it.
        if config.get("model_type") != "llama" or config.get("vocab_size") != VOCAB_SIZE:
            return False
        tpl = chat_template_of(path)
        return "<|start_header_id|>" in tpl and NEWER_TEMPLATE_MARKER not in tpl

    def tiny_checkpoint(self, out_dir: str, corpus: list[str]) -> bool:
        from famtune_llama3 import tiny

        return tiny.write_tiny_checkpoint(out_dir, corpus)

