"""A tiny random-weight Llama-3 Instruct checkpoint (native layout, small local tokenizer)."""
from __future__ import annotations

from famtune_llama3 import template

SPECIALS = [template.BOS, template.END_OF_TEXT, template.START_HEADER, template.END_HEADER, template.EOT]


def write_tiny_checkpoint(out_dir: str, corpus: list[str], seed: int = 0) -> bool:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from famtune.tiny import train_tokenizer

    # Like Meta's tokenizer: BOS is <|begin_of_text|>, the chat end is <|eot_id|>, no pad token.
    tok = train_tokenizer(corpus, SPECIALS, vocab_size=1200, bos_token=template.BOS, eos_token=template.EOT)
    tok.chat_template = template.LLAMA3.jinja()
    tok.save_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=False,
        # A wide init gives the frozen head confident logits, so a short LoRA run learns visibly.
        initializer_range=0.25,
        bos_token_id=tok.convert_tokens_to_ids(template.BOS),
        eos_token_id=[tok.convert_tokens_to_ids(template.EOT), tok.convert_tokens_to_ids(template.END_OF_TEXT)],
        # The tiny vocabulary is not Llama-3's, so the claim needs this marker to recognise it.
        famtune_family="llama3",  # famtune.family.MARKER_KEY
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out_dir)
    return True
