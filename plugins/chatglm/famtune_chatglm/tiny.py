"""Tiny random-weight ChatGLM3 / GLM-4 checkpoints for demos and tests, in the ORIGINAL layout.

Written as the released models are (``model_type: "chatglm"`` with ``auto_map``, fused
``query_key_value``, ``rotary_pos_emb.inv_freq``), so a demo goes through the same conversion and
tokenizer rebuild as a real checkpoint. The tokenizer is trained on the given corpus in the
family's own file format:

* ChatGLM3: a SentencePiece BPE ``tokenizer.model`` with ChatGLM3's settings (``<unk>``/``<s>``/
  ``</s>`` at 0/1/2, byte fallback, identity normalizer, dummy prefix, no whitespace folding);
  the command tokens follow the SentencePiece vocabulary, as in the original.
* GLM-4: a tiktoken ``tokenizer.model`` (``<base64 token> <rank>`` lines) from a byte-level BPE,
  whose merge order is its rank order; the special tokens follow the last rank.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from famtune.tiny import train_sentencepiece as train_sentencepiece_model
from famtune.tiny import write_random_original
from famtune_chatglm import convert
from famtune_chatglm.template import SPECS

SIZES = {
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "kv_channels": 16,
    "num_attention_heads": 4,
    "multi_query_group_num": 2,
    "num_layers": 2,
}
_AUTO = "modeling_chatglm.ChatGLMForConditionalGeneration"


def _train_sentencepiece(corpus: list[str]) -> bytes:
    # No newline may become a piece: the chat template relies on "\n" being a byte-fallback piece.
    return train_sentencepiece_model([t.replace("\n", " ") for t in corpus], add_dummy_prefix=True)


def _tiktoken_lines(corpus: list[str]) -> str:
    from famtune.tiny import train_tokenizer
    from famtune_chatglm.tokenizer_glm4 import byte_alphabet

    fast = train_tokenizer(corpus, [], vocab_size=1200)
    byte_of = {c: b for b, c in enumerate(byte_alphabet())}
    by_id = sorted(fast.backend_tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
    return "".join(
        f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}\n"
        for rank, (token, _) in enumerate(by_id)
    )


def original_config(family: str, n_tokens: int, eos_ids: list[int], pad_id: int) -> dict:
    return {
        "_name_or_path": "THUDM/glm-4-9b-chat" if family == "glm4" else "THUDM/chatglm3-6b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": _AUTO,
            "AutoModelForCausalLM": _AUTO,
            "AutoModelForSeq2SeqLM": _AUTO,
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        **SIZES,
        "layernorm_epsilon": 1e-5 if family == "chatglm3" else 1.5625e-07,
        "multi_query_attention": True,
        "original_rope": True,
        "post_layer_norm": True,
        "rmsnorm": True,
        # Not padded (the released vocabularies are): a random model samples every row, and ids
        # beyond the tokenizer's would not decode.
        "padded_vocab_size": n_tokens,
        "seq_length": 2048,
        "use_cache": True,
        **({"rope_ratio": 500} if family == "glm4" else {}),
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0],
        "pad_token_id": pad_id,
    }


def write_tiny_checkpoint(family: str, out_dir: str, corpus: list[str], seed: int = 0) -> bool:
    from famtune_chatglm import template, tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "chatglm3":
        (out / "tokenizer.model").write_bytes(_train_sentencepiece(corpus))
        tok_class = "ChatGLMTokenizer"
    else:
        (out / "tokenizer.model").write_text(_tiktoken_lines(corpus), encoding="utf-8")
        tok_class = "ChatGLM4Tokenizer"
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": tok_class,
                "remove_space": False,
                "do_lower_case": False,
                "auto_map": {"AutoTokenizer": [f"tokenization_chatglm.{tok_class}", None]},
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    tok = tokenizer.load_tokenizer(family, str(out), template.chat_template(family))
    spec = SPECS[family]
    stop_ids = [tok.convert_tokens_to_ids(t) for t in spec.stop_tokens]
    # As the released configs: ChatGLM3 names </s> alone (pad <unk>), GLM-4 all its stop ids.
    eos_ids = [tok.convert_tokens_to_ids(spec.eos)] if family == "chatglm3" else stop_ids
    pad_id = 0 if family == "chatglm3" else eos_ids[0]
    config = original_config(family, len(tok), eos_ids, pad_id)

    # A wide init lets the frozen head give confident logits, so a short LoRA run reaches a low loss.
    native = {**convert.native_config(config, family), "initializer_range": 0.25}
    write_random_original(native, lambda tmp: convert.write_original(tmp, out, config), seed)
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": stop_ids, "pad_token_id": pad_id, **spec.sampling}, indent=2), encoding="utf-8"
    )
    return True
