"""The example plugin's own tests: discovery, Meta's Llama-3 format, and famtune's conformance suite."""
from __future__ import annotations

import pytest

pytest_plugins = ["famtune.testing"]


def test_famtune_discovers_the_plugin(famtune_discovery):
    famtune_discovery("llama3", "famtune-llama3", ["llama3"])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from famtune_llama3 import tiny

    out = tmp_path_factory.mktemp("tiny")
    tiny.write_tiny_checkpoint(str(out), ["Hi there", "Hello, how can I help?"])
    return AutoTokenizer.from_pretrained(out)


def test_renders_the_meta_llama_3_instruct_format(tokenizer):
    from famtune_llama3.template import LLAMA3

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
                {"role": "assistant", "content": "Hello, how can I help?"}]
    enc = LLAMA3.encode(tokenizer, messages, "all_assistant", add_generation_prompt=False)
    # Meta's published rendering: BOS once, a header per message, contents trimmed, <|eot_id|> after each.
    assert tokenizer.decode(enc.input_ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello, how can I help?<|eot_id|>")
    supervised = [t for t, label in zip(enc.input_ids, enc.labels) if label != -100]
    assert tokenizer.decode(supervised) == "Hello, how can I help?<|eot_id|>"
    prompt = LLAMA3.encode(tokenizer, messages[:2], "all_assistant", add_generation_prompt=True)
    assert tokenizer.decode(prompt.input_ids).endswith("Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_conformance(famtune_conformance):
    famtune_conformance("llama3")
