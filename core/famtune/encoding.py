"""Token ids plus labels for one conversation, and a builder that plugins use to make them.

A plugin's ``famtune_encode_conversation`` appends the pieces of its chat format in order,
each marked as prompt or as an assistant turn, and asks the builder for labels under a masking
policy. Pieces are tokenized one by one, so the position of every label is known by
construction: nothing is re-tokenized or re-aligned afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100

#: Masking policies every plugin accepts. Plugins may add family variants after these.
GENERIC_POLICIES = ("all_assistant", "last_turn", "train_on_prompt")


@dataclass
class EncodedConversation:
    """Model-ready ids and their labels (``IGNORE_INDEX`` where not supervised)."""

    input_ids: list[int]
    labels: list[int]
    #: Per token, the assistant turn it belongs to (``None`` for prompt tokens), when the encoder
    #: built it with ``ConversationBuilder``; masking policies from other plugins label from it.
    turns: list[int | None] | None = None

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class _Piece:
    ids: list[int]
    turn: int | None  # assistant turn index, None for prompt pieces


@dataclass
class ConversationBuilder:
    """Collects the pieces of one rendered conversation.

    ``prompt_text``/``prompt_ids`` add unsupervised pieces; ``assistant_text``/``assistant_ids``
    add pieces of assistant turn ``turn`` (its content and its end-of-turn token).
    ``split_special_tokens`` controls whether text that spells a control token (``<|im_end|>``)
    stays plain text, for tokenizers whose original chat code does that.
    """

    tokenizer: Any
    split_special_tokens: bool = False
    pieces: list[_Piece] = field(default_factory=list)

    def tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        cache = _ACTIVE_CACHE
        if cache is not None and cache.tokenizer is self.tokenizer:
            return list(cache.get(text, self.split_special_tokens))
        return tokenize_piece(self.tokenizer, text, self.split_special_tokens)

    def token_id(self, token: str) -> int:
        # convert_tokens_to_ids maps an unknown token to unk, so check the way back too.
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or self.tokenizer.convert_ids_to_tokens(tid) != token:
            raise ValueError(f"the tokenizer has no token {token!r}; it is not this family's tokenizer")
        return tid

    def prompt_text(self, text: str) -> None:
        self.pieces.append(_Piece(self.tokenize(text), None))

    def prompt_ids(self, ids: list[int]) -> None:
        self.pieces.append(_Piece(list(ids), None))

    def assistant_text(self, text: str, turn: int) -> None:
        self.pieces.append(_Piece(self.tokenize(text), turn))

    def assistant_ids(self, ids: list[int], turn: int) -> None:
        self.pieces.append(_Piece(list(ids), turn))

    def build(self, masking: str) -> EncodedConversation:
        """Labels under a generic policy: ``all_assistant`` supervises every assistant turn,
        ``last_turn`` only the final one, ``train_on_prompt`` every token."""
        if masking not in GENERIC_POLICIES:
            raise ValueError(f"unknown masking policy {masking!r}; expected one of {', '.join(GENERIC_POLICIES)}")
        ids: list[int] = []
        turns: list[int | None] = []
        for p in self.pieces:
            ids.extend(p.ids)
            turns.extend([p.turn] * len(p.ids))
        return EncodedConversation(ids, generic_labels(ids, turns, masking), turns)


def generic_labels(ids: list[int], turns: list[int | None], masking: str) -> list[int]:
    """Labels under a generic policy from each token's assistant turn (``None``: prompt)."""
    if masking == "train_on_prompt":
        return list(ids)
    if masking == "last_turn":
        last = max((t for t in turns if t is not None), default=None)
        return [i if t is not None and t == last else IGNORE_INDEX for i, t in zip(ids, turns)]
    return [i if t is not None else IGNORE_INDEX for i, t in zip(ids, turns)]


class TokenCache:
    """An exact memo of text -> token ids for one tokenizer, used while preparing a data file.

    Encoding a conversation asks the tokenizer for a dozen small pieces (role headers, newlines,
    contents). Each distinct piece is tokenized once: headers, default system prompts and repeated
    samples come from the memo. A miss goes straight to the Rust tokenizer behind a transformers
    fast tokenizer, skipping the ~40 us of Python around each transformers call, with the settings
    transformers would use (no truncation or padding, special tokens parsed or not); the first
    ``checks`` misses are also tokenized through transformers and compared, and any difference
    turns the shortcut off. Other tokenizers are called through transformers. The ids are exactly
    those of tokenizing piece by piece. The memo is emptied when it holds ``max_entries`` pieces.
    """

    def __init__(self, tokenizer: Any, max_entries: int = 50_000, checks: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.checks = checks
        self.ids: dict[tuple[bool, str], list[int]] = {}
        self._backend = _rust_backend(tokenizer)

    def get(self, text: str, split: bool) -> list[int]:
        key = (split, text)
        ids = self.ids.get(key)
        if ids is None:
            ids = self._encode(text, split)
            if len(self.ids) >= self.max_entries:
                self.ids.clear()
            self.ids[key] = ids
        return ids

    def _encode(self, text: str, split: bool) -> list[int]:
        backend = self._backend
        if backend is None:
            return tokenize_piece(self.tokenizer, text, split)
        before = backend.encode_special_tokens
        backend.encode_special_tokens = split
        try:
            ids = backend.encode(text, add_special_tokens=False).ids
        finally:
            backend.encode_special_tokens = before
        if self.checks > 0:
            self.checks -= 1
            reference = tokenize_piece(self.tokenizer, text, split)
            if ids != reference:
                self._backend = None
                return reference
        return ids


def _rust_backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` of a transformers fast tokenizer, if it is safe to call directly."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not all(hasattr(backend, a) for a in ("encode", "encode_special_tokens", "truncation")):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None  # transformers would clear these per call; leave such tokenizers to it
    return backend


def tokenize_piece(tokenizer: Any, text: str, split_special_tokens: bool) -> list[int]:
    """One piece of text to ids through the transformers tokenizer, without added special tokens."""
    if split_special_tokens:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return list(tokenizer.encode(text, add_special_tokens=False))


_ACTIVE_CACHE: TokenCache | None = None


class memoised_tokenization:
    """Context in which every ``ConversationBuilder`` on ``cache.tokenizer`` uses ``cache``."""

    def __init__(self, cache: TokenCache) -> None:
        self.cache = cache

    def __enter__(self) -> TokenCache:
        global _ACTIVE_CACHE
        self.previous, _ACTIVE_CACHE = _ACTIVE_CACHE, self.cache
        return self.cache

    def __exit__(self, *exc) -> None:
        global _ACTIVE_CACHE
        _ACTIVE_CACHE = self.previous
