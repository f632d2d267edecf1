"""Tiny random-weight InternLM2 checkpoints for demos and tests, in the ORIGINAL layout.

Written as the released models are (``config.json`` with ``auto_map``, fused grouped ``wqkv``,
a SentencePiece ``tokenizer.model`` with ``tokenizer_config.json``), so a demo goes through the
same conversion and tokenizer rebuild as a real checkpoint. The SentencePiece model is trained on
the given corpus with InternLM2's settings: BPE, ``<unk>``/``<s>``/``</s>`` at 0/1/2, byte
fallback, identity normalizer, no dummy prefix, no whitespace folding. The chat control tokens
are user-defined pieces that ``tokenizer_config.json`` lists in ``added_tokens_decoder``, as the
released tokenizer does for its renamed ``[UNUSED_TOKEN_n]`` pieces.
"""

from __future__ import annotations

import json
import os

from famtune.convert import write_json
from famtune.tiny import train_sentencepiece as train_sentencepiece_model
from famtune.tiny import write_random_original
from famtune_internlm2 import convert, template

CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>"]
SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def train_sentencepiece(corpus: list[str]) -> bytes:
    return train_sentencepiece_model(corpus, user_defined_symbols=CONTROL_TOKENS)


def tokenizer_config(control_ids: dict[str, int]) -> dict:
    def entry(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    added = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>")}
    added.update({str(i): entry(t) for t, i in control_ids.items()})
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(control_ids),
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_internlm2.InternLM2Tokenizer",
                "tokenization_internlm2_fast.InternLM2TokenizerFast",
            ]
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": template.PUBLISHED_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "InternLM2Tokenizer",
    }


def original_config(vocab_size: int) -> dict:
    return {
        "architectures": [convert.ARCHITECTURE],
        "auto_map": dict(convert.AUTO_MAP),
        "model_type": convert.MODEL_TYPE,
        "vocab_size": vocab_size,
        **SIZES,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def write_tiny_checkpoint(out_dir: str, corpus: list[str], seed: int = 0) -> bool:
    from famtune_internlm2 import tokenizer

    os.makedirs(out_dir, exist_ok=True)
    spm_bytes = train_sentencepiece(corpus)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(spm_bytes)
    pieces = [p for p, _, _ in tokenizer.read_spm_model(os.path.join(out_dir, "tokenizer.model")).pieces]
    control_ids = {t: pieces.index(t) for t in CONTROL_TOKENS}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(control_ids))

    config = original_config(len(pieces))
    # A wide init lets the frozen head give confident logits, so a short LoRA run reaches a low loss.
    native = {**convert.to_native_config(config), "initializer_range": 0.25}
    write_random_original(native, lambda tmp: convert.write_original_layout(tmp, out_dir, config), seed)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, control_ids["<|im_end|>"]], "pad_token_id": 2}, f, indent=2)
    return True
