"""famtune's own defaults, written as an ordinary plugin whose hooks are ``trylast``.

Registered by the plugin manager before any entry point, so an installed plugin's answer to the
same hook comes first (a resolver for another hub, a masking policy of the same name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import famtune
from famtune.encoding import GENERIC_POLICIES, EncodedConversation, generic_labels
from famtune.family import DataFormat, MaskingPolicy

_DESCRIPTIONS = {
    "all_assistant": "every assistant turn and its end-of-turn token",
    "last_turn": "only the final assistant turn",
    "train_on_prompt": "every token, prompt included",
}


def _generic(name: str) -> Callable[[EncodedConversation], list[int]]:
    def label(enc: EncodedConversation) -> list[int]:
        return generic_labels(enc.input_ids, enc.turns or [None] * len(enc.input_ids), name)

    return label


@famtune.hookimpl(trylast=True)
def famtune_register_masking_policies(register: Callable[[Any], None]) -> None:
    for name in GENERIC_POLICIES:
        register(MaskingPolicy(name, _generic(name), _DESCRIPTIONS[name]))


@famtune.hookimpl(trylast=True)
def famtune_register_data_formats(register: Callable[[Any], None]) -> None:
    from famtune import data

    for name, desc in (
        ("conversation", "XTuner: [{input, output, system?}, ...]"),
        ("messages", "OpenAI: [{role, content}, ...]"),
        ("alpaca", "instruction, input?, output, history?, system?"),
        ("sharegpt", "[{from: human|gpt, value}, ...], system?"),
    ):
        register(DataFormat(name, data._FORMAT_KEYS[name], data._NORMALISERS[name], desc))


@famtune.hookimpl(trylast=True)
def famtune_resolve_model_source(spec: str) -> str | None:
    # The local directory, Hugging Face and ModelScope resolvers: they answer or raise a one-line error.
    from famtune.sources import resolve_source

    return resolve_source(spec)
