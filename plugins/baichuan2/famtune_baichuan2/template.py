"""Baichuan2's chat format, its labels and its generation defaults.

The official chat builder (``generation_utils.build_chat_input``, what ``model.chat`` runs) renders
``{system}<reserved_106>{user}<reserved_107>{assistant}<reserved_106>{user}<reserved_107>``: the
system text comes first with no marker, each user turn opens with ``<reserved_106>`` (id 195),
each assistant turn with ``<reserved_107>`` (id 196), nothing follows an assistant reply, there is
no BOS and no default system prompt. famtune renders exactly that; a conversation that ends with an
assistant reply (a training sample) gets ``</s>`` (id 2) after it, as the official
``fine-tune.py`` does, because ``</s>`` is what the chat model emits to stop (its
generation_config's only eos).

The format is one ``famtune.chatformat.ChatFormat``: empty system prefix and suffix, role tokens
as prefixes, ``turn_ends_with_next_role_token`` and ``final_assistant_suffix="</s>"``.

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

from famtune.chatformat import ChatFormat, FormatTokens
from famtune.encoding import IGNORE_INDEX

USER_TOKEN = "<reserved_106>"
ASSISTANT_TOKEN = "<reserved_107>"
EOS_TOKEN = "</s>"
EFFICIENT_EOS = "efficient_eos"
# Native module names (W_pack is split into q/k/v_proj at load); never the NormHead lm_head.
TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The chat generation_config.json of Baichuan2-7B-Chat and Baichuan2-13B-Chat.
SAMPLING = {"do_sample": True, "temperature": 0.3, "top_p": 0.85, "top_k": 5, "repetition_penalty": 1.05}


def efficient_eos_labels(tokens: FormatTokens) -> list[int]:
    """``all_assistant``'s labels with ``</s>`` at every end-of-turn position (see the module docstring)."""
    eos = tokens.token_id(EOS_TOKEN)
    return [
        (eos if part in ("prefix", "final_suffix") else tid) if turn is not None else IGNORE_INDEX
        for tid, turn, (_, part) in zip(tokens.input_ids, tokens.turns, tokens.parts)
    ]


BAICHUAN2 = ChatFormat(
    name="famtune-baichuan2",
    special_tokens=(USER_TOKEN, ASSISTANT_TOKEN, EOS_TOKEN),
    user_prefix=USER_TOKEN,
    user_suffix="",
    assistant_prefix=ASSISTANT_TOKEN,
    assistant_suffix="",
    final_assistant_suffix=EOS_TOKEN,
    turn_ends_with_next_role_token=True,
    # </s> ends a reply; <reserved_106> starts the next user turn, which a model fine-tuned under
    # all_assistant learns to emit after earlier replies.
    stop_tokens=(EOS_TOKEN, USER_TOKEN),
    fastchat_stop_ids=(2, 195),
    policies={EFFICIENT_EOS: efficient_eos_labels},
)
POLICIES = BAICHUAN2.masking_policies
