"""Qwen1's tiktoken vocabulary (``qwen.tiktoken``) as a transformers fast tokenizer, no remote code.

The original ``QWenTokenizer`` is tiktoken with Qwen's pre-tokenizer regex and 208 control
tokens appended after the 151,643 ranks. tiktoken merges, inside each regex piece, the adjacent
pair whose concatenation has the lowest rank, and takes a piece that is itself in the vocabulary
whole. A byte-level BPE with one merge per multi-byte token, ordered by that token's rank, and
``ignore_merges`` does the same, so the ids come out identical. The merge that builds a token is
found by running the rank-ordered merging on its bytes with only lower ranks allowed: it stops
at the two parts the final merge joins.

Building the merges takes a second or two, so the result is kept as ``tokenizer.json`` under
``$FAMTUNE_CACHE``, keyed by the file's hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from famtune.cache import cache_dir
from famtune.errors import FamtuneError

VOCAB_FILE = "qwen.tiktoken"
# The original tokenization_qwen.py's PAT_STR.
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(205)]
SPECIAL_START_ID = 151643  # the original hard-codes this; the ranks must end right before it
BUILD_VERSION = 1


def read_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise FamtuneError(
                    f"{path}:{lineno}: not a '<base64 token> <rank>' line; is this Qwen1's qwen.tiktoken?"
                ) from None
    if sorted(ranks.values()) != list(range(SPECIAL_START_ID)):
        raise FamtuneError(
            f"{path}: ranks are not exactly 0..{SPECIAL_START_ID - 1} ({len(ranks)} tokens); "
            "famtune reads Qwen1's qwen.tiktoken only"
        )
    return ranks


def _merge_parts(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise FamtuneError(
            f"token rank {rank} cannot be built from lower-ranked tokens; the qwen.tiktoken file is corrupt"
        )
    return parts[0], parts[1]


def _byte_chars() -> dict[int, str]:
    # Byte-level BPE's printable stand-in for each byte (the GPT-2 table).
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_backend(ranks: dict[bytes, int]):
    """A ``tokenizers.Tokenizer`` giving the original ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    chars = _byte_chars()

    def enc(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    merges = [_merge_parts(tok, r, ranks) for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(tok) > 1]
    model = models.BPE(
        vocab={enc(t): r for t, r in ranks.items()},
        merges=[(enc(a), enc(b)) for a, b in merges],
        ignore_merges=True,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()  # QWenTokenizer.tokenize NFC-normalizes its input
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    if tok.token_to_id(ENDOFTEXT) != SPECIAL_START_ID:
        raise FamtuneError(f"{ENDOFTEXT} got id {tok.token_to_id(ENDOFTEXT)}, expected {SPECIAL_START_ID}")
    return tok


def _cache_dir() -> Path:
    return cache_dir()


def tokenizer_json(vocab_file: str | Path) -> Path:
    """The converted ``tokenizer.json`` for ``vocab_file``, built on first use."""
    digest = hashlib.sha256(f"qwen1-tokenizer-v{BUILD_VERSION}\n".encode() + Path(vocab_file).read_bytes()).hexdigest()
    out = _cache_dir() / "qwen1-tokenizer" / digest[:24] / "tokenizer.json"
    if out.exists():
        return out
    backend = build_backend(read_ranks(vocab_file))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent or interrupted build never leaves a truncated file.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=out.parent)
    os.close(fd)
    try:
        backend.save(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_tokenizer(path: str) -> Any:
    """The tokenizer of the Qwen1 checkpoint at ``path`` (its ``qwen.tiktoken``), as a fast tokenizer.

    ``tokenizer(text)`` parses text spelling a control token into that token, as the original
    ``tokenizer(text)`` does (its ``allowed_special="all"``); pass ``split_special_tokens=True`` for
    what ``model.chat`` does with message text (``allowed_special=set()``).
    """
    from transformers import PreTrainedTokenizerFast

    vocab = Path(path) / VOCAB_FILE
    if not vocab.exists():
        raise FamtuneError(f"{path}: no {VOCAB_FILE}; a Qwen1 checkpoint ships its tokenizer as {VOCAB_FILE}")
    max_len = 32768
    cfg = Path(path) / "tokenizer_config.json"
    if cfg.exists():
        try:
            max_len = int(json.loads(cfg.read_text(encoding="utf-8")).get("model_max_length", max_len))
        except (ValueError, TypeError):
            pass
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json(vocab)),
        # Qwen1 defines no bos/eos/pad; its config and generation_config use <|endoftext|> as eos, and
        # its finetune.py pads with it. No BOS: Qwen prepends nothing.
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
        additional_special_tokens=[IM_START, IM_END],
    )
