"""GLM-4's tokenizer rebuilt from its tiktoken ``tokenizer.model`` without remote code.

The original ``ChatGLM4Tokenizer`` reads ``<base64 token> <rank>`` lines into a tiktoken BPE with
the split pattern below and appends 14 special tokens after the last rank (``<|endoftext|>`` =
151329 ... ``<|end_of_video|>`` = 151342 for the released 151329-rank vocabulary). Ordinary text is
encoded with special strings disallowed-as-specials, i.e. as plain text. Tokens are exposed as
strings through the usual byte-to-unicode table so that transformers can handle them.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from typing import Any

from transformers.tokenization_python import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

from famtune_chatglm.tokenizer import split_on_control

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def read_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: expected '<base64 token> <rank>'; not a GLM-4 tokenizer.model"
                ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}; not a GLM-4 tokenizer.model")
    return ranks


def byte_alphabet() -> list[str]:
    """One printable character per byte value (printable Latin-1 bytes stand for themselves, the
    rest are shifted above U+0100), so byte tokens can be dict keys and survive JSON."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


class GLM4Tokenizer(PreTrainedTokenizer):
    """The GLM-4-9B-chat tokenizer: original ids, built only from ``tokenizer.model``."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        import tiktoken

        self.vocab_file = vocab_file
        ranks = read_ranks(vocab_file)
        n = len(ranks)
        self.special_ids = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name="famtune-glm4", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        alphabet = byte_alphabet()
        self._byte_of = {c: b for b, c in enumerate(alphabet)}
        self._tokens = [""] * n
        for token, rank in ranks.items():
            self._tokens[rank] = "".join(alphabet[b] for b in token)
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        specials = {i: AddedToken(t, special=True, normalized=False) for t, i in self.special_ids.items()}
        kwargs["added_tokens_decoder"] = {**kwargs.get("added_tokens_decoder", {}), **specials}
        kwargs.setdefault("eos_token", "<|endoftext|>")
        kwargs.setdefault("pad_token", "<|endoftext|>")
        kwargs.setdefault("extra_special_tokens", [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"])
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs["special_tokens_pattern"] = "prefix_suffix"
        self.prefix_tokens = [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]
        self.suffix_tokens: list[int] = []
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def get_vocab(self) -> dict[str, int]:
        return {**self._ids, **self._added_tokens_encoder}

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        split = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if split:
            return self._tokenize(text)
        tokens: list[str] = []
        for chunk, is_control in split_on_control(text, _CONTROL):
            tokens.extend([chunk] if is_control else self._tokenize(chunk))
        return tokens

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self._tokens[i] for i in self.encoding.encode_ordinary(text)]

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out = bytearray()
        for t in tokens:
            if t in self._added_tokens_encoder:
                out += t.encode("utf-8")
            else:
                out += bytes(self._byte_of[c] for c in t)
        return out.decode("utf-8", errors="replace")

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        # Checkpoints pad the embedding past the vocabulary (ChatGLM3: 65024 rows for 64798 tokens);
        # a barely trained model can emit such an id, which names no token and decodes to nothing.
        ids = [i for i in ids if i < len(self)]
        return self.convert_tokens_to_string(self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
