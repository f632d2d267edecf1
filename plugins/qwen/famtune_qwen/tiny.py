"""Tiny random-weight Qwen checkpoints (native layout, small local tokenizer) for demos and tests."""

from __future__ import annotations

from famtune_qwen import template

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_SPECIALS = ["<think>", "</think>"]


def write_tiny_checkpoint(family: str, out_dir: str, corpus: list[str], seed: int = 0) -> bool:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from famtune.tiny import train_tokenizer

    specials = SPECIALS + (QWEN3_SPECIALS if family == "qwen3" else [])
    tok = train_tokenizer(corpus, specials, vocab_size=1200, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = {"qwen2": template.QWEN2, "qwen2.5": template.QWEN25, "qwen3": template.QWEN3}[family].jinja()
    tok.save_pretrained(out_dir)
    model_type = "qwen3" if family == "qwen3" else "qwen2"
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        # A wide init lets the frozen head give confident logits, so a short LoRA run reaches a low loss.
        initializer_range=0.25,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return True
