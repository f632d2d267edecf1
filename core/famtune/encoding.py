"""Token ids plus labels for one conversation, and a builder that plugins use to make them.

A plugin's ``famtune_encode_conversation`` appends the pieces of its chat format in order,
each marked as prompt or as an assistant turn, and asks the builder for labels under a masking
policy. Pieces are tokenized each on its own (during data preparation several in one batched call,
with the same ids), so the position of every label is known by construction: nothing is
re-tokenized or re-aligned afterwards.
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
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


class _Piece:
    """One piece of a conversation. A text piece added while a ``TokenCache`` is active holds its
    text until the builder tokenizes all pending pieces in one batch (on ``build`` or when any
    pending piece's ``ids`` is read)."""

    __slots__ = ("_ids", "text", "split", "turn", "_owner")

    def __init__(self, ids: list[int] | None, turn: int | None, text: str = "", split: bool = False, owner=None):
        self._ids, self.turn, self.text, self.split, self._owner = ids, turn, text, split, owner

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            self._owner._resolve()
        assert self._ids is not None
        return self._ids


@dataclass
class ConversationBuilder:
    """Collects the pieces of one rendered conversation.

    ``prompt_text``/``prompt_ids`` add unsupervised pieces; ``assistant_text``/``assistant_ids``
    add pieces of assistant turn ``turn`` (its content and its end-of-turn token).
    ``split_special_tokens`` controls whether text that spells a control token (``<|im_end|>``)
    stays plain text, for tokenizers whose original chat code does that.

    While a ``TokenCache`` for the tokenizer is active (data preparation), text pieces are
    tokenized together, one batch per conversation, each text on its own: the ids are those of
    tokenizing the pieces one by one.
    """

    tokenizer: Any
    split_special_tokens: bool = False
    pieces: list[_Piece] = field(default_factory=list)
    _pending: list[_Piece] = field(default_factory=list, repr=False)

    def _cache(self) -> TokenCache | None:
        cache = _ACTIVE_CACHE
        return cache if cache is not None and cache.tokenizer is self.tokenizer else None

    def tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        cache = self._cache()
        if cache is not None:
            return list(cache.get(text, self.split_special_tokens))
        return tokenize_piece(self.tokenizer, text, self.split_special_tokens)

    def token_id(self, token: str) -> int:
        cache = self._cache()
        if cache is not None:
            known = cache.token_ids.get(token)
            if known is not None:
                return known
        # convert_tokens_to_ids maps an unknown token to unk, so check the way back too.
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or self.tokenizer.convert_ids_to_tokens(tid) != token:
            raise ValueError(f"the tokenizer has no token {token!r}; it is not this family's tokenizer")
        if cache is not None:
            cache.token_ids[token] = tid
        return tid

    def _text_piece(self, text: str, turn: int | None) -> None:
        if not text:
            self.pieces.append(_Piece([], turn))
        elif self._cache() is None:
            self.pieces.append(_Piece(tokenize_piece(self.tokenizer, text, self.split_special_tokens), turn))
        else:
            piece = _Piece(None, turn, text, self.split_special_tokens, self)
            self.pieces.append(piece)
            self._pending.append(piece)

    def _resolve(self) -> None:
        """Tokenize every pending text piece, one batch per ``split_special_tokens`` setting."""
        pending, self._pending = self._pending, []
        cache = self._cache()
        for split in {p.split for p in pending}:
            group = [p for p in pending if p.split == split]
            if cache is None:
                found = [tokenize_piece(self.tokenizer, p.text, split) for p in group]
            else:
                found = cache.get_many([p.text for p in group], split)
            for p, ids in zip(group, found):
                p._ids = list(ids)

    def prompt_text(self, text: str) -> None:
        self._text_piece(text, None)

    def prompt_ids(self, ids: list[int]) -> None:
        self.pieces.append(_Piece(list(ids), None))

    def assistant_text(self, text: str, turn: int) -> None:
        self._text_piece(text, turn)

    def assistant_ids(self, ids: list[int], turn: int) -> None:
        self.pieces.append(_Piece(list(ids), turn))

    def build(self, masking: str) -> EncodedConversation:
        """Labels under a generic policy: ``all_assistant`` supervises every assistant turn,
        ``last_turn`` only the final one, ``train_on_prompt`` every token."""
        if masking not in GENERIC_POLICIES:
            raise ValueError(f"unknown masking policy {masking!r}; expected one of {', '.join(GENERIC_POLICIES)}")
        if self._pending:
            self._resolve()
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
        self.token_ids: dict[str, int] = {}  # control tokens' ids, checked once (ConversationBuilder.token_id)
        self._backend = _rust_backend(tokenizer)

    def get(self, text: str, split: bool) -> list[int]:
        return self.get_many([text], split)[0]

    def get_many(self, texts: list[str], split: bool) -> list[list[int]]:
        """``get`` for several texts, the misses tokenized in one call of the Rust tokenizer."""
        found = [self.ids.get((split, t)) for t in texts]
        missing = [i for i, ids in enumerate(found) if ids is None]
        if missing:
            fresh = self._encode_many([texts[i] for i in missing], split)
            if len(self.ids) + len(missing) > self.max_entries:
                self.ids.clear()
            for i, ids in zip(missing, fresh):
                found[i] = self.ids[(split, texts[i])] = ids
        return found  # type: ignore[return-value]

    def _encode_many(self, texts: list[str], split: bool) -> list[list[int]]:
        backend = self._backend
        if backend is None:
            return [tokenize_piece(self.tokenizer, t, split) for t in texts]
        before = backend.encode_special_tokens
        backend.encode_special_tokens = split
        try:
            # encode_batch_fast skips the character offsets, which famtune never reads.
            batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
            out = [e.ids for e in batch(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before
        for text, ids in zip(texts, out):
            if self.checks <= 0:
                break
            self.checks -= 1
            if ids != tokenize_piece(self.tokenizer, text, split):
                self._backend = None
                return [tokenize_piece(self.tokenizer, t, split) for t in texts]
        return out


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
