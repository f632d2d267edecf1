"""The Llama-3 Instruct chat format.

Meta's template: ``<|begin_of_text|>`` once, then per message
``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>``; no default system
prompt. ``<|eot_id|>`` ends a turn and ``<|end_of_text|>`` a document; both stop generation
(Meta's generation_config.json lists 128001 and 128009).
"""
from __future__ import annotations

from typing import Any

from fastchat.conversation import Conversation, SeparatorStyle

from famtune.encoding import ConversationBuilder, EncodedConversation
from famtune.types import GenerationDefaults

BOS, EOT, END_OF_TEXT = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Meta-Llama-3-8B-Instruct's generation_config.json.
SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def conversation() -> Conversation:
    return Conversation(
        name="famtune-llama3",
        system_template=BOS + START_HEADER + "system" + END_HEADER + "\n\n{system_message}" + EOT,
        roles=(START_HEADER + "user" + END_HEADER + "\n\n", START_HEADER + "assistant" + END_HEADER + "\n\n"),
        sep_style=SeparatorStyle.NO_COLON_SINGLE,
        sep=EOT,
        stop_str=EOT,
    )


def encode(tokenizer: Any, messages: list[dict[str, str]], masking: str,
           add_generation_prompt: bool) -> EncodedConversation:
    b = ConversationBuilder(tokenizer)
    start, end, eot = b.token_id(START_HEADER), b.token_id(END_HEADER), b.token_id(EOT)
    b.prompt_ids([b.token_id(BOS)])
    turn = 0
    for m in messages:
        b.prompt_ids([start])
        b.prompt_text(m["role"])
        b.prompt_ids([end])
        b.prompt_text("\n\n")
        if m["role"] == "assistant":
            b.assistant_text(m["content"].strip(), turn)
            b.assistant_ids([eot], turn)
            turn += 1
        else:
            b.prompt_text(m["content"].strip())
            b.prompt_ids([eot])
    if add_generation_prompt:
        b.prompt_ids([start])
        b.prompt_text("assistant")
        b.prompt_ids([end])
        b.prompt_text("\n\n")
    return b.build(masking)


def generation_defaults(tokenizer: Any) -> GenerationDefaults:
    b = ConversationBuilder(tokenizer)
    return GenerationDefaults([b.token_id(EOT), b.token_id(END_OF_TEXT)], dict(SAMPLING))


def all_linear(model: Any) -> list[str]:
    """Every linear layer's name suffix except the output head's (bitsandbytes' Linear4bit is a Linear)."""
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})
