"""Model cards: the adapter's and the merged model's README.md say what was trained on what, quote the
measured losses, and carry a loading snippet that really runs in plain transformers/PEFT."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml

from famtune.demo import DEMO_DIR

IDENTITY = DEMO_DIR / "identity.jsonl"


@pytest.fixture(scope="module")
def trained_and_merged(tiny_qwen25, tmp_path_factory, one_torch_thread):
    from famtune.merge import merge
    from famtune.recipe import load_recipe
    from famtune.train import train

    work = tmp_path_factory.mktemp("card")
    recipe = yaml.safe_load((DEMO_DIR / "demo.yaml").read_text())
    recipe.pop("family")
    recipe.update(
        model=str(tiny_qwen25),
        data=str(IDENTITY),
        eval_data=str(IDENTITY),
        output_dir=str(work / "out"),
        max_steps=6,
        logging_steps=3,
        eval_steps=0,
        save_steps=0,
        evaluation_inputs=["Who are you?"],
        max_new_tokens=8,
        progress=False,
    )
    (work / "r.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    # in-process, as `famtune train` and `famtune merge` run them (the CLI is tested elsewhere)
    train(load_recipe(str(work / "r.yaml")), log=lambda line: None)
    merge(str(work / "out"), str(work / "merged"), log=lambda line: None)
    return work


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.slow
def test_adapter_card_quotes_what_was_measured(trained_and_merged, tiny_qwen25):
    from huggingface_hub import ModelCard

    out = trained_and_merged / "out"
    card = ModelCard.load(out / "README.md")
    summary = json.loads((out / "summary.json").read_text())
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and "famtune" in meta["tags"] and "qwen2.5" in meta["tags"]
    assert "base_model" not in meta  # a local path is not a hub id
    digest = hashlib.sha256(IDENTITY.read_bytes()).hexdigest()
    assert meta["famtune"]["data_sha256"] == {"identity.jsonl": digest}
    text = card.text
    assert f"| base model | `{tiny_qwen25}` |" in text
    assert "| family | `qwen2.5` (plugin qwen, famtune-qwen 0.1.0) |" in text
    assert "| chat template | `famtune-qwen2.5`" in text
    assert f"| final train loss | {summary['final_loss']:.4f} |" in text
    assert f"| eval loss | {summary['eval_loss']:.4f} |" in text
    assert "| Who are you? |" in text  # the evaluation answers
    assert f"`identity.jsonl`: sha256 `{digest}`" in text
    assert "max_steps: 6" in text  # the resolved recipe
    # the PEFT snippet runs as written
    scope: dict = {}
    exec(_python_blocks(text)[0], scope)  # the snippet as a reader would paste it
    assert sum("lora_" in n for n, _ in scope["model"].named_parameters()) > 0


@pytest.mark.slow
def test_merged_card_snippet_runs_in_plain_transformers(trained_and_merged):
    from huggingface_hub import ModelCard

    merged = trained_and_merged / "merged"
    card = ModelCard.load(merged / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers" and "merged" in card.data.tags
    assert "| merge | into the trained (dequantized NF4) base" in card.text
    # the data hash survives the merge, and the card is ours, not PEFT's template
    assert card.data.to_dict()["famtune"]["data_sha256"]["identity.jsonl"]
    assert "[More Information Needed]" not in card.text
    scope: dict = {}
    exec(_python_blocks(card.text)[0], scope)
    assert scope["out"].shape[1] > scope["ids"]["input_ids"].shape[1]  # it generated
