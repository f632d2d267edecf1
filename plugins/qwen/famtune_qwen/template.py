"""ChatML as Qwen1.5, Qwen2, Qwen2.5 and Qwen3 chat models render it.

Each version's official chat template renders ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per
message with no BOS. They differ in the default system prompt (Qwen1.5/2 "You are a helpful
assistant.", Qwen2.5 the "You are Qwen, created by Alibaba Cloud..." text, Qwen3 none) and in
Qwen3's think block: with thinking off, the final assistant turn starts with an empty
``<think>\\n\\n</think>\\n\\n``, which belongs to the prompt (the model is handed it at inference).
"""
from __future__ import annotations

from fastchat.conversation import Conversation, SeparatorStyle

from famtune.encoding import GENERIC_POLICIES, ConversationBuilder, EncodedConversation
from famtune.types import GenerationDefaults

DEFAULT_SYSTEM = {
    "qwen2": "You are a helpful assistant.",
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "qwen3": None,
}
EMPTY_THINK = "<think>\n\n</think>\n\n"
TARGETS_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Sampling defaults from each version's generation_config.json.
SAMPLING = {
    "qwen2": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    "qwen2.5": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
    # Qwen3's recommended non-thinking settings (famtune trains and chats with thinking off).
    "qwen3": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
}


def conversation(family: str) -> Conversation:
    system = DEFAULT_SYSTEM[family]
    return Conversation(
        name=f"famtune-{family}",
        system_template="<|im_start|>system\n{system_message}",
        system_message=system or "",
        roles=("<|im_start|>user", "<|im_start|>assistant"),
        sep_style=SeparatorStyle.CHATML,
        sep="<|im_end|>",
        stop_str="<|im_end|>",
    )


def chat_template(family: str) -> str:
    """The official template's rendering of system/user/assistant conversations (tool calls aside)."""
    system = DEFAULT_SYSTEM[family]
    default_system = (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
        "{%- endif %}"
    ) if system else ""
    if family != "qwen3":
        return (
            default_system
            + "{%- for message in messages %}"
            "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
        )
    # Qwen3: assistant turns after the last user message keep a think block; the last one always has one.
    return (
        "{%- set ns = namespace(last_query=-1) %}"
        "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}"
        "{%- endif %}{%- endfor %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' and loop.index0 > ns.last_query and loop.last %}"
        "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is not defined or enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
        "{%- endif %}{%- endif %}"
    )


def encode(family: str, tokenizer, messages: list[dict[str, str]], masking: str,
           add_generation_prompt: bool) -> EncodedConversation:
    b = ConversationBuilder(tokenizer)
    start, end = b.token_id("<|im_start|>"), b.token_id("<|im_end|>")
    system = DEFAULT_SYSTEM[family]
    if messages and messages[0]["role"] != "system" and system:
        messages = [{"role": "system", "content": system}, *messages]
    last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    turn = 0
    for i, m in enumerate(messages):
        b.prompt_ids([start])
        if m["role"] != "assistant":
            b.prompt_text(f"{m['role']}\n{m['content']}")
            b.prompt_ids([end])
            b.prompt_text("\n")
            continue
        header = "assistant\n"
        if family == "qwen3" and i > last_query and i == len(messages) - 1:
            header += EMPTY_THINK
        b.prompt_text(header)
        b.assistant_text(m["content"], turn)
        b.assistant_ids([end], turn)
        b.prompt_text("\n")
        turn += 1
    if add_generation_prompt:
        b.prompt_ids([start])
        b.prompt_text("assistant\n" + (EMPTY_THINK if family == "qwen3" else ""))
    return b.build(masking)


def generation_defaults(family: str, tokenizer) -> GenerationDefaults:
    # <|im_end|> ends a chat turn; <|endoftext|> ends a document (what base models emit).
    b = ConversationBuilder(tokenizer)
    return GenerationDefaults([b.token_id("<|im_end|>"), b.token_id("<|endoftext|>")], dict(SAMPLING[family]))


POLICIES = list(GENERIC_POLICIES)
