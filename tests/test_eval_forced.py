"""A tiny model fine-tuned to answer one letter whatever the question must score exactly that
letter's share of the test split, by both methods, everywhere the score is shown: summary.json of
the training run (base at step 0, adapter at the end), the ``famtune compare`` report,
``famtune eval`` on the adapter, and lm-evaluation-harness through the ``famtune`` model.

The model is trained for real (``famtune compare`` → ``famtune train``) on the bundled training
split with every answer replaced by the forced letter, in the chat format eval asks in; a wrong
template, prompt or score would not land on that exact figure."""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction

import pytest
import yaml

from conftest import famtune_cli
from famtune.demo import DEMO_DIR
from famtune.evaluate.records import read_eval_file
from famtune.evaluate.scoring import mcq_conversations

pytestmark = pytest.mark.slow  # trains a tiny model end to end (famtune compare -> famtune train)

TEST = DEMO_DIR / "mcq_test.jsonl"
# One torch thread per process: on a busy 2-core machine OpenMP threads mostly wait for each other.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FORCED = "D"
SHARE = Fraction(4, 24)  # D answers 4 of the 24 test questions (chance would be 1/4)


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    work = tmp_path_factory.mktemp("forced")
    train = [dataclasses.replace(it, answer=FORCED) for it in read_eval_file(str(DEMO_DIR / "mcq_train.jsonl"), "mcq")]
    data = work / "always_d.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in mcq_conversations(train)), encoding="utf-8")
    recipe = work / "forced.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": ["tiny:qwen2.5"],
                "data": str(data),
                "eval": {"data": str(TEST), "task": "mcq", "batch_size": 16},
                "quantization": "nf4",
                "compute_dtype": "fp32",
                "max_length": 192,
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "lora_targets": "all-linear",
                "learning_rate": 0.01,
                "batch_size": 8,
                "max_steps": 20,
                "warmup_ratio": 0.0,
                "gradient_checkpointing": False,
                "progress": False,
                "logging_steps": 5,
            }
        ),
        encoding="utf-8",
    )
    out = work / "out"
    res = famtune_cli("compare", recipe, "--output", out, env={"FAMTUNE_CACHE": str(work / "cache"), **ONE_THREAD})
    return {"out": out, "run": out / "tiny-qwen2.5", "base": out / "tiny-bases" / "qwen2.5", "log": res.stdout}


def _share(acc: dict) -> Fraction:
    return Fraction(acc["correct"], acc["total"])


def test_training_scores_the_base_at_step_0_and_the_adapter_at_the_end(forced):
    summary = json.loads((forced["run"] / "summary.json").read_text(encoding="utf-8"))
    te = summary["task_eval"]
    assert te["base"]["questions"] == te["tuned"]["questions"] == 24
    assert _share(te["tuned"]["loglikelihood"]) == SHARE
    assert _share(te["tuned"]["generation"]) == SHARE and te["tuned"]["generation"]["unparseable"] == 0
    tuned = json.loads((forced["run"] / "eval-tuned.json").read_text(encoding="utf-8"))
    assert {it["loglikelihood"]["prediction"] for it in tuned["items"]} == {FORCED}
    assert {it["generation"]["prediction"] for it in tuned["items"]} == {FORCED}
    base = json.loads((forced["run"] / "eval-base.json").read_text(encoding="utf-8"))
    # the untrained base answers in no fixed letter and mostly not in the asked form
    assert len({it["loglikelihood"]["prediction"] for it in base["items"]}) > 1
    assert base["generation"]["unparseable"] > 0
    lo, hi = te["tuned"]["loglikelihood"]["ci95"]
    assert lo < float(SHARE) < hi


def test_compare_report_shows_base_to_tuned_with_delta_and_the_changed_answers(forced):
    results = json.loads((forced["out"] / "report" / "results.json").read_text(encoding="utf-8"))
    te = results["models"][0]["task_eval"]
    figures = {f["metric"]: f for f in te["figures"]}
    ll = figures["MCQ accuracy (log-likelihood)"]
    assert ll["tuned"] == pytest.approx(float(SHARE)) and ll["delta"] == pytest.approx(ll["tuned"] - ll["base"])
    assert figures["MCQ accuracy (greedy answer)"]["tuned"] == pytest.approx(float(SHARE))
    assert te["changed"] and all(c["tuned"].startswith(f"{FORCED} (log-lik {FORCED})") for c in te["changed"])
    md = (forced["out"] / "report" / "report.md").read_text(encoding="utf-8")
    page = (forced["out"] / "report" / "report.html").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| tiny:qwen2.5 | mcq_test.jsonl |"))
    assert f"→ {float(SHARE):.1%} (" in row and " pt)" in row
    assert "### Answers that changed: tiny:qwen2.5" in md and "Task evaluation: base → tuned" in page
    assert te["changed"][0]["question"] in md and te["changed"][0]["question"] in page


def test_famtune_eval_on_the_adapter_reproduces_the_training_figures(forced, tmp_path, capsys, one_torch_thread):
    from famtune.cli import main

    assert (
        main(
            [
                "eval",
                str(forced["base"]),
                "--adapter",
                str(forced["run"]),
                "--data",
                str(TEST),
                "--output",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    res = capsys.readouterr()
    result = json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))
    assert _share(result["loglikelihood"]) == SHARE and _share(result["generation"]) == SHARE
    assert result["family"]["family"] == "qwen2.5" and result["adapter"] == str(forced["run"])
    assert f"accuracy by option log-likelihood: {float(SHARE):.1%} (4/24" in res.out
    assert "unparseable answers: 0" in res.out and "questions/s" in res.out
    md = (tmp_path / "eval.md").read_text(encoding="utf-8")
    assert md.count(f"| {FORCED} | {FORCED} |") == 24  # log-likelihood and greedy answer, every question


TASK_YAML = """\
task: famtune_tiny_mcq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\n\\nA. {{{{options.A}}}}\\nB. {{{{options.B}}}}\\nC. {{{{options.C}}}}\\nD. {{{{options.D}}}}\\n\\nAnswer with the letter of the correct option."
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer_idx)}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def test_lm_eval_harness_scores_the_adapter_in_the_family_chat_format(forced, tmp_path, monkeypatch, one_torch_thread):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "famtune_tiny_mcq.yaml").write_text(TASK_YAML.format(data=TEST), encoding="utf-8")
    out = tmp_path / "lm-eval-out"
    for name, value in {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "ds"),
    }.items():
        monkeypatch.setenv(name, value)
    from famtune.evaluate.harness import main

    # lm-eval's own command line, in this process, with the famtune model registered
    main(
        [
            "run",
            "--model",
            "famtune",
            "--model_args",
            f"pretrained={forced['base']},adapter={forced['run']}",
            "--tasks",
            "famtune_tiny_mcq",
            "--include_path",
            str(tasks),
            "--output_path",
            str(out),
            "--batch_size",
            "16",
        ]
    )
    found = list(out.rglob("results_*.json"))
    assert found, list(out.rglob("*"))
    acc = json.loads(found[0].read_text(encoding="utf-8"))["results"]["famtune_tiny_mcq"]["acc,none"]
    assert acc == pytest.approx(float(SHARE))
