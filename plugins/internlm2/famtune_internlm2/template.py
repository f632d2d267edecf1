"""InternLM2's chat format (ChatML with one leading ``<s>``), written once as a ``ChatFormat``.

    <s><|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n

- **Default system: none.** The published ``chat_template`` injects no system block, so famtune
  does not either. (The remote ``chat()`` helper adds an InternLM persona; pass it as a system
  message to get that behaviour.)
- **BOS once.** ``<s>`` is the format's ``begin``; text is always tokenized without special
  tokens, so it never appears twice.
- **Text that spells a control token becomes that token**, as in the original: its tokenizer
  splits every added token out of the text, and both its ``build_inputs`` and its
  ``chat_template`` tokenize the rendered prompt as one string (the reference ids show
  ``<|im_start|>`` written as text turning into 92543).
- **The assistant header joins the answer** (``join_assistant_prefix``): the original tokenizes
  ``"assistant\\n" + answer`` as one string, so an answer starting with ``"\\n"`` merges with the
  header's newline; the merged token holds answer text and is supervised with it.
- **Labels** (``all_assistant``): each assistant content plus its ``<|im_end|>``; the ``\\n``
  after it and every prompt token are -100 (as in xtuner, InternLM's own fine-tuning tool).
- **The chat_template is derived, not the published string.** famtune saves the template derived
  from this definition with merged models; it renders the published template's ids for every
  conversation of the three roles (``tests/test_internlm2.py`` checks both against the reference
  fixtures and each other), so one definition stays the source of truth. The published one
  renders any role name verbatim; famtune accepts only system, user and assistant anyway.
"""

from __future__ import annotations

from famtune.chatformat import IM_END, chatml

TEMPLATE_NAME = "famtune-internlm2"

#: The template real checkpoints publish (internlm2-chat-7b tokenizer_config.json), for the tiny
#: original-layout checkpoint; famtune's own is derived from ``INTERNLM2`` and renders the same ids.
PUBLISHED_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def check_generation_prompt(messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    if messages and add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ValueError(
            "add_generation_prompt needs the conversation to end with a user message, not an assistant one"
        )


INTERNLM2 = chatml(
    TEMPLATE_NAME,
    extra_special_tokens=("<s>",),
    begin="<s>",
    join_assistant_prefix=True,
    # The remote chat() stops on eos or <|im_end|>.
    stop_tokens=("</s>", IM_END),
    fastchat_stop_ids=(2, 92542),
    validate=check_generation_prompt,
)
