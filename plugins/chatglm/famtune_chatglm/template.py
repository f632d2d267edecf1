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

Each family is one ``famtune.chatformat.ChatFormat`` (``FORMATS``): role tokens as prefixes, the
header newline as ``assistant_header``, ``turn_ends_with_next_role_token`` and
``final_assistant_suffix``; ChatGLM3 also tokenizes content apart (``content_apart``) and its text
views write the dummy prefix as a space (``rendered_content_prefix``).

Content is never scanned for control tokens: ``<|user|>`` typed by a user stays text, as in the
original ``build_single_message`` (SentencePiece / ``disallowed_special=()``). Rendering the Jinja
template and tokenizing the text cannot make that distinction, so only for such content do the
two differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from famtune.chatformat import ChatFormat, FormatTokens
from famtune.encoding import IGNORE_INDEX

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


@dataclass(frozen=True)
class FamilySpec:
    name: str
    #: the two tokens every sequence starts with (``get_prefix_tokens`` of the original tokenizer)
    prefix: tuple[str, str]
    eos: str
    #: token that ends the final assistant turn of a training sample (see the module docstring)
    final_end_of_turn: str
    stop_tokens: tuple[str, ...]
    #: the stop tokens' ids in the released vocabulary (for FastChat, which has no tokenizer)
    released_stop_ids: tuple[int, ...]
    #: whether an empty system message still writes its block (ChatGLM3's build_chat_input does;
    #: famtune drops it for GLM-4, whose reference builder was not available to check)
    empty_system_block: bool
    #: ChatGLM3 tokenizes each text piece apart, each with its own SentencePiece dummy prefix
    pieces_apart: bool
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
        released_stop_ids=(2, 64795, 64797),
        empty_system_block=True,
        pieces_apart=True,
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
        released_stop_ids=(151329, 151336, 151338),
        empty_system_block=False,
        pieces_apart=False,
        sampling={"do_sample": True, "temperature": 0.8, "top_p": 0.8},
    ),
}

FAMILIES = tuple(SPECS)


def official_policy(family: str) -> str:
    return f"{family}_official"


def official_labels(tokens: FormatTokens) -> list[int]:
    """The official finetune's shifted loss mask over whole assistant messages (role token, header,
    content): ``loss_masks = [False, *loss_masks]``."""
    in_assistant = [role == "assistant" and part in ("prefix", "header", "content") for role, part in tokens.parts]
    shifted = [False, *in_assistant[:-1]]
    return [t if keep else IGNORE_INDEX for t, keep in zip(tokens.input_ids, shifted)]


def check_generation_prompt(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    if messages and add_generation_prompt and messages[-1].get("role") == "assistant":
        raise ValueError("a generation prompt needs the conversation to end with a user message, not an assistant one")


def chat_format(family: str) -> ChatFormat:
    spec = SPECS[family]
    return ChatFormat(
        name=f"famtune-{family}",
        special_tokens=(*spec.prefix, *ROLE_TOKENS, spec.eos),
        begin="".join(spec.prefix),
        system_prefix="<|system|>\n",
        user_prefix="<|user|>\n",
        user_suffix="",
        assistant_prefix="<|assistant|>",
        # A generation prompt ends at <|assistant|>: the model writes the header newline itself,
        # so the newline is part of what an assistant turn is trained to produce.
        assistant_header="\n",
        assistant_suffix="",
        final_assistant_suffix=spec.final_end_of_turn,
        turn_ends_with_next_role_token=True,
        content_apart=spec.pieces_apart,
        # The space stands for SentencePiece's dummy prefix of the separately encoded content;
        # "\n" is a byte-fallback piece that merges with nothing, so the rendered text tokenizes
        # to the same ids as the two pieces. Empty content is a bare "\n" (sp("") is empty).
        rendered_content_prefix=" " if spec.pieces_apart else "",
        control_tokens_in_content=False,
        system_anywhere=True,
        drop_empty_system=not spec.empty_system_block,
        stop_tokens=spec.stop_tokens,
        fastchat_stop_ids=spec.released_stop_ids,
        policies={official_policy(family): official_labels},
        validate=check_generation_prompt,
    )


FORMATS = {family: chat_format(family) for family in FAMILIES}


def chat_template(family: str) -> str:
    return FORMATS[family].jinja()
