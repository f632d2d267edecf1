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
