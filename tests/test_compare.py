"""``famtune compare``: two families side by side, a broken model that fails alone, and a re-run
that skips what already finished. Tiny models built by the family plugins; a few steps each."""

from __future__ import annotations

import base64
import json
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from conftest import famtune_cli
from famtune.demo import DEMO_DIR

MODELS = ["tiny:qwen2.5", "tiny:internlm2"]
PROMPTS = ["Who are you?"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """One comparison of two tiny families plus a model no plugin claims, then a re-run."""
    work = tmp_path_factory.mktemp("compare")
    broken = work / "unclaimed-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "nobody-claims-this"}), encoding="utf-8")
    recipe = work / "compare.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": [*MODELS, str(broken)],
                "data": str(DEMO_DIR / "identity.jsonl"),
                "eval_split": 0.15,
                "quantization": "nf4",
                "compute_dtype": "fp32",
                "max_length": 128,
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_targets": "all-linear",
                "learning_rate": 0.01,
                "batch_size": 6,
                "max_steps": 3,
                "logging_steps": 1,
                "evaluation_inputs": PROMPTS,
                "max_new_tokens": 6,
                "progress": False,
                "gradient_checkpointing": False,
            }
        ),
        encoding="utf-8",
    )
    out = work / "out"
    env = {"FAMTUNE_CACHE": str(work / "cache")}
    first = famtune_cli("compare", recipe, "--output", out, check=False, env=env)
    summaries = {m: (out / f"tiny-{m.split(':')[1]}" / "summary.json") for m in MODELS}
    mtimes = {m: p.stat().st_mtime_ns for m, p in summaries.items() if p.exists()}
    second = famtune_cli("compare", recipe, "--output", out, check=False, env=env)
    return {"out": out, "first": first, "second": second, "summaries": summaries, "mtimes": mtimes, "broken": broken}


def results(comparison) -> dict:
    return json.loads((comparison["out"] / "report" / "results.json").read_text(encoding="utf-8"))


def test_two_families_complete_and_the_broken_model_fails_alone(comparison):
    first = comparison["first"]
    assert first.returncode == 1, first.stdout + first.stderr  # one model failed
    assert "compare: 2/3 models trained" in first.stdout
    rows = {m["model"]: m for m in results(comparison)["models"]}
    assert [rows[m]["status"] for m in MODELS] == ["ok", "ok"]
    failed = rows[str(comparison["broken"])]
    assert failed["status"] == "failed"
    # The claim's own one-line error, naming the unclaimed model type.
    assert "nobody-claims-this" in failed["error"] or "no installed plugin" in failed["error"], failed["error"]
    assert "\n" not in failed["error"]


def test_progress_names_each_model_with_its_position(comparison):
    out = comparison["first"].stdout
    for i, m in enumerate(MODELS, 1):
        assert f"compare [{i}/3] {m}" in out
    assert "ETA" in out


def test_every_row_has_the_figures_of_its_run(comparison):
    rows = {m["model"]: m for m in results(comparison)["models"]}
    for spec in MODELS:
        m = rows[spec]
        run = Path(m["dir"])
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        family = spec.split(":")[1]
        assert m["family"] == family
        dist = m["plugin"]["distribution"]
        assert m["plugin"]["version"] == metadata.version(dist)
        assert m["adapter_bytes"] == (run / "adapter_model.safetensors").stat().st_size
        assert m["trainable_parameters"] == summary["parameters"]["trainable"] > 0
        assert m["parameters"] > m["trainable_parameters"]
        assert m["final_train_loss"] == summary["final_loss"]
        assert m["eval_loss"] == summary["eval_loss"] is not None
        assert m["tokens_per_s"] > 0 and m["peak_rss_mib"] > 0 and m["wall_s"] > 0
        assert [s for s, _ in m["curve"]["train"]] == [1, 2, 3]
        assert [a["input"] for a in m["answers"]["before"]] == PROMPTS
        assert [a["input"] for a in m["answers"]["after"]] == PROMPTS and m["answers"]["after_step"] == 3
        assert m["resolved_recipe"]["model"].endswith(f"tiny-bases/{family}")


def test_report_shows_rows_curves_answers_and_how_to_repeat(comparison):
    report = comparison["out"] / "report"
    md = (report / "report.md").read_text(encoding="utf-8")
    page = (report / "report.html").read_text(encoding="utf-8")
    png = (report / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert base64.b64encode(png).decode() in page  # self-contained: the plot is embedded
    assert "<img" in page and "src='data:image/png;base64," in page
    for m in results(comparison)["models"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| {m['model']} |"))
        if m["status"] == "ok":
            assert f"{m['plugin']['distribution']} {m['plugin']['version']}" in row and "| ok" in row
            for gen in m["answers"]["before"] + m["answers"]["after"]:
                assert gen["output"].strip()[:3] in md or not gen["output"].strip()
        else:
            assert "FAILED" in row and "nobody-claims-this" in row
            assert "FAILED" in page
    assert "### Who are you?" in md and "before (step 0)" in page
    repeat = yaml.safe_load((report / "recipe.yaml").read_text(encoding="utf-8"))
    assert repeat["models"][:2] == MODELS and repeat["max_steps"] == 3
    for dist in ("famtune-qwen", "famtune-internlm2"):
        assert f"| {dist} | {metadata.version(dist)} |" in md


def test_rerun_skips_finished_models_and_retries_the_failed_one(comparison):
    second = comparison["second"].stdout
    for i, m in enumerate(MODELS, 1):
        assert f"compare [{i}/3] {m}: finished by an earlier run, skipped" in second
    assert "compare [3/3]" in second and "FAILED" in second
    for m, path in comparison["summaries"].items():
        assert path.stat().st_mtime_ns == comparison["mtimes"][m]  # not trained again
    rows = {m["model"]: m for m in results(comparison)["models"]}
    assert all(rows[m]["status"] == "ok" and rows[m]["skipped"] for m in MODELS)


def test_built_in_comparison_models_load_like_real_checkpoints(tmp_path, monkeypatch):
    """Every tiny:<family> of the bundled comparison is claimed by its own plugin and encodes a
    conversation exactly as its chat template renders it."""
    from famtune.checkpoint import open_checkpoint
    from famtune.compare import DEMO_RECIPE, build_tiny, tiny_corpus

    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    recipe = yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8"))
    corpus = tiny_corpus({"data": str(DEMO_DIR / recipe["data"]), "evaluation_inputs": recipe["evaluation_inputs"]})
    messages = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am FamBot, an AI assistant fine-tuned with famtune."},
    ]
    families = [spec.removeprefix("tiny:") for spec in recipe["models"]]
    from famtune.plugins import get_plugins

    assert len({get_plugins().claim({}, "", family=f).info.name for f in families}) == 4  # one per plugin
    for family in families:
        path = build_tiny(family, tmp_path, corpus)
        ckpt = open_checkpoint(str(path), family=family)
        if (path / "config.json").read_text(encoding="utf-8").count("auto_map"):  # original layout: no forcing
            assert open_checkpoint(str(path)).family.name == family
        tok = ckpt.load_tokenizer()
        enc = ckpt.family.encode(tok, messages, "all_assistant", add_generation_prompt=False)
        rendered = tok.apply_chat_template(messages, chat_template=ckpt.family.chat_template(), tokenize=True)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert list(rendered) == list(enc.input_ids), family
        stop = ckpt.family.generation_defaults(tok).stop_ids
        assert any(label in stop for label in enc.labels if label != -100), family  # the end of turn is learnt
