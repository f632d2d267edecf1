"""Qwen-7B-Chat's ChatML, as its ``make_context`` (what ``model.chat`` calls) builds it.

Every turn is ``<|im_start|>`` + ``role`` + ``\\n`` + ``content`` + ``<|im_end|>``, turns joined by
``\\n``, no BOS. Unlike later Qwen versions a system block is always present: a missing system
message means "You are a helpful assistant.", an empty one an empty block. ``make_context``
tokenizes role, newline and content separately, and encodes message text with
``allowed_special=set()``: text spelling ``<|im_end|>`` in a message stays plain text, so a data
row cannot forge a turn boundary. famtune does the same.

Masking policies: the generic three, plus ``qwen1_official``, the labels of Qwen's own
``finetune.py``: besides assistant content it trains ``<|im_start|>``, ``<|im_end|>`` and the
newline after it in *every* turn, masking only role names and prompt text.
"""
from __future__ import annotations

from fastchat.conversation import Conversation, SeparatorStyle

from famtune.encoding import GENERIC_POLICIES, IGNORE_INDEX, ConversationBuilder, EncodedConversation
from famtune.errors import FamtuneError
from famtune.types import GenerationDefaults

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
OFFICIAL_POLICY = "qwen1_official"
POLICIES = [*GENERIC_POLICIES, OFFICIAL_POLICY]
TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen-7B-Chat's generation_config.json (top_k 0 turns top-k filtering off); temperature is unset
# there, so the transformers default 1.0 applied.
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1}

CONVERSATION = Conversation(
    name="famtune-qwen1",
    system_template=IM_START + "system\n{system_message}",
    system_message=DEFAULT_SYSTEM,
    roles=(IM_START + "user", IM_START + "assistant"),
    sep_style=SeparatorStyle.CHATML,
    sep=IM_END,
    stop_str=IM_END,
    stop_token_ids=[151643, 151645],
)

# Renders the string make_context builds; equal ids as long as no message text starts with a
# line break (make_context tokenizes the newline after the role apart from the text) or spells a
# control token (the tokenizer parses those in a rendered string).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- set turns = messages -%}"
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
_OFFICIAL = {"system": {START, END, JOIN}, "user": {START, END, JOIN}, "assistant": {START, TEXT, END, JOIN},
             GENERATION: set()}


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
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
    turn = 0
    out = []
    for m in messages:
        role = m["role"]
        idx = turn if role == "assistant" else None
        out += [([start], role, START, idx), (b.tokenize(role) + newline, role, HEAD, idx),
                (b.tokenize(m["content"]), role, TEXT, idx), ([end], role, END, idx), (newline, role, JOIN, idx)]
        turn += role == "assistant"
    if add_generation_prompt:
        out += [([start], GENERATION, START, None), (b.tokenize("assistant") + newline, GENERATION, HEAD, None)]
    return out


def encode(tokenizer, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool) -> EncodedConversation:
    """Qwen1 ids (``make_context``'s, plus ``<|im_end|>\\n`` after a final assistant turn) and labels."""
    if masking not in POLICIES:
        raise FamtuneError(f"unknown masking policy {masking!r} for Qwen1; expected one of {', '.join(POLICIES)}")
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
    for piece, role, part, turn in parts:
        if turn is not None and part in (TEXT, END):
            b.assistant_ids(piece, turn)
        else:
            b.prompt_ids(piece)
    return b.build(masking)


def generation_defaults(tokenizer) -> GenerationDefaults:
    # <|im_end|> ends a chat turn; <|endoftext|> is Qwen1's eos (config and generation_config).
    b = ConversationBuilder(tokenizer)
    return GenerationDefaults([b.token_id(ENDOFTEXT), b.token_id(IM_END)], dict(SAMPLING))
