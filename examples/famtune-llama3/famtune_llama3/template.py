"""The Llama-3 Instruct chat format, written once; famtune derives the encoder, the Jinja
``chat_template`` and the FastChat conversation from it.

Meta's template: ``<|begin_of_text|>`` once, then per message
``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>``; no default system
prompt. ``<|eot_id|>`` ends a turn and ``<|end_of_text|>`` a document; both stop generation
(Meta's generation_config.json lists 128001 and 128009).
"""
from __future__ import annotations

from famtune.chatformat import ChatFormat

BOS, EOT, END_OF_TEXT = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"


def _header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


LLAMA3 = ChatFormat(
    name="famtune-llama3",
    special_tokens=(BOS, START_HEADER, END_HEADER, EOT, END_OF_TEXT),
    begin=BOS,
    system_prefix=_header("system"), system_suffix=EOT,
    user_prefix=_header("user"), user_suffix=EOT,
    assistant_prefix=_header("assistant"), assistant_suffix=EOT,
    strip_content=True,
    stop_tokens=(EOT, END_OF_TEXT),
)
