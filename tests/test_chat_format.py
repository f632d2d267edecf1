"""One chat-format definition, three views: the encoder, the Jinja chat_template and FastChat's
Conversation all derive from a family's ChatFormat and give the same ids, id for id.

Every registered family's format is a ChatFormat (the test fails for one that is not). A text view
is compared where the format says it can reproduce the encoder (``text_views_exact``,
``fastchat_exact``); the families' own tests compare the encoder with the original code's ids."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import build_tiny
from famtune.chatformat import ChatFormat
from famtune.plugins import get_plugins
from famtune.testing.conformance import CONVERSATIONS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "famtune-llama3"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference"
# Families without a tiny checkpoint of their own: the released tokenizer files from the fixtures.
TOKENIZER_FILES = {"qwen1": REFERENCE / "qwen1" / "tokenizer"}
EDGE_CASES = [
    [{"role": "user", "content": "\nstarts with a newline"}, {"role": "assistant", "content": "\n\nso does this"}],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "empty system"},
        {"role": "assistant", "content": "  padded  "},
    ],
]


def registered_families():
    return sorted(get_plugins().registry.families)


def test_every_registered_family_is_one_chat_format_definition():
    for name, (obj, _) in get_plugins().registry.families.items():
        assert isinstance(obj.chat_format, ChatFormat), name


def three_views(fmt: ChatFormat, tokenizer, messages, add_generation_prompt):
    encoded = fmt.encode(tokenizer, messages, "all_assistant", add_generation_prompt).input_ids
    jinja = list(
        tokenizer.apply_chat_template(
            messages,
            chat_template=fmt.jinja(),
            tokenize=True,
            add_generation_prompt=add_generation_prompt,
            return_dict=False,
        )
    )
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    conv = fmt.fastchat_conversation(system)
    for m in messages[1:] if system is not None else messages:
        # FastChat does not trim contents; a trimming format's caller does.
        content = m["content"].strip() if fmt.strip_content else m["content"]
        conv.append_message(conv.roles[0] if m["role"] == "user" else conv.roles[1], content)
    if add_generation_prompt:
        conv.append_message(conv.roles[1], None)
    fastchat = list(tokenizer(conv.get_prompt(), add_special_tokens=False)["input_ids"])
    return encoded, jinja, fastchat


def check_agreement(fmt: ChatFormat, tokenizer) -> int:
    checked = 0
    for messages in CONVERSATIONS + EDGE_CASES:
        if not fmt.text_views_exact(messages):
            continue  # e.g. Qwen1 content starting with a newline: only the encoder has make_context's ids
        for prompt in (False, True):
            msgs = messages[:-1] if prompt else messages
            encoded, jinja, fastchat = three_views(fmt, tokenizer, msgs, prompt)
            assert encoded == jinja, (prompt, tokenizer.decode(encoded), tokenizer.decode(jinja))
            assert tokenizer(fmt.render(msgs, prompt), add_special_tokens=False)["input_ids"] == encoded
            # FastChat has one assistant prefix and one separator per role (Qwen3's final think
            # block, ChatGLM's header newline and Baichuan2's final </s> are beyond it).
            if fmt.fastchat_exact(prompt):
                assert fastchat == encoded, (prompt, tokenizer.decode(fastchat), tokenizer.decode(encoded))
                checked += 1
            checked += 1
    return checked


@pytest.mark.parametrize("family", registered_families())
def test_encoder_jinja_and_fastchat_agree_id_for_id(family, tmp_path):
    from transformers import AutoTokenizer

    fam = get_plugins().claim({}, "", family=family)
    path = str(TOKENIZER_FILES.get(family) or build_tiny(family, tmp_path))
    tokenizer = fam.load_tokenizer(path, False) or AutoTokenizer.from_pretrained(path)
    assert check_agreement(fam.obj.chat_format, tokenizer) >= 2 * len(CONVERSATIONS)
    assert fam.chat_template() == fam.obj.chat_format.jinja()  # the facade serves the derived views
    assert fam.conversation_template().name == fam.obj.chat_format.name


def test_the_example_llama3_format_agrees_id_for_id(tmp_path):
    from transformers import AutoTokenizer

    from famtune.demo import demo_corpus

    sys.path.insert(0, str(EXAMPLE))
    try:
        from famtune_llama3 import tiny
        from famtune_llama3.template import LLAMA3

        tiny.write_tiny_checkpoint(str(tmp_path), demo_corpus())
        tokenizer = AutoTokenizer.from_pretrained(tmp_path)
        assert check_agreement(LLAMA3, tokenizer) == 4 * len(CONVERSATIONS + EDGE_CASES)
    finally:
        # the example is out of tree: leave no trace of it in this process (test_example_plugin checks)
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m == "famtune_llama3" or m.startswith("famtune_llama3.")]:
            del sys.modules[name]
    # Meta's rendering, as a string, so the derived template is also checked against the published one.
    text = LLAMA3.render([{"role": "user", "content": " Hi "}], add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_a_format_whose_turns_end_at_the_next_role_token_needs_role_tokens():
    with pytest.raises(ValueError, match="'User: ' does not"):
        ChatFormat(
            name="bad",
            special_tokens=("<a>",),
            user_prefix="User: ",
            user_suffix="",
            assistant_prefix="<a>",
            assistant_suffix="",
            turn_ends_with_next_role_token=True,
        )
