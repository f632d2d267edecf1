"""Tiny random-weight Baichuan2 checkpoints for demos and tests, in the ORIGINAL layout.

Written as the released models are (``config.json`` with ``auto_map``, ``W_pack``, an
un-normalised NormHead, a SentencePiece ``tokenizer.model``), so a demo exercises the same
conversion path as a real checkpoint. The SentencePiece model is trained on the given corpus with
Baichuan2's settings: ``<unk>``/``<s>``/``</s>`` at 0/1/2, the turn markers as user-defined pieces,
byte fallback, no dummy prefix and no whitespace folding.
"""

from __future__ import annotations

import json
import os

from famtune.tiny import train_sentencepiece as train_sentencepiece_model
from famtune.tiny import write_random_original
from famtune_baichuan2 import convert, template, tokenizer

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def train_sentencepiece(corpus: list[str]) -> bytes:
    return train_sentencepiece_model(corpus, user_defined_symbols=[template.USER_TOKEN, template.ASSISTANT_TOKEN])


def original_config(family: str, vocab_size: int) -> dict:
    config = {
        "architectures": [convert.ORIGINAL_CLASS],
        "auto_map": {
            "AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM",
        },
        "model_type": convert.ORIGINAL_MODEL_TYPE,
        "tokenizer_class": "BaichuanTokenizer",
        "vocab_size": vocab_size,
        **SIZES,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_max_length": 4096,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if family == convert.FAMILY_7B:
        config["max_position_embeddings"] = 4096  # the 7B marker: RoPE
    return config


def write_tiny_checkpoint(family: str, out_dir: str, corpus: list[str], seed: int = 0) -> bool:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, tokenizer.MODEL_FILE), "wb") as f:
        f.write(train_sentencepiece(corpus))
    tok = tokenizer.load_tokenizer(out_dir)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "add_bos_token": False,
                "add_eos_token": False,
                "model_max_length": 4096,
                "tokenizer_class": "BaichuanTokenizer",
                **tokenizer.SPECIAL_TOKENS,
            },
            f,
            indent=2,
        )
    config = original_config(family, len(tok))
    native = convert.native_config(config)
    if native["model_type"] == convert.ALIBI_MODEL_TYPE:
        from famtune_baichuan2.family import register_alibi_model

        register_alibi_model()
    # The random head goes out as it is: as raw rows, which the model normalises at load.
    write_random_original(native, lambda tmp: convert.write_original(tmp, out_dir, config), seed)
    # Baichuan2's chat generation_config.json, with this tokenizer's marker ids.
    ids = {
        name: tok.convert_tokens_to_ids(token)
        for name, token in (("user_token_id", template.USER_TOKEN), ("assistant_token_id", template.ASSISTANT_TOKEN))
    }
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **ids, **template.SAMPLING}, f, indent=2)
    return True
