"""Experiment tracking through accelerate (TensorBoard read back for real) and plain progress lines
when the output is not a terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import famtune_cli
from famtune.demo import DEMO_DIR
from famtune.errors import FamtuneError
from famtune.tracking import check_trackers, progress_bar_wanted, progress_line, tracker_config


@pytest.mark.slow
def test_tensorboard_scalars_and_plain_log_lines(tiny_qwen25, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = yaml.safe_load((DEMO_DIR / "demo.yaml").read_text())
    recipe.pop("family")
    out = tmp_path / "out"
    recipe.update(
        model=str(tiny_qwen25),
        data=str(DEMO_DIR / "identity.jsonl"),
        eval_data=str(DEMO_DIR / "identity.jsonl"),
        output_dir=str(out),
        max_steps=6,
        logging_steps=2,
        eval_steps=0,
        save_steps=0,
        evaluation_inputs=[],
        report_to=["tensorboard"],
        progress=True,
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    res = famtune_cli("train", tmp_path / "r.yaml")  # stdout/stderr are pipes, not a terminal

    # no tqdm carriage returns in a log; one plain line per logging step instead
    assert "\r" not in res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/6", "4/6", "6/6"]
    assert all(" loss " in ln and " eta " in ln for ln in lines)

    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    runs = list((out / "runs").iterdir())
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/loss"} <= set(scalars)
    read_back = {e.step: e.value for e in events.Scalars("train/loss")}
    assert read_back.keys() == losses.keys() == {2, 4, 6}
    for step, loss in losses.items():
        assert read_back[step] == pytest.approx(loss, rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert [e.value for e in events.Scalars("eval/loss")] == [pytest.approx(summary["eval_loss"], rel=1e-6)]

    # every field a run writes is documented
    doc = (Path(__file__).resolve().parents[1] / "docs" / "users" / "outputs.md").read_text(encoding="utf-8")
    fields = set(summary) | {k for r in logged for k in r}
    fields |= {k for v in summary.values() if isinstance(v, dict) for k in v}
    assert sorted(f for f in fields if f"`{f}`" not in doc) == []


def test_progress_false_still_prints_loss_lines():
    class Tty:
        def isatty(self):
            return True

    assert progress_bar_wanted(True, Tty()) is True
    assert progress_bar_wanted(False, Tty()) is False  # then train prints plain lines
    assert progress_bar_wanted(True, open(__file__)) is False
    assert progress_line(5, 20, 1.23456, 2e-4, 1234.5, 65) == (
        "step 5/20 loss 1.2346 lr 2.00e-04 tokens/s 1,234 elapsed 1:05 eta 3:15"
    )


def test_tracker_names_are_checked():
    assert check_trackers(["TensorBoard", "none"]) == ["tensorboard"]
    with pytest.raises(FamtuneError, match=r"report_to names 'tensorbord'; known trackers: tensorboard, wandb"):
        check_trackers(["tensorbord"])
    import importlib.util

    missing = next(n for n in ("swanlab", "dvclive", "aim", "clearml") if importlib.util.find_spec(n) is None)
    with pytest.raises(FamtuneError, match=f"report_to names {missing}, which is not installed; pip install {missing}"):
        check_trackers([missing])


def test_recipe_becomes_a_flat_tracker_config():
    config = tracker_config({"lora_r": 8, "lora_targets": ["q_proj", "v_proj"], "system": None, "packing": "auto"})
    assert config == {"lora_r": 8, "lora_targets": '["q_proj", "v_proj"]', "system": "null", "packing": "auto"}


def test_every_tracker_name_is_one_accelerate_knows():
    from accelerate.utils import LoggerType

    from famtune.tracking import TRACKER_MODULES

    assert set(TRACKER_MODULES) <= {t.value for t in LoggerType}
