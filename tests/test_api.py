"""The Python API (famtune.api, docs/users/python-api.md): the doc's example runs as written, every
public name is documented, and the functions give what the CLI and the families give."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import famtune
from famtune import api
from famtune.errors import FamtuneError
from famtune.plugins import get_plugins

DOC = Path(__file__).resolve().parents[1] / "docs" / "users" / "python-api.md"


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_every_public_name_is_exported_documented_and_linked():
    text = DOC.read_text(encoding="utf-8")
    for name in api.__all__:
        assert getattr(famtune, name) is getattr(api, name), name
        assert name in famtune.__all__, name
        assert re.search(rf"`(famtune\.)?{name}\b", text), f"{name} is not in docs/users/python-api.md"
    assert "Stability promise" in text
    # a submodule of the same name would replace the function on the package once imported
    package = Path(famtune.__file__).parent
    assert not [n for n in api.__all__ if (package / f"{n}.py").exists() or (package / n).is_dir()]
    assert "(users/python-api.md)" in (DOC.parents[1] / "README.md").read_text(encoding="utf-8")


def test_import_famtune_loads_no_heavy_library():
    code = "import sys, famtune; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return famtune.tiny_model("qwen2.5", tmp_path_factory.mktemp("api") / "tiny")


def test_open_model_encodes_as_the_family_does(tiny):
    model = famtune.open_model(tiny)
    assert model.family == "qwen2.5" and model.path == tiny
    fam = get_plugins().claim({}, "", family="qwen2.5")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    enc = model.encode(messages)
    assert enc.input_ids == fam.encode(model.tokenizer, messages, "all_assistant").input_ids
    assert model.tokenizer.decode([t for t in enc.labels if t != -100]) == "Hello<|im_end|>"
    assert model.encode(messages, masking="train_on_prompt").labels == enc.input_ids
    assert model.masking_policies[0] == "all_assistant"
    assert model.chat_template() == fam.chat_template()
    with pytest.raises(FamtuneError, match="role 'bot'"):
        model.encode([{"role": "bot", "content": "x"}])


def test_recipe_errors_name_the_dict_and_the_key():
    with pytest.raises(FamtuneError, match="recipe dict.*learning_speed"):
        famtune.make_recipe({"model": "m", "data": "d.jsonl", "learning_speed": 8})
    r = famtune.make_recipe({"model": "m", "data": "d.jsonl"}, max_steps=7)
    assert r.max_steps == 7 and r.model == "m"
    with pytest.raises(FamtuneError, match="a Recipe and overrides"):
        famtune.fine_tune(r, max_steps=3)
    with pytest.raises(FamtuneError, match="provides family 'no-such-family'"):
        famtune.tiny_model("no-such-family", "unused")
    with pytest.raises(FamtuneError, match="qwen1 family's plugin cannot build a tiny checkpoint"):
        famtune.tiny_model("qwen1", "unused")


@pytest.mark.slow
def test_the_documented_example_runs_as_written(tmp_path, monkeypatch, one_torch_thread):
    """Every python block of docs/users/python-api.md, in order, in a fresh directory."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in doc_blocks():
        exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["summary"]["steps"] == 2
    assert (tmp_path / "run1-merged" / "config.json").exists()
    assert namespace["answer"] == namespace["again"]
    assert len(namespace["chat"].history) == 2
