"""Chat formats of ChatGLM3 and GLM-4: ids, labels, Jinja template and fastchat template.

Both families write ``[gMASK] sop`` (GLM-4: ``<sop>``), then per message a role token, a header
line (``metadata + "\\n"``, metadata always empty here) and the content. Nothing closes a
message: the next role token does. A prompt for generation ends with ``<|assistant|>``; the model
then writes the header newline, the reply and a role token (or eos), which is why those are the
stop ids.

* ChatGLM3 (``build_single_message``): role id + ``sp("\\n")`` + ``sp(content)``, each text piece
  with its own SentencePiece dummy prefix, so the header is ``▁ \\n`` (30910, 13).
* GLM-4 (``apply_chat_template``, which both its ``chat()`` and its finetune use): role id +
  ``"\\n" + content`` tokenized as one piece.

Labels. ``all_assistant`` supervises each assistant reply's content and its end-of-turn token:
the role token that follows it, or, after the last reply, a token appended for that purpose
(ChatGLM3: ``</s>``, as its official finetune appends; GLM-4: ``<|user|>``, as its official
finetune appends), plus the header newline, which the model writes itself after a generation
prompt that ends at ``<|assistant|>``. ``<family>_official`` reproduces the official finetune's
shifted mask (``loss_masks = [False, *loss_masks]`` over whole assistant messages), which
supervises the same tokens for plain conversations. The ids never depend on the masking policy.

Content is never scanned for control tokens: ``<|user|>`` typed by a user stays text, as in the
original ``build_single_message`` (SentencePiece / ``disallowed_special=()``). Rendering the Jinja
template and tokenizing the text cannot make that distinction, so only for such content do the
two differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from famtune.encoding import GENERIC_POLICIES, IGNORE_INDEX, ConversationBuilder, EncodedConversation


@dataclass(frozen=True)
class FamilySpec:
    name: str
    #: the two tokens every sequence starts with (``get_prefix_tokens`` of the original tokenizer)
    prefix: tuple[str, str]
    eos: str
    #: token that ends the final assistant turn of a training sample (see template.py)
    final_end_of_turn: str
    stop_tokens: tuple[str, ...]
    sampling: dict[str, Any] = field(default_factory=dict)


SPECS: dict[str, FamilySpec] = {
    # chat()/stream_chat() of chatglm3-6b: eos_token_id=[eos, <|user|>, <|observation|>],
    # do_sample=True, top_p=0.8, temperature=0.8. The official finetune ends every sample with eos.
    "chatglm3": FamilySpec(
        name="chatglm3",
        prefix=("[gMASK]", "sop"),
        eos="</s>",
        final_end_of_turn="</s>",
        stop_tokens=("</s>", "<|user|>", "<|observation|>"),
        sampling={"do_sample": True, "temperature": 0.8, "top_p": 0.8},
    ),
    # glm-4-9b-chat generation_config.json: eos [151329, 151336, 151338], do_sample, 0.8 / 0.8.
    # The official GLM-4 finetune appends <|user|> ("EOS for chat") to every sample.
    "glm4": FamilySpec(
        name="glm4",
        prefix=("[gMASK]", "<sop>"),
        eos="<|endoftext|>",
        final_end_of_turn="<|user|>",
        stop_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
        sampling={"do_sample": True, "temperature": 0.8, "top_p": 0.8},
    ),
}

FAMILIES = tuple(SPECS)

ROLES = ("system", "user", "assistant")

# The space after "\n" stands for SentencePiece's dummy prefix of the separately encoded content;
# "\n" is a byte-fallback piece that merges with nothing, so the rendered text tokenizes to the
# same ids as the two pieces. Empty content is a bare "\n" (sp("") is empty).
# ChatGLM3's build_chat_input writes every history entry, an empty system message included.
CHATGLM3_TEMPLATE = (
    "{{- '[gMASK]sop' -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['content'] -%}{{- ' ' + message['content'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}"
    "{%- elif messages and messages[-1]['role'] == 'assistant' -%}{{- '</s>' -}}"
    "{%- endif -%}"
)
GLM4_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' or message['content'] -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}"
    "{%- elif messages and messages[-1]['role'] == 'assistant' -%}{{- '<|user|>' -}}"
    "{%- endif -%}"
)
_TEMPLATES = {"chatglm3": CHATGLM3_TEMPLATE, "glm4": GLM4_TEMPLATE}
# The stop ids of the released vocabularies (fastchat has no tokenizer to look them up in).
_STOP_IDS = {"chatglm3": [2, 64795, 64797], "glm4": [151329, 151336, 151338]}
# Whether an empty system message still writes its block (ChatGLM3's build_chat_input does; famtune
# drops it for GLM-4, whose reference builder was not available to check).
_EMPTY_SYSTEM_BLOCK = {"chatglm3": True, "glm4": False}


def chat_template(family: str) -> str:
    return _TEMPLATES[family]


def official_policy(family: str) -> str:
    return f"{family}_official"


def masking_policies(family: str) -> list[str]:
    return [*GENERIC_POLICIES, official_policy(family)]


def conversation_template(family: str):
    from fastchat.conversation import Conversation, SeparatorStyle

    return Conversation(
        name=f"famtune-{family}",
        system_template="<|system|>\n{system_message}",
        roles=("<|user|>", "<|assistant|>"),
        sep_style=SeparatorStyle.CHATGLM3,
        stop_token_ids=list(_STOP_IDS[family]),
    )


@dataclass
class _Segment:
    ids: list[int]
    #: the assistant turn these ids are supervised for under the generic policies, or None
    turn: int | None
    #: part of an assistant message (role token, header, content): the official trainer's loss mask
    in_assistant: bool


def _check(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    if not messages:
        raise ValueError("the conversation has no messages; expected at least one user message")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({role}) has content {m.get('content')!r}; expected a string")
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ValueError("a generation prompt needs the conversation to end with a user message, not an assistant one")


def _message_ids(family: str, b: ConversationBuilder, content: str) -> tuple[list[int], list[int]]:
    """(header, content) ids of one message body."""
    header = b.tokenize("\n")
    if family == "chatglm3":
        return header, b.tokenize(content)
    joint = b.tokenize("\n" + content)
    if joint[: len(header)] == header:
        return header, joint[len(header) :]
    # the newline merged with the content's first token; that token carries content, so keep it
    return [], joint


def _segments(
    family: str, tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[_Segment]:
    spec = SPECS[family]
    b = ConversationBuilder(tokenizer, split_special_tokens=True)
    segments = [_Segment([b.token_id(t) for t in spec.prefix], None, False)]
    open_turn: int | None = None  # assistant turn still waiting for its end-of-turn token
    turns = 0
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system" and not content and not _EMPTY_SYSTEM_BLOCK[family]:
            continue
        is_assistant = role == "assistant"
        segments.append(_Segment([b.token_id(f"<|{role}|>")], open_turn, is_assistant))
        header, body = _message_ids(family, b, content)
        if is_assistant:
            # A generation prompt ends at <|assistant|>: the model writes the header newline itself,
            # so the newline is part of what an assistant turn is trained to produce.
            segments += [_Segment(header, turns, True), _Segment(body, turns, True)]
            open_turn, turns = turns, turns + 1
        else:
            segments.append(_Segment(header + body, None, False))
            open_turn = None
    if add_generation_prompt:
        segments.append(_Segment([b.token_id("<|assistant|>")], None, False))
    elif open_turn is not None:
        segments.append(_Segment([b.token_id(spec.final_end_of_turn)], open_turn, False))
    return segments


def _official_labels(segments: list[_Segment]) -> EncodedConversation:
    ids: list[int] = []
    mask: list[bool] = []
    for s in segments:
        ids += s.ids
        mask += [s.in_assistant] * len(s.ids)
    shifted = [False, *mask[:-1]]
    return EncodedConversation(ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, shifted)])


def encode_conversation(
    family: str, tokenizer: Any, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool
) -> EncodedConversation:
    if masking not in masking_policies(family):
        raise ValueError(
            f"unknown masking policy {masking!r} for {family}; expected one of {', '.join(masking_policies(family))}"
        )
    _check(messages, add_generation_prompt)
    segments = _segments(family, tokenizer, messages, add_generation_prompt)
    if masking == official_policy(family):
        return _official_labels(segments)
    b = ConversationBuilder(tokenizer, split_special_tokens=True)
    for s in segments:
        if s.turn is None:
            b.prompt_ids(s.ids)
        else:
            b.assistant_ids(s.ids, s.turn)
    return b.build(masking)


class ChatGLMFormat:
    """One ChatGLM family's hand-written format, with the methods of a ``famtune.chatformat.ChatFormat``.

    Written by hand because a reply's end of turn is the next role token, and because ChatGLM's
    tokenizer tokenizes each message apart (``_message_ids``).
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self.name = f"famtune-{family}"

    def encode(
        self, tokenizer: Any, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool
    ) -> EncodedConversation:
        return encode_conversation(self.family, tokenizer, messages, masking, add_generation_prompt)

    def jinja(self) -> str:
        return chat_template(self.family)

    def fastchat_conversation(self):
        return conversation_template(self.family)

    def stop_ids(self, tokenizer: Any) -> list[int]:
        stop_ids = []
        for token in SPECS[self.family].stop_tokens:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
                stop_ids.append(tid)
        if not stop_ids:
            raise ValueError(
                f"the tokenizer knows none of {', '.join(SPECS[self.family].stop_tokens)}; "
                f"it is not a {self.family} tokenizer"
            )
        return stop_ids
