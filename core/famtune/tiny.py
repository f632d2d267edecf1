"""Small, locally trained tokenizers for the tiny random-weight checkpoints that plugins build
for ``famtune demo`` and for tests. Nothing here is downloaded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# GPT-style pre-tokenization: words with an optional leading non-letter, single digits,
# punctuation runs, newlines and other whitespace.
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_tokenizer(corpus: list[str], special_tokens: list[str], vocab_size: int = 2000, **special_roles: str) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus``.

    ``special_tokens`` get the first ids, in order. ``special_roles`` name them for transformers,
    e.g. ``eos_token="<|im_end|>", pad_token="<|endoftext|>"``. Deterministic for a given corpus.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special_roles)
    fast.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return fast


def train_sentencepiece(
    corpus: list[str], *, user_defined_symbols: list[str] | None = None, add_dummy_prefix: bool = False
) -> bytes:
    """A small byte-fallback SentencePiece BPE model (``tokenizer.model`` bytes) trained on ``corpus``,
    for the families whose original tokenizers are SentencePiece. Deterministic for a given corpus."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=1200,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=user_defined_symbols or [],
        byte_fallback=True,
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_random_original(native_config: dict[str, Any], write_original: Callable[[str], Any], seed: int = 0) -> None:
    """Build a random-weight model from a native config dict and hand it to the family's writer.

    ``native_config``'s ``model_type`` picks the transformers config class (famtune's family marker,
    ``architectures`` and dtype keys are left out); the model is seeded with ``seed``, saved in
    float32 into a temporary directory, and ``write_original(that_directory)`` writes the family's
    original layout from it. Families with a native layout save the model directly instead.
    """
    import tempfile

    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from famtune.family import MARKER_KEY

    skip = ("model_type", "architectures", MARKER_KEY, "dtype", "torch_dtype")
    config = CONFIG_MAPPING[native_config["model_type"]](**{k: v for k, v in native_config.items() if k not in skip})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        write_original(tmp)
