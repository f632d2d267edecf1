"""The comparison report's presentation: overall ranking with ties, eval sample counts, the demo-model
banner, per-run loss plots and a legend that stays off the data. Built from run directories as
``famtune train`` leaves them (summary.json, metrics.jsonl, famtune.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from famtune.compare import ModelRun
from famtune.report import RUN_CURVES_PNG, plot_curves, ranking, write_report


def _run(
    root: Path, spec: str, name: str, final: float, eval_loss: float | None, eval_samples: int, status: str = "ok"
) -> ModelRun:
    out = root / name
    out.mkdir(parents=True)
    if status == "ok":
        family = spec.split(":")[-1]
        (out / "summary.json").write_text(
            json.dumps(
                {
                    "steps": 4,
                    "final_loss": final,
                    "eval_loss": eval_loss,
                    "tokens_per_s": 100.0,
                    "peak_rss_mib": 900.0,
                    "peak_accelerator_mib": None,
                    "parameters": {"trainable": 10, "total": 100},
                    "data": {"train_samples": 15, "eval_samples": eval_samples},
                    "family": {
                        "plugin": family,
                        "distribution": f"famtune-{family}",
                        "version": "0.1.0",
                        "family": family,
                    },
                }
            )
        )
        records = [{"step": s, "loss": final * (5 - s + 1)} for s in range(1, 5)]
        if eval_loss is not None:
            records.append({"step": 4, "eval_loss": eval_loss})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "famtune.json").write_text(json.dumps({"family": family, "masking": "all_assistant"}))
    family = spec.split(":")[-1] if status == "ok" else None
    return ModelRun(
        spec=spec,
        name=name,
        out=out,
        family=family,
        status=status,
        error="" if status == "ok" else "no plugin claims it",
        wall_s=12.0,
    )


SHARED = {"data": "identity.jsonl", "max_steps": 4, "evaluation_inputs": []}


@pytest.fixture()
def report(tmp_path):
    runs = [
        _run(tmp_path, "tiny:qwen2.5", "tiny-qwen2.5", 0.9, 0.51234, 3),
        _run(tmp_path, "tiny:internlm2", "tiny-internlm2", 0.8, 0.51231, 3),  # ties qwen2.5 at 4 decimals
        _run(tmp_path, "tiny:chatglm3", "tiny-chatglm3", 0.7, 0.70000, 3),
        _run(tmp_path, "/models/broken", "broken", 0, None, 0, status="failed"),
    ]
    out = write_report(tmp_path, SHARED, [r.spec for r in runs], runs)
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_ranking_flags_ties_and_puts_failures_last(report):
    out, results = report
    rank = results["ranking"]
    assert rank["criterion"] == "eval loss"
    assert [(r["model"], r["rank"], r["tie"]) for r in rank["rows"]] == [
        ("tiny:internlm2", 1, True),
        ("tiny:qwen2.5", 1, True),
        ("tiny:chatglm3", 3, False),
        ("/models/broken", None, False),
    ]
    assert rank["winners"] == ["tiny:internlm2", "tiny:qwen2.5"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Tied for best by eval loss: tiny:internlm2, tiny:qwen2.5." in md
    assert "| 1 (tie) | tiny:qwen2.5 | qwen2.5 | 0.5123 | 3 |" in md
    assert "| - | /models/broken | - | failed | - |" in md


def test_ranking_without_eval_uses_train_loss_and_names_one_winner(tmp_path):
    runs = [_run(tmp_path, "a:x", "a", 0.9, None, 0), _run(tmp_path, "b:y", "b", 0.4, None, 0)]
    out = write_report(tmp_path, SHARED, [r.spec for r in runs], runs)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["ranking"]["criterion"] == "final train loss" and results["ranking"]["winners"] == ["b:y"]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "Overall best by final train loss: b:y." in md
    assert "No eval set: models are ranked by their final train loss" in md
    assert "random-weight" not in md  # no tiny:* model, no demo banner


def test_demo_banner_and_eval_sample_counts(report):
    out, results = report
    page = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    banner = "tiny:qwen2.5, tiny:internlm2, tiny:chatglm3 are tiny random-weight models built locally"
    assert banner in md and banner in page and "class='banner'" in page
    assert "The eval set has 3 samples" in md
    assert "Samples per model (train + eval): 15 + 3." in md


def test_per_run_plots_are_written_and_embedded(report):
    out, _ = report
    png = (out / RUN_CURVES_PNG).read_bytes()
    assert png.startswith(b"\x89PNG")
    import base64

    assert base64.b64encode(png).decode() in (out / "report.html").read_text(encoding="utf-8")
    assert f"![loss per run]({RUN_CURVES_PNG})" in (out / "report.md").read_text(encoding="utf-8")


def test_legend_is_outside_the_data(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to measure it
    models = [{"model": f"m{i}", "curve": {"train": [[1, 2.0], [2, 1.0]], "eval": [[2, 1.5]]}} for i in range(4)]
    plot_curves(models, tmp_path / "c.png")
    fig = kept[0]
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer))
    assert ax.get_yscale() == "log" and ax.get_title()


def test_ranking_of_nothing():
    assert ranking([])["winners"] == []
