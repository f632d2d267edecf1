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
            ids = cache.lookup(text, self.split_special_tokens)
            if ids is not None:
                return list(ids)
            ids = self._tokenize(text)
            cache.store(text, self.split_special_tokens, ids)
            return ids
        return self._tokenize(text)

    def _tokenize(self, text: str) -> list[int]:
        if self.split_special_tokens:
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        return list(self.tokenizer.encode(text, add_special_tokens=False))

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
        turns = [p.turn for p in self.pieces if p.turn is not None]
        last = max(turns) if turns else None
        ids: list[int] = []
        labels: list[int] = []
        for p in self.pieces:
            ids.extend(p.ids)
            if masking == "train_on_prompt":
                supervised = True
            elif masking == "last_turn":
                supervised = p.turn is not None and p.turn == last
            else:
                supervised = p.turn is not None
            labels.extend(p.ids if supervised else [IGNORE_INDEX] * len(p.ids))
        return EncodedConversation(ids, labels)


class TokenCache:
    """An exact memo of text -> token ids for one tokenizer, filled by batched tokenizer calls.

    Encoding a conversation asks the tokenizer for a dozen small pieces (role headers, newlines,
    contents), and for short pieces the tokenizer's per-call overhead costs more than the
    tokenization itself. ``batched_tokenization`` encodes a block of conversations twice: a
    recording pass, in which every builder piece is noted and answered with no ids, then one
    batched tokenizer call for all distinct pieces, then the real pass, whose pieces are all
    answered from the memo. Tokenization is a pure function of the text, so the result is
    exactly that of tokenizing piece by piece; a piece the recording pass did not foresee is
    tokenized on the spot. Repeated pieces (headers, default system prompts, repeated samples)
    are tokenized once. The memo is emptied when it holds ``max_entries`` pieces.
    """

    def __init__(self, tokenizer: Any, max_entries: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.ids: dict[tuple[bool, str], list[int]] = {}
        self.pending: set[tuple[bool, str]] | None = None

    def lookup(self, text: str, split: bool) -> list[int] | None:
        key = (split, text)
        ids = self.ids.get(key)
        if ids is None and self.pending is not None:
            self.pending.add(key)
            return []
        return ids

    def store(self, text: str, split: bool, ids: list[int]) -> None:
        self.ids[(split, text)] = ids

    def record(self) -> None:
        """Start a recording pass."""
        if len(self.ids) >= self.max_entries:
            self.ids.clear()
        self.pending = set()

    def fill(self) -> None:
        """End the recording pass: tokenize every noted piece in one call per special-token mode."""
        pending, self.pending = self.pending or set(), None
        for split in (False, True):
            texts = [text for s, text in pending if s == split]
            if not texts:
                continue
            extra = {"split_special_tokens": True} if split else {}
            out = self.tokenizer(texts, add_special_tokens=False, **extra)["input_ids"]
            for text, ids in zip(texts, out):
                self.ids[(split, text)] = list(ids)


_ACTIVE_CACHE: TokenCache | None = None


class batched_tokenization:
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
        self.cache.pending = None
