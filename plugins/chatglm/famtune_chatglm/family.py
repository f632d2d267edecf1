"""ChatGLM3-6B (``chatglm3``) and GLM-4-9B-chat (``glm4``) as famtune model families.

Both publish ``model_type: "chatglm"`` with the same remote code and weight names; they differ in
the tokenizer (SentencePiece vs tiktoken), the special-token strings and the chat template. The
plugin never runs the remote code: checkpoints are mapped onto transformers' native
``GlmForCausalLM`` (a cached copy, carrying famtune's family marker) and the tokenizers are
rebuilt from the original vocabulary files.
"""

from __future__ import annotations

import json
import os
from typing import Any

from famtune.family import ModelFamily
from famtune_chatglm.template import FORMATS, SPECS

ORIGINAL_MODEL_TYPE = "chatglm"
#: GlmForCausalLM names of what the official recipes adapt (query_key_value, dense,
#: dense_h_to_4h, dense_4h_to_h); the head (lm_head, originally output_layer) never is.
NATIVE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
#: The same set under the remote-code names, for a model loaded with trust_remote_code.
ORIGINAL_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


class ChatGLM(ModelFamily):
    # ChatGLM3 and GLM-4 load as native Glm: restarting position ids drive both its partial
    # RoPE and the per-sample block-diagonal mask.
    supports_packing = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.chat_format = FORMATS[name]
        self.masking_policies = tuple(FORMATS[name].masking_policies)
        self.sampling = SPECS[name].sampling

    def claims(self, config: dict[str, Any], path: str) -> bool:
        return is_original_layout(config) and family_of_original(config, path) == self.name

    def lora_target_modules(self, model: Any, mode: str) -> list[str]:
        if mode == "default":
            native = any(n.endswith(".gate_up_proj") for n, _ in model.named_modules())
            return list(NATIVE_TARGETS if native else ORIGINAL_TARGETS)
        return super().lora_target_modules(model, mode)

    def load_tokenizer(self, path: str, trust_remote_code: bool) -> Any:
        # The rebuilt tokenizer is used even with trust_remote_code: the remote ChatGLM tokenizers
        # break on transformers >= 4.45 (_pad() got an unexpected keyword argument 'padding_side').
        from famtune_chatglm import tokenizer

        return tokenizer.load_tokenizer(self.name, path, self.chat_format.jinja())

    def load_model(self, path: str, load_kwargs: dict[str, Any]) -> Any:
        from famtune.convert import read_json
        from famtune_chatglm import convert

        config = read_json(os.path.join(path, "config.json"))
        if not is_original_layout(config):
            return None
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            str(convert.native_cache_dir(path, self.name, config)), **load_kwargs
        )

    def write_original_layout(self, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool | None:
        if not is_original_layout(original_config):
            return None  # trained on a native checkpoint: there is no other layout to go back to
        from famtune_chatglm import convert

        convert.write_original(native_dir, out_dir, original_config)
        return True

    def tiny_checkpoint(self, out_dir: str, corpus: list[str]) -> bool:
        from famtune_chatglm import tiny

        return tiny.write_tiny_checkpoint(self.name, out_dir, corpus)


def is_original_layout(config: dict[str, Any]) -> bool:
    return config.get("model_type") == ORIGINAL_MODEL_TYPE


# The keys that only the ChatGLM2/3/GLM-4 generation of the remote code has; ChatGLM-6B (v1)
# shares model_type "chatglm" but is a different architecture (2D positions, no padded vocab).
_GENERATION_KEYS = ("padded_vocab_size", "ffn_hidden_size", "kv_channels")
_GLM4_VOCAB = 151552
_GLM4_EOS = 151329


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
