"""What a user sees from the command line: recipes, overrides, data checks and bad input."""

from __future__ import annotations

import json

import pytest

from conftest import famtune_cli
from famtune.errors import FamtuneError
from famtune.recipe import load_recipe, parse_overrides

GOOD = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "I am FamBot."},
            {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Nothing else."},
        ]
    },
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_recipe_overrides_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d.jsonl\nlora_r: 8\nevaluation_inputs: [hi]\n")
    r = load_recipe(str(recipe), parse_overrides(["--lora_r", "32", "--learning-rate=1e-3", "--skip_bad_records"]))
    assert (r.lora_r, r.learning_rate, r.skip_bad_records, r.evaluation_inputs) == (32, 1e-3, True, ["hi"])
    recipe.write_text("model: m\ndata: d.jsonl\nlora_rnak: 8\n")
    with pytest.raises(FamtuneError, match=r"r.yaml: unknown recipe key 'lora_rnak' \(did you mean lora_r"):
        load_recipe(str(recipe))
    recipe.write_text("model: m\ndata: d.jsonl\nbatch_size: two\n")
    with pytest.raises(FamtuneError, match=r"r.yaml: batch_size is 'two' \(str\); expected int"):
        load_recipe(str(recipe))
    recipe.write_text("model: m\n  data: [\n")
    with pytest.raises(FamtuneError, match=r"r.yaml:2: invalid YAML"):
        load_recipe(str(recipe))


def test_data_check_marks_the_supervised_spans(tiny_qwen25, tmp_path):
    res = famtune_cli("data", "check", _jsonl(tmp_path / "d.jsonl", GOOD), "--model", tiny_qwen25)
    out = res.stdout
    assert "family qwen2.5" in out and "masking all_assistant" in out
    assert "2 records -> 2 train + 0 eval samples" in out
    assert "[[I am FamBot.<|im_end|>]]" in out and "[[Nothing else.<|im_end|>]]" in out
    assert "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n[[" in out
    last = famtune_cli("data", "check", tmp_path / "d.jsonl", "--model", tiny_qwen25, "--masking", "last_turn").stdout
    assert "[[Nothing else.<|im_end|>]]" in last and "[[I am FamBot." not in last


def test_malformed_record_is_one_line_naming_file_and_line(tiny_qwen25, tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = [json.dumps(GOOD[1]), json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "{not json"]
    data.write_text("\n".join(rows) + "\n")
    res = famtune_cli("data", "check", data, "--model", tiny_qwen25, check=False)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"famtune: error: {data}:2: ") and '"bot"' in lines[0]

    skipped = famtune_cli("data", "check", data, "--model", tiny_qwen25, "--skip-bad-records")
    assert "skipped 2 bad records" in skipped.stdout
    assert f"{data}:2:" in skipped.stdout and f"{data}:3:" in skipped.stdout


def test_truncation_is_counted_and_never_leaves_zero_supervised_tokens(tiny_qwen25, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    data = _jsonl(tmp_path / "long.jsonl", [GOOD[0], long_prompt, GOOD[1]])
    res = famtune_cli("data", "check", data, "--model", tiny_qwen25, "--max-length", "100")
    # the 200-word prompt leaves no room for its answer: truncated, then dropped, and both are reported
    assert "truncated 1 samples" in res.stdout
    assert "dropped 1 samples" in res.stdout and f"{data}:2" in res.stdout
    assert "3 records -> 2 train" in res.stdout


def test_unknown_masking_policy_names_the_plugin(tiny_qwen25, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_qwen25}\ndata: {_jsonl(tmp_path / 'd.jsonl', GOOD)}\nmasking: everything\n")
    res = famtune_cli("train", recipe, check=False)
    assert res.returncode == 2
    assert "masking 'everything' is not offered by plugin 'qwen' (famtune-qwen 0.1.0)" in res.stderr
    assert "all_assistant, last_turn, train_on_prompt" in res.stderr


def test_offline_hub_id_fails_clearly_and_modelscope_prefix_is_recognised(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", GOOD)
    res = famtune_cli(
        "data", "check", data, "--model", "NoSuchOrg/no-such-model", check=False, env={"HF_HUB_OFFLINE": "1"}
    )
    assert res.returncode == 2
    assert (
        "NoSuchOrg/no-such-model: not a local directory, not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        in res.stderr
    )
    assert len(res.stderr.strip().splitlines()) == 1
    res = famtune_cli("data", "check", data, "--model", str(tmp_path / "missing"), check=False)
    assert "no such model directory" in res.stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["chat", "m", "--max-new-tokens", "0"], "famtune chat: error: argument --max-new-tokens: 0 is out of range"),
        (["chat", "m", "--max-new-tokens", "many"], "famtune chat: error: argument --max-new-tokens: 'many' is not"),
        (["estimate", "r.yaml", "--nproc", "-1"], "famtune estimate: error: argument --nproc: -1 is out of range"),
        (["train"], "famtune train: error: the following arguments are required: recipe"),
        (["trian"], "famtune: error: argument COMMAND: invalid choice: 'trian'"),
    ],
)
def test_usage_mistakes_are_one_line(args, expected):
    res = famtune_cli(*args, check=False)
    assert res.returncode == 2
    assert res.stderr.startswith(expected) and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--help" in res.stderr
