"""The Qwen chat formats, each written once.

Qwen1.5, Qwen2, Qwen2.5 and Qwen3 render ChatML: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per
message, no BOS. They differ in the default system prompt (Qwen1.5/2 "You are a helpful
assistant.", Qwen2.5 the "You are Qwen, created by Alibaba Cloud..." text, Qwen3 none) and in
Qwen3's think block: with thinking off, the final assistant turn starts with an empty
``<think>\n\n</think>\n\n``, which belongs to the prompt (the model is handed it at inference).
These are ``famtune.chatformat.ChatFormat`` definitions; famtune derives their encoder, Jinja
template and FastChat conversation.

Qwen-7B-Chat (Qwen1) is written by hand, as its ``make_context`` (what ``model.chat`` calls)
builds it: a system block is always present (a missing system message means "You are a helpful
assistant.", an empty one an empty block); role, newline and content are tokenized separately,
and message text is encoded with ``allowed_special=set()``: text spelling ``<|im_end|>`` stays
plain text, so a data row cannot forge a turn boundary. Its masking policies: the generic three,
plus ``qwen1_official``, the labels of Qwen's own ``finetune.py``: besides assistant content it
trains ``<|im_start|>``, ``<|im_end|>`` and the newline after it in *every* turn, masking only role
names and prompt text.
"""

from __future__ import annotations

from famtune.chatformat import ChatFormat
from famtune.encoding import GENERIC_POLICIES, IGNORE_INDEX, ConversationBuilder, EncodedConversation
from famtune.errors import FamtuneError

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"


def _chatml(family: str, default_system: str | None, final_assistant_prefix: str | None = None) -> ChatFormat:
    return ChatFormat(
        name=f"famtune-{family}",
        special_tokens=(IM_START, IM_END, ENDOFTEXT),
        system_prefix=IM_START + "system\n",
        system_suffix=IM_END + "\n",
        user_prefix=IM_START + "user\n",
        user_suffix=IM_END + "\n",
        assistant_prefix=IM_START + "assistant\n",
        assistant_suffix=IM_END,
        assistant_trailer="\n",
        default_system=default_system,
        final_assistant_prefix=final_assistant_prefix,
        # <|im_end|> ends a chat turn; <|endoftext|> ends a document (what base models emit).
        stop_tokens=(IM_END, ENDOFTEXT),
    )


QWEN2 = _chatml("qwen2", "You are a helpful assistant.")
QWEN25 = _chatml("qwen2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
QWEN3 = _chatml("qwen3", None, final_assistant_prefix=IM_START + "assistant\n" + EMPTY_THINK)


# -- Qwen1 ------------------------------------------------------------------------------------------
QWEN1_SYSTEM = "You are a helpful assistant."
OFFICIAL_POLICY = "qwen1_official"
QWEN1_POLICIES = [*GENERIC_POLICIES, OFFICIAL_POLICY]


QWEN1_CONVERSATION = dict(
    name="famtune-qwen1",
    system_template=IM_START + "system\n{system_message}",
    system_message=QWEN1_SYSTEM,
    roles=(IM_START + "user", IM_START + "assistant"),
    sep=IM_END,
    stop_str=IM_END,
    stop_token_ids=[151643, 151645],
)

# Renders the string make_context builds; equal ids as long as no message text starts with a
# line break (make_context tokenizes the newline after the role apart from the text) or spells a
# control token (the tokenizer parses those in a rendered string).
QWEN1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + QWEN1_SYSTEM + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}"
    "{%- for message in turns -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Parts of one turn: its <|im_start|>, "role\n", the text, <|im_end|>, the "\n" joining it to the next.
START, HEAD, TEXT, END, JOIN = "start", "head", "text", "end", "join"
GENERATION = "generation"  # the trailing assistant prefix of a generation prompt
# Parts qwen1_official supervises, by role (finetune.py's `target` lists).
_OFFICIAL = {
    "system": {START, END, JOIN},
    "user": {START, END, JOIN},
    "assistant": {START, TEXT, END, JOIN},
    GENERATION: set(),
}


def _check(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
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


def _parts(b: ConversationBuilder, messages: list[dict[str, str]], add_generation_prompt: bool):
    """(ids, role, part, assistant turn index or None) in order, as make_context concatenates them."""
    start, end = b.token_id(IM_START), b.token_id(IM_END)
    newline = b.tokenize("\n")
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN1_SYSTEM}, *messages]
    turn = 0
    out = []
    for m in messages:
        role = m["role"]
        idx = turn if role == "assistant" else None
        out += [
            ([start], role, START, idx),
            (b.tokenize(role) + newline, role, HEAD, idx),
            (b.tokenize(m["content"]), role, TEXT, idx),
            ([end], role, END, idx),
            (newline, role, JOIN, idx),
        ]
        turn += role == "assistant"
    if add_generation_prompt:
        out += [([start], GENERATION, START, None), (b.tokenize("assistant") + newline, GENERATION, HEAD, None)]
    return out


def encode_qwen1(
    tokenizer, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool
) -> EncodedConversation:
    """Qwen1 ids (``make_context``'s, plus ``<|im_end|>\\n`` after a final assistant turn) and labels."""
    if masking not in QWEN1_POLICIES:
        raise FamtuneError(f"unknown masking policy {masking!r} for Qwen1; expected one of {', '.join(QWEN1_POLICIES)}")
    _check(messages, add_generation_prompt)
    b = ConversationBuilder(tokenizer, split_special_tokens=True)
    parts = _parts(b, messages, add_generation_prompt)
    if masking == OFFICIAL_POLICY:
        ids: list[int] = []
        labels: list[int] = []
        for piece, role, part, _ in parts:
            ids += piece
            labels += piece if part in _OFFICIAL[role] else [IGNORE_INDEX] * len(piece)
        return EncodedConversation(ids, labels)
    for piece, _role, part, turn in parts:
        if turn is not None and part in (TEXT, END):
            b.assistant_ids(piece, turn)
        else:
            b.prompt_ids(piece)
    return b.build(masking)


class Qwen1Format:
    """Qwen1's hand-written format, with the same methods as a ``ChatFormat``."""

    name = "famtune-qwen1"
    encode = staticmethod(encode_qwen1)

    def jinja(self) -> str:
        return QWEN1_CHAT_TEMPLATE

    def fastchat_conversation(self):
        from fastchat.conversation import Conversation, SeparatorStyle

        fields = dict(QWEN1_CONVERSATION, sep_style=SeparatorStyle.CHATML, messages=[])
        return Conversation(**fields)

    def stop_ids(self, tokenizer) -> list[int]:
        # <|endoftext|> is Qwen1's eos (config and generation_config); <|im_end|> ends a chat turn.
        b = ConversationBuilder(tokenizer)
        return [b.token_id(ENDOFTEXT), b.token_id(IM_END)]


QWEN1 = Qwen1Format()
