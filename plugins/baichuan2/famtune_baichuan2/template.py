"""Baichuan2's chat format, its labels and its generation defaults.

The official chat builder (``generation_utils.build_chat_input``, what ``model.chat`` runs) renders
``{system}<reserved_106>{user}<reserved_107>{assistant}<reserved_106>{user}<reserved_107>``: the
system text comes first with no marker, each user turn opens with ``<reserved_106>`` (id 195),
each assistant turn with ``<reserved_107>`` (id 196), nothing follows an assistant reply, there is
no BOS and no default system prompt. famtune renders exactly that; a conversation that ends with an
assistant reply (a training sample) gets ``</s>`` (id 2) after it, as the official
``fine-tune.py`` does, because ``</s>`` is what the chat model emits to stop (its
generation_config's only eos).

End-of-turn token under ``all_assistant``: the token that follows the reply in the ids, i.e.
``</s>`` after the final reply and the next turn's marker (normally ``<reserved_106>``) after an
earlier one; inserting ``</s>`` between turns would make training ids differ from what the model
sees in chat. Both tokens are stop ids, so a model that learned either one stops.

``efficient_eos`` is the official ``fine-tune.py`` recipe: the same ids, but the label at each
end-of-turn position is ``</s>``, so the model learns to predict eos after every reply while the
input continues with the next user turn. Only a marker that follows a reply gets that label (the
official script also sets it at the very first user marker, where the shifted loss never reads it,
but with a system text in front it would teach eos after the system prompt).

User text is tokenized as the original tokenizer does it: text that spells ``<reserved_106>`` or
``</s>`` becomes that token (see ``tokenizer.py``).
"""

from __future__ import annotations

from typing import Any

from fastchat.conversation import Conversation, SeparatorStyle

from famtune.encoding import GENERIC_POLICIES, ConversationBuilder, EncodedConversation
from famtune.types import GenerationDefaults

USER_TOKEN = "<reserved_106>"
ASSISTANT_TOKEN = "<reserved_107>"
EOS_TOKEN = "</s>"
EFFICIENT_EOS = "efficient_eos"
POLICIES = [*GENERIC_POLICIES, EFFICIENT_EOS]
# Native module names (W_pack is split into q/k/v_proj at load); never the NormHead lm_head.
TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The chat generation_config.json of Baichuan2-7B-Chat and Baichuan2-13B-Chat.
SAMPLING = {"do_sample": True, "temperature": 0.3, "top_p": 0.85, "top_k": 5, "repetition_penalty": 1.05}


def conversation() -> Conversation:
    return Conversation(
        name="famtune-baichuan2",
        system_template="{system_message}",
        system_message="",
        roles=(USER_TOKEN, ASSISTANT_TOKEN),
        sep_style=SeparatorStyle.NO_COLON_SINGLE,
        sep="",
        stop_token_ids=[2, 195],
    )


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{ raise_exception('Baichuan2 takes a system message only first') }}{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '" + USER_TOKEN + "' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT_TOKEN + "' + message['content'] -}}"
    "{%- if loop.last and not add_generation_prompt -%}{{- '" + EOS_TOKEN + "' -}}{%- endif -%}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_TOKEN + "' -}}{%- endif -%}"
)


def encode(
    tokenizer: Any, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool
) -> EncodedConversation:
    if masking not in POLICIES:
        raise ValueError(f"unknown masking policy {masking!r}; expected one of {', '.join(POLICIES)}")
    b = ConversationBuilder(tokenizer)
    markers = {"user": b.token_id(USER_TOKEN), "assistant": b.token_id(ASSISTANT_TOKEN)}
    eos = b.token_id(EOS_TOKEN)
    ends: list[int] = []  # positions of the end-of-turn tokens
    open_turn: int | None = None  # the assistant turn whose end-of-turn token comes next
    turn = 0

    def close(token: int) -> None:
        nonlocal open_turn
        if open_turn is None:
            b.prompt_ids([token])
            return
        ends.append(sum(len(p.ids) for p in b.pieces))
        b.assistant_ids([token], open_turn)
        open_turn = None

    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i + 1} has role 'system'; Baichuan2 takes a system message only first")
            b.prompt_text(content)
            continue
        if role not in markers:
            raise ValueError(f"message {i + 1} has role {role!r}; expected one of system, user, assistant")
        close(markers[role])
        if role == "user":
            b.prompt_text(content)
        else:
            b.assistant_text(content, turn)
            open_turn, turn = turn, turn + 1
    if add_generation_prompt:
        close(markers["assistant"])
    elif open_turn is not None:
        close(eos)
    if masking != EFFICIENT_EOS:
        return b.build(masking)
    enc = b.build("all_assistant")
    labels = list(enc.labels)
    for pos in ends:
        labels[pos] = eos
    return EncodedConversation(enc.input_ids, labels)


def generation_defaults(tokenizer: Any) -> GenerationDefaults:
    # </s> ends a reply; <reserved_106> starts the next user turn, which a model fine-tuned under
    # all_assistant learns to emit after earlier replies.
    b = ConversationBuilder(tokenizer)
    return GenerationDefaults([b.token_id(EOS_TOKEN), b.token_id(USER_TOKEN)], dict(SAMPLING))


class Baichuan2Format:
    """Baichuan2's hand-written format, with the methods of a ``famtune.chatformat.ChatFormat``.

    Written by hand because a reply ends with the *next* turn's marker (or ``</s>`` at the end),
    which a declarative prefix/suffix format cannot express.
    """

    name = "famtune-baichuan2"
    encode = staticmethod(encode)

    def jinja(self) -> str:
        return CHAT_TEMPLATE

    def fastchat_conversation(self):
        return conversation()

    def stop_ids(self, tokenizer: Any) -> list[int]:
        return generation_defaults(tokenizer).stop_ids


BAICHUAN2 = Baichuan2Format()
