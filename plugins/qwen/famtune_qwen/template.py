"""The Qwen chat formats, each written once.

Qwen1.5, Qwen2, Qwen2.5 and Qwen3 render ChatML: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per
message, no BOS. They differ in the default system prompt (Qwen1.5/2 "You are a helpful
assistant.", Qwen2.5 the "You are Qwen, created by Alibaba Cloud..." text, Qwen3 none) and in
Qwen3's think block: with thinking off, the final assistant turn starts with an empty
``<think>\n\n</think>\n\n``, which belongs to the prompt (the model is handed it at inference).
These are ``famtune.chatformat.ChatFormat`` definitions; famtune derives their encoder, Jinja
template and FastChat conversation.

Qwen-7B-Chat (Qwen1) is ChatML as its ``make_context`` (what ``model.chat`` calls) builds it: a
system block is always present (a missing system message means "You are a helpful assistant.",
an empty one an empty block); content is tokenized apart from the role line (``content_apart``),
and message text is encoded with ``allowed_special=set()`` (``control_tokens_in_content=False``):
text spelling ``<|im_end|>`` stays plain text, so a data row cannot forge a turn boundary. Its
Jinja template gives make_context's ids unless a message starts with a line break or spells a
control token (``ChatFormat.text_views_exact``). Its masking policies: the generic three,
plus ``qwen1_official``, the labels of Qwen's own ``finetune.py``: besides assistant content it
trains ``<|im_start|>``, ``<|im_end|>`` and the newline after it in *every* turn, masking only role
names and prompt text.
"""

from __future__ import annotations

from famtune.chatformat import IM_END, IM_START, ChatFormat, FormatTokens, chatml
from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError

ENDOFTEXT = "<|endoftext|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"


# <|im_end|> ends a chat turn; <|endoftext|> ends a document (what base models emit).
STOP_TOKENS = (IM_END, ENDOFTEXT)


def _chatml(family: str, default_system: str | None, final_assistant_prefix: str | None = None) -> ChatFormat:
    return chatml(
        f"famtune-{family}",
        extra_special_tokens=(ENDOFTEXT,),
        default_system=default_system,
        final_assistant_prefix=final_assistant_prefix,
        stop_tokens=STOP_TOKENS,
    )


QWEN2 = _chatml("qwen2", "You are a helpful assistant.")
QWEN25 = _chatml("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
QWEN3 = _chatml("qwen3", None, final_assistant_prefix=IM_START + "assistant\n" + EMPTY_THINK)


# -- Qwen1 ------------------------------------------------------------------------------------------
QWEN1_SYSTEM = "You are a helpful assistant."
OFFICIAL_POLICY = "qwen1_official"


def check_qwen1(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    """make_context's rules: one optional system message first, then user and assistant alternating."""
    if not messages:
        raise FamtuneError("the conversation has no messages; give at least one user message")
    expected = "user"
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise FamtuneError(
                f"message {i + 1} is {repr(m)[:120]}; expected {{'role': 'system'|'user'|'assistant', 'content': <text>}}"
            )
        if role == "system":
            if i != 0:
                raise FamtuneError(f"message {i + 1} is a system message; only the first message may be one")
            continue
        if role != expected:
            raise FamtuneError(
                f"message {i + 1} has role {role!r} where {expected!r} was expected; "
                "Qwen1 conversations alternate user and assistant turns, starting with user"
            )
        expected = "assistant" if role == "user" else "user"
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise FamtuneError(
            f"the conversation ends with a {messages[-1]['role']!r} message; a generation prompt needs a final user message"
        )


def official_labels(tokens: FormatTokens) -> list[int]:
    """The labels of Qwen's own finetune.py: ``<|im_start|>``, ``<|im_end|>`` and the newline after
    it in every turn, plus assistant content; role names and prompt text are masked."""
    start = tokens.token_id(IM_START)
    labels = []
    for tid, (role, part) in zip(tokens.input_ids, tokens.parts):
        keep = role in ("system", "user", "assistant") and (
            part in ("suffix", "trailer")
            or (part == "prefix" and tid == start)
            or (role, part) == ("assistant", "content")
        )
        labels.append(tid if keep else IGNORE_INDEX)
    return labels


QWEN1 = chatml(
    "famtune-qwen1",
    extra_special_tokens=(ENDOFTEXT,),
    default_system=QWEN1_SYSTEM,
    content_apart=True,
    control_tokens_in_content=False,
    # <|endoftext|> is Qwen1's eos (config and generation_config); <|im_end|> ends a chat turn.
    stop_tokens=(ENDOFTEXT, IM_END),
    fastchat_stop_ids=(151643, 151645),
    policies={OFFICIAL_POLICY: official_labels},
    validate=check_qwen1,
)
QWEN1_POLICIES = QWEN1.masking_policies
