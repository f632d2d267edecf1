"""InternLM2's chat format (ChatML with one leading ``<s>``) and its token-level encoding.

    <s><|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n

- **Default system: none.** The published ``chat_template`` injects no system block, so famtune
  does not either. (The remote ``chat()`` helper adds an InternLM persona; pass it as a system
  message to get that behaviour.)
- **BOS once.** ``<s>`` is written by the template (or added as an id by ``encode_conversation``);
  text is always tokenized without special tokens, so it never appears twice.
- **Text that spells a control token becomes that token**, as in the original: its tokenizer
  splits every added token out of the text, and both its ``build_inputs`` and its
  ``chat_template`` tokenize the rendered prompt as one string (the reference ids show
  ``<|im_start|>`` written as text turning into 92543). Matching that keeps famtune's ids
  equal to the original's and to ``apply_chat_template``'s for every input.
- **Labels** (``all_assistant``): each assistant content plus its ``<|im_end|>``; the ``\\n``
  after it and every prompt token are -100 (as in xtuner, InternLM's own fine-tuning tool).
"""

from __future__ import annotations

from typing import Any

from famtune.encoding import GENERIC_POLICIES, ConversationBuilder, EncodedConversation

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant")
TEMPLATE_NAME = "famtune-internlm2"

#: The published template (internlm2-chat-7b tokenizer_config.json), unchanged.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _SystemBlock(str):
    """A ``system_template`` that renders nothing for an empty system message.

    fastchat's ChatML style always prints ``system_template.format(...)``, which would put an
    empty system block into every prompt; InternLM2 has none by default. ``Conversation.copy``
    keeps this object, so copies from fastchat's registry behave the same.
    """

    def format(self, *args: Any, **kwargs: Any) -> str:
        return super().format(*args, **kwargs) if kwargs.get("system_message") else ""


def conversation_template():
    from fastchat.conversation import Conversation, SeparatorStyle

    return Conversation(
        name=TEMPLATE_NAME,
        system_template=_SystemBlock(IM_START + "system\n{system_message}"),
        system_message="",
        roles=(IM_START + "user", IM_START + "assistant"),
        sep_style=SeparatorStyle.CHATML,
        sep=IM_END,
        stop_str=IM_END,
        stop_token_ids=[2, 92542],
    )


def masking_policies() -> list[str]:
    return list(GENERIC_POLICIES)


def check_messages(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    if not messages:
        raise ValueError("the conversation has no messages; give at least one user message")
    for i, m in enumerate(messages, 1):
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({role}) has content {m.get('content')!r}; expected a string")
        if role == "system" and i != 1:
            raise ValueError(f"message {i} is a system message; only the first message may be one")
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ValueError(
            "add_generation_prompt needs the conversation to end with a user message, not an assistant one"
        )


def _split_after_head(builder: ConversationBuilder, head: str, body: str) -> tuple[list[int], list[int]]:
    """Ids of ``head + body`` tokenized as one text (as the original does), cut where ``body`` starts.

    Without this, "assistant\\n" and an answer starting with "\\n" would be tokenized apart,
    while the original merges the two newlines into one token. A token that spans the cut
    holds answer text, so it goes with the answer.
    """
    text = head + body
    ids = builder.tokenize(text)
    head_ids = builder.tokenize(head)
    if ids[: len(head_ids)] == head_ids:
        return head_ids, ids[len(head_ids) :]
    try:
        enc = builder.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        cut = sum(1 for _, end in offsets if end <= len(head))
    except (NotImplementedError, KeyError, TypeError):
        cut = 0
        while cut < min(len(ids), len(head_ids)) and ids[cut] == head_ids[cut]:
            cut += 1
    return ids[:cut], ids[cut:]


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool
) -> EncodedConversation:
    check_messages(messages, add_generation_prompt)
    if masking not in GENERIC_POLICIES:
        raise ValueError(f"unknown masking policy {masking!r}; expected one of {', '.join(GENERIC_POLICIES)}")
    builder = ConversationBuilder(tokenizer)
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no bos_token; InternLM2 conversations start with <s>")
    im_start, im_end = builder.token_id(IM_START), builder.token_id(IM_END)

    builder.prompt_ids([bos])
    turn = 0
    for m in messages:
        builder.prompt_ids([im_start])
        if m["role"] == "assistant":
            head_ids, answer_ids = _split_after_head(builder, "assistant\n", m["content"])
            builder.prompt_ids(head_ids)
            builder.assistant_ids(answer_ids + [im_end], turn)
            turn += 1
        else:
            builder.prompt_text(f"{m['role']}\n{m['content']}")
            builder.prompt_ids([im_end])
        builder.prompt_text("\n")
    if add_generation_prompt:
        builder.prompt_ids([im_start])
        builder.prompt_text("assistant\n")
    return builder.build(masking)


class InternLM2Format:
    """InternLM2's hand-written format, with the methods of a ``famtune.chatformat.ChatFormat``.

    Written by hand because an answer starting with a newline merges with the header's newline
    in the original tokenization (``_split_after_head``), which a declarative format cannot express.
    """

    name = TEMPLATE_NAME
    encode = staticmethod(encode_conversation)

    def jinja(self) -> str:
        return CHAT_TEMPLATE

    def fastchat_conversation(self):
        return conversation_template()

    def stop_ids(self, tokenizer: Any) -> list[int]:
        # The remote chat() stops on eos or <|im_end|>.
        stop: list[int] = []
        for token in (tokenizer.eos_token, IM_END):
            tid = tokenizer.convert_tokens_to_ids(token) if token else None
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in stop:
                stop.append(tid)
        return stop


INTERNLM2 = InternLM2Format()
