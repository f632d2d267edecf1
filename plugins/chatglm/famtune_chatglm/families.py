"""What distinguishes ChatGLM3 from GLM-4, and which checkpoints this plugin claims.

Both families publish ``model_type: "chatglm"`` with the same remote code and weight names; they
differ in the tokenizer (SentencePiece vs tiktoken), the special-token strings and the chat
template. A native directory written by this plugin carries ``"famtune_family"`` in its
``config.json`` so that a converted or merged model is still claimed here, and no plain ``glm``
model is taken from anyone else.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

FAMILY_MARKER = "famtune_family"
ORIGINAL_MODEL_TYPE = "chatglm"
NATIVE_MODEL_TYPE = "glm"


@dataclass(frozen=True)
class FamilySpec:
    name: str
    #: the two tokens every sequence starts with (``get_prefix_tokens`` of the original tokenizer)
    prefix: tuple[str, str]
    eos: str
    #: token that ends the final assistant turn of a training sample (see template.py)
    final_end_of_turn: str
    stop_tokens: tuple[str, ...]
    sampling: dict[str, Any] = field(default_factory=dict)


SPECS: dict[str, FamilySpec] = {
    # chat()/stream_chat() of chatglm3-6b: eos_token_id=[eos, <|user|>, <|observation|>],
    # do_sample=True, top_p=0.8, temperature=0.8. The official finetune ends every sample with eos.
    "chatglm3": FamilySpec(
        name="chatglm3",
        prefix=("[gMASK]", "sop"),
        eos="</s>",
        final_end_of_turn="</s>",
        stop_tokens=("</s>", "<|user|>", "<|observation|>"),
        sampling={"do_sample": True, "temperature": 0.8, "top_p": 0.8},
    ),
    # glm-4-9b-chat generation_config.json: eos [151329, 151336, 151338], do_sample, 0.8 / 0.8.
    # The official GLM-4 finetune appends <|user|> ("EOS for chat") to every sample.
    "glm4": FamilySpec(
        name="glm4",
        prefix=("[gMASK]", "<sop>"),
        eos="<|endoftext|>",
        final_end_of_turn="<|user|>",
        stop_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
        sampling={"do_sample": True, "temperature": 0.8, "top_p": 0.8},
    ),
}

FAMILIES = tuple(SPECS)

# The keys that only the ChatGLM2/3/GLM-4 generation of the remote code has; ChatGLM-6B (v1)
# shares model_type "chatglm" but is a different architecture (2D positions, no padded vocab).
_GENERATION_KEYS = ("padded_vocab_size", "ffn_hidden_size", "kv_channels")
_GLM4_VOCAB = 151552
_GLM4_EOS = 151329


def is_original_layout(config: dict[str, Any]) -> bool:
    return config.get("model_type") == ORIGINAL_MODEL_TYPE


def _tokenizer_class(path: str) -> str | None:
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def family_of_original(config: dict[str, Any], path: str) -> str | None:
    """``chatglm3``, ``glm4`` or None for an original-layout config."""
    if not all(k in config for k in _GENERATION_KEYS):
        return None
    # ChatGLM2 has the same config keys but a different chat format and no role tokens.
    if "chatglm2" in str(config.get("_name_or_path", "")).lower():
        return None
    tok_class = _tokenizer_class(path)
    if tok_class == "ChatGLM4Tokenizer":
        return "glm4"
    if tok_class == "ChatGLMTokenizer":
        return "chatglm3"
    eos = config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    if config.get("padded_vocab_size") == _GLM4_VOCAB or _GLM4_EOS in eos_ids:
        return "glm4"
    return "chatglm3"


def claim(config: dict[str, Any], path: str) -> str | None:
    if is_original_layout(config):
        return family_of_original(config, path)
    if config.get("model_type") == NATIVE_MODEL_TYPE and config.get(FAMILY_MARKER) in SPECS:
        return config[FAMILY_MARKER]
    return None
