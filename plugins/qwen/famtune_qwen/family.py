"""The Qwen families: ``qwen1`` (Qwen-7B-Chat, original remote-code layout mapped onto Qwen2),
``qwen2`` (Qwen1.5 and Qwen2, which share one chat template), ``qwen2.5`` and ``qwen3``.

Every Qwen family loads as native Qwen2/Qwen3, whose mask builder turns restarting position ids
into a per-sample block-diagonal mask and whose RoPE takes the same position ids: all pack.
"""

from __future__ import annotations

import os
from typing import Any

from famtune.family import ModelFamily, chat_template_of
from famtune_qwen import template

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen2.5's default system prompt is the one reliable marker that tells it from Qwen1.5/Qwen2,
# which share the model_type "qwen2".
QWEN25_MARKER = "You are Qwen, created by Alibaba Cloud"
# Sampling defaults from each version's generation_config.json.
CHATML_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


class QwenChatML(ModelFamily):
    """Qwen1.5/2, Qwen2.5 and Qwen3: native transformers checkpoints."""

    lora_targets = TARGETS
    supports_packing = True

    def __init__(self, name: str, chat_format, sampling: dict[str, Any]) -> None:
        self.name = name
        self.chat_format = chat_format
        self.sampling = sampling

    def claims(self, config: dict[str, Any], path: str) -> bool:
        model_type = config.get("model_type")
        if model_type == "qwen3":
            return self.name == "qwen3"
        if model_type == "qwen2":
            return self.name == ("qwen2.5" if QWEN25_MARKER in chat_template_of(path) else "qwen2")
        return False

    def tiny_checkpoint(self, out_dir: str, corpus: list[str]) -> bool:
        from famtune_qwen import tiny

        return tiny.write_tiny_checkpoint(self.name, out_dir, corpus)


class Qwen1(ModelFamily):
    """Qwen-7B-Chat: the original remote-code layout, run as a cached native Qwen2 copy."""

    name = "qwen1"
    chat_format = template.QWEN1
    masking_policies = template.QWEN1_POLICIES
    lora_targets = TARGETS
    # Qwen-7B-Chat's generation_config.json (top_k 0 turns top-k filtering off); temperature is
    # unset there, so the transformers default 1.0 applied.
    sampling = {"do_sample": True, "temperature": 1.0, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1}
    supports_packing = True

    def claims(self, config: dict[str, Any], path: str) -> bool:
        from famtune_qwen import convert

        return convert.is_original(config)

    def load_tokenizer(self, path: str, trust_remote_code: bool) -> Any:
        if os.path.exists(os.path.join(path, "qwen.tiktoken")) and not trust_remote_code:
            from famtune_qwen import tokenizer

            return tokenizer.load_tokenizer(path)
        return None

    def load_model(self, path: str, load_kwargs: dict[str, Any]) -> Any:
        from famtune_qwen import convert

        if load_kwargs.get("trust_remote_code") or not convert.is_original(
            convert.read_json(os.path.join(path, "config.json"))
        ):
            return None
        return convert.load_model(path, load_kwargs)

    def write_original_layout(self, native_dir: str, out_dir: str, original_config: dict[str, Any]) -> bool:
        from famtune_qwen import convert

        return convert.write_original_layout(native_dir, out_dir, original_config)


def families() -> list[ModelFamily]:
    return [
        Qwen1(),
        QwenChatML("qwen2", template.QWEN2, dict(CHATML_SAMPLING)),
        QwenChatML("qwen2.5", template.QWEN25, dict(CHATML_SAMPLING)),
        # Qwen3's recommended non-thinking settings (famtune trains and chats with thinking off).
        QwenChatML("qwen3", template.QWEN3, {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}),
    ]
