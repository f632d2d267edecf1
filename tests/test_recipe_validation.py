"""Every recipe misuse is one line, `famtune: error: KEY: ...`, before any model loads; the README's
recipe example is the real defaults; `famtune train --help` lists the keys."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, famtune_cli
from famtune.cli import main
from famtune.errors import FamtuneError
from famtune.recipe import Recipe, load_recipe, parse_overrides
from famtune.validate import ALIASES, RULES

EXAMPLE_KEYS = {"model", "data", "eval_data", "output_dir"}  # labelled "(example)" in the README


def readme_recipe() -> tuple[dict, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Recipes", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block), block


def test_readme_recipe_example_is_valid_yaml_with_the_real_defaults():
    values, block = readme_recipe()
    defaults = Recipe().to_dict()
    assert set(values) <= set(defaults), set(values) - set(defaults)
    assert set(RULES) <= set(values), f"keys missing from the README example: {set(RULES) - set(values)}"
    for key, value in values.items():
        if key in EXAMPLE_KEYS:
            line = next(ln for ln in block.splitlines() if ln.startswith(f"{key}:"))
            assert "(example)" in line, line
            continue
        # YAML 1.1 reads 2.0e-4 as a float; compare as the recipe loader coerces
        assert value == defaults[key], f"README shows {key}: {value!r}, the default is {defaults[key]!r}"


def test_train_help_lists_every_key_with_its_default_and_aliases():
    res = famtune_cli("train", "--help")
    for key in RULES:
        default = getattr(Recipe(), key)
        shown = (
            "null"
            if default is None
            else "''"
            if default == ""
            else str(default).lower()
            if isinstance(default, bool)
            else str(default)
        )
        assert re.search(rf"^  {key} +{re.escape(shown)} +\S", res.stdout, re.M), key  # name, default, meaning
    assert "gradient_accumulation_steps=grad_accum" in res.stdout and "model_name_or_path=model" in res.stdout
    assert "--overwrite" in res.stdout


@pytest.fixture
def env(tmp_path):
    """A recipe whose paths all exist (the model is an empty directory: nothing may load it)."""
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    base = {"model": str(model), "data": str(data), "output_dir": str(tmp_path / "out")}
    return tmp_path, base


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


# (recipe overrides, text the one-line error must contain)
MISUSE = [
    ({"learning_rate": -1}, "learning_rate: -1.0 is out of range; expected > 0"),
    ({"learning_rate": float("nan")}, "learning_rate: nan is not a finite number"),
    ({"learning_rate": float("inf")}, "learning_rate: inf is not a finite number"),
    ({"batch_size": 0}, "batch_size: 0 is out of range; expected >= 1"),
    ({"grad_accum": 0}, "grad_accum: 0 is out of range; expected >= 1"),
    ({"lora_r": 0}, "lora_r: 0 is out of range; expected >= 1"),
    ({"lora_alpha": 0}, "lora_alpha: 0 is out of range; expected > 0"),
    ({"lora_dropout": 1.5}, "lora_dropout: 1.5 is out of range; expected >= 0 and < 1"),
    ({"seed": -1}, "seed: -1 is out of range; expected >= 0"),
    ({"warmup_ratio": 5}, "warmup_ratio: 5.0 is out of range; expected >= 0 and <= 1"),
    ({"max_steps": -5, "epochs": 0}, "max_steps: -5 is out of range; expected >= 0"),
    ({"max_steps": 0, "epochs": 0}, "epochs: 0 with max_steps: 0 trains nothing"),
    ({"epochs": -1}, "epochs: -1.0 is out of range"),
    ({"max_length": 0}, "max_length: 0 is out of range"),
    ({"max_grad_norm": 0}, "max_grad_norm: 0.0 is out of range; expected > 0"),
    ({"logging_steps": 0}, "logging_steps: 0 is out of range"),
    ({"save_steps": -1}, "save_steps: -1 is out of range"),
    ({"eval_steps": -2}, "eval_steps: -2 is out of range"),
    ({"max_new_tokens": 0}, "max_new_tokens: 0 is out of range"),
    ({"eval_split": 1.0}, "eval_split is 1.0; expected a fraction in [0, 1)"),
    ({"weight_decay": -0.1}, "weight_decay: -0.1 is out of range"),
    ({"nan_policy": "ignore"}, "nan_policy: 'ignore' is not allowed; expected one of stop, skip_step"),
    ({"data_format": "csv"}, "data_format: 'csv' is not allowed"),
    ({"compute_dtype": "int8"}, "compute_dtype: 'int8' is not allowed"),
    ({"quantization": "int4"}, "quantization is 'int4'; expected nf4 or none"),
    ({"packing": "yes please"}, "packing is 'yes please'"),
    ({"lora_targets": []}, "lora_targets: []; expected default, all-linear or a non-empty list"),
    ({"lora_targets": ["q_proj", 3]}, "lora_targets: ['q_proj', 3]"),
    ({"evaluation_inputs": ["hi", 7]}, "evaluation_inputs: ['hi', 7]; expected a list of prompt strings"),
    ({"batch_size": None}, "batch_size is null; give a value"),
    ({"batch_size": "two"}, "batch_size is 'two' (str); expected int"),
    ({"eval_data": 5}, "eval_data is 5 (int); expected a string or null"),
    ({"gradient_accumulation_stepz": 4}, "unknown recipe key 'gradient_accumulation_stepz' (did you mean grad_accum?)"),
    ({"bf16": True}, "unknown recipe key 'bf16' (did you mean compute_dtype: bf16?)"),
    ({"dataset": "alpaca_en"}, "unknown recipe key 'dataset' (did you mean data"),
    ({"lr": 1e-3, "learning_rate": 1e-3}, "learning_rate and lr both set learning_rate; keep one"),
]


@pytest.mark.parametrize(
    "overrides,expected", MISUSE, ids=[next(iter(o)) + "-" + str(i) for i, (o, _) in enumerate(MISUSE)]
)
def test_recipe_misuse_is_one_line_before_any_model_loads(env, capsys, overrides, expected):
    tmp, base = env
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({**base, **overrides}))
    rc, err = run_cli(capsys, ["train", str(recipe)])
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("famtune: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp / "out").exists()  # refused before anything was created


def _read_only_dir(tmp: Path) -> Path:
    """A directory this process cannot write: a read-only mount for root, mode 0555 otherwise."""
    ro = tmp / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    else:
        ro.chmod(0o555)
    return ro


PATH_MISUSE = [
    "data_missing",
    "data_is_folder",
    "eval_data_missing",
    "model_missing",
    "model_is_file",
    "output_is_file",
    "output_under_file",
    "output_read_only",
    "output_is_model",
    "recipe_missing",
    "recipe_not_utf8",
    "recipe_is_list",
    "recipe_bad_yaml",
    "override_bad_yaml",
    "resume_and_overwrite",
]


@pytest.mark.parametrize("case", PATH_MISUSE)
def test_path_misuse_is_one_line_naming_the_key(env, capsys, case):
    tmp, base = env
    recipe = tmp / "r.yaml"
    extra: list[str] = []
    values = dict(base)
    expect = ""
    ro = None
    if case == "data_missing":
        values["data"], expect = str(tmp / "nope.jsonl"), "data: "
    elif case == "data_is_folder":
        values["data"], expect = str(tmp), "is a directory; give the JSON or JSONL file"
    elif case == "eval_data_missing":
        values["eval_data"], expect = str(tmp / "nope.jsonl"), "eval_data: "
    elif case == "model_missing":
        values["model"], expect = str(tmp / "no-model"), "model: "
    elif case == "model_is_file":
        values["model"], expect = base["data"], "model: "
    elif case == "output_is_file":
        values["output_dir"], expect = base["data"], "output_dir: "
    elif case == "output_under_file":
        values["output_dir"], expect = base["data"] + "/out", "output_dir: "
    elif case == "output_read_only":
        ro = _read_only_dir(tmp)
        values["output_dir"], expect = str(ro / "out"), "output_dir: "
    elif case == "output_is_model":
        values["output_dir"], expect = base["model"], "is the base model's directory"
    elif case == "recipe_missing":
        recipe, expect = tmp / "missing.yaml", "cannot read recipe"
    elif case == "recipe_not_utf8":
        expect = "not UTF-8"
    elif case == "recipe_is_list":
        expect = "a recipe is a mapping"
    elif case == "recipe_bad_yaml":
        expect = "invalid YAML"
    elif case == "override_bad_yaml":
        extra, expect = ["--lora_r", "[1,"], "--lora_r '[1,' is not a valid value"
    elif case == "resume_and_overwrite":
        extra, expect = ["--resume", "--overwrite"], "give one of them"
    text = yaml.safe_dump(values)
    if case == "recipe_not_utf8":
        recipe.write_bytes(text.encode() + b"system: \xff\xfe\n")
    elif case == "recipe_is_list":
        recipe.write_text("- model\n- data\n")
    elif case == "recipe_bad_yaml":
        recipe.write_text(text + "lora_r: [8\n")
    elif case != "recipe_missing":
        recipe.write_text(text)
    try:
        rc, err = run_cli(capsys, ["train", str(recipe), *extra])
    finally:
        if ro is not None and os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=True)
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("famtune: error: "), err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err


def test_other_trainers_key_names_are_aliases(env):
    tmp, base = env
    recipe = tmp / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": base["model"],
                "train_file": base["data"],
                "gradient_accumulation_steps": 4,
                "num_train_epochs": 2,
                "per_device_train_batch_size": 3,
                "lora_rank": 16,
                "cutoff_len": 512,
            }
        )
    )
    r = load_recipe(str(recipe), parse_overrides(["--lr", "1e-3", "--max-seq-length", "256"]))
    assert (r.model, r.data, r.grad_accum, r.epochs, r.batch_size, r.lora_r, r.learning_rate, r.max_length) == (
        base["model"],
        base["data"],
        4,
        2.0,
        3,
        16,
        1e-3,
        256,
    )
    assert all(v in Recipe.keys() for v in ALIASES.values())


def test_merge_misuse_is_one_line(tmp_path, capsys):
    rc, err = run_cli(capsys, ["merge", str(tmp_path / "adapter"), str(tmp_path / "m"), "--max-shard-size", "0GB"])
    assert rc == 2 and err.count("\n") == 1 and "max shard size '0GB' is too small" in err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    rc, err = run_cli(capsys, ["merge", str(tmp_path / "adapter"), str(tmp_path / "notes")])
    assert rc == 2 and "is not empty and holds no earlier famtune merge" in err
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_every_rule_names_a_recipe_key():
    assert set(RULES) <= {f.name for f in dataclasses.fields(Recipe)}
    with pytest.raises(FamtuneError, match="seed: 4294967296 is out of range"):
        load_recipe(None, {"model": "m", "data": "d", "seed": 2**32})
