"""Generation defaults and LoRA targets of the ChatGLM families."""
from __future__ import annotations

from typing import Any

from famtune.types import GenerationDefaults

from famtune_chatglm.families import SPECS

#: GlmForCausalLM names of what the official recipes adapt (query_key_value, dense,
#: dense_h_to_4h, dense_4h_to_h); the head (lm_head, originally output_layer) never is.
NATIVE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
#: The same set under the remote-code names, for a model loaded with trust_remote_code.
ORIGINAL_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def generation_defaults(family: str, tokenizer: Any) -> GenerationDefaults:
    spec = SPECS[family]
    stop_ids = []
    for token in spec.stop_tokens:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
            stop_ids.append(tid)
    if not stop_ids:
        raise ValueError(f"the tokenizer knows none of {', '.join(spec.stop_tokens)}; it is not a {family} tokenizer")
    return GenerationDefaults(stop_ids=stop_ids, sampling=dict(spec.sampling))


def lora_target_modules(model: Any, mode: str) -> list[str]:
    from torch import nn

    names = [n for n, _ in model.named_modules()]
    if mode == "default":
        native = any(n.endswith(".gate_up_proj") for n in names)
        return list(NATIVE_TARGETS if native else ORIGINAL_TARGETS)
    if mode != "all-linear":
        raise ValueError(f"unknown LoRA target mode {mode!r}; expected default or all-linear")
    head = model.get_output_embeddings()
    head_suffixes = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    # bitsandbytes' Linear4bit subclasses nn.Linear, so quantized layers are found too.
    suffixes = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return sorted(suffixes - head_suffixes)
