"""The README's plain transformers + PEFT snippet rebuilds exactly the model famtune chats with."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, build_base_and_adapter


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### The adapter in plain transformers + PEFT", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    return build_base_and_adapter(tmp_path_factory.mktemp("plain-peft"), steps=20)


def test_famtune_json_records_the_full_4bit_settings(trained):
    _, _, adapter = trained
    meta = json.loads((adapter / "famtune.json").read_text())
    assert meta["quantization_config"] == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_compute_dtype": "float32",
    }
    assert meta["nf4_kernel"] == "dequantize" and meta["compute_dtype"] == "float32"


def test_readme_snippet_gives_famtunes_logits_exactly(trained):
    import torch

    from famtune.chat import load_chat_model

    _, base, adapter = trained
    code = readme_snippet().replace('"Qwen/Qwen2.5-7B-Instruct", "out"', f'"{base}", "{adapter}"')
    assert str(base) in code, "the README snippet no longer names its base and adapter the way this test expects"
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    session = load_chat_model(str(base), adapter=str(adapter))
    ids = torch.tensor([session.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])])
    with torch.no_grad():
        ours = session.model(input_ids=ids).logits
        plain = scope["model"](input_ids=ids).logits
    assert torch.equal(ours, plain), (ours - plain).abs().max().item()
    assert scope["tokenizer"](["hi"])["input_ids"] == session.tokenizer(["hi"])["input_ids"]
