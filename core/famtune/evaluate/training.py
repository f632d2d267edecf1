"""Before/after scores inside ``famtune train``: with a recipe ``eval:`` section, the model is
scored at step 0 (the base: LoRA's B matrices start at zero) and at the end (the adapter), into
``eval-base.json`` / ``eval-tuned.json`` beside the adapter and ``task_eval`` in summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from famtune.evaluate.report_section import AFTER_FILE, BEFORE_FILE
from famtune.evaluate.runner import headline, score_file, settings_from, write_result
from famtune.evaluate.scoring import ScoringModel


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a result (no per-question detail) for summary.json."""
    keep = (
        "task",
        "data",
        "questions",
        "loglikelihood",
        "generation",
        "exact_match",
        "bleu",
        "rougeL",
        "questions_per_s",
    )
    return {k: result[k] for k in keep if k in result}


def score_during_training(trainer: Any, stage: str) -> dict[str, Any] | None:
    """Score the trainer's model on the recipe's eval task; ``stage`` is ``base`` or ``tuned``.

    Returns summary.json's ``task_eval`` entry at the ``tuned`` stage (with the base scores of the
    same run, also after ``--resume``), else None."""
    spec = trainer.recipe.eval
    if not spec or not trainer.accelerator.is_main_process:
        return None
    sm = ScoringModel(
        trainer.accelerator.unwrap_model(trainer.model),
        trainer.tokenizer,
        trainer.family,
        list(trainer.generation.stop_ids),
        trainer.pad_id,
        trainer.recipe.system,
    )
    result = score_file(
        sm,
        spec["data"],
        spec.get("task", "mcq"),
        settings_from(spec, progress=False, seed=trainer.recipe.seed),
        spec.get("limit", 0),
    )
    name = BEFORE_FILE if stage == "base" else AFTER_FILE
    write_result(
        result,
        trainer.out,
        f"famtune train: {stage} model on {Path(spec['data']).name}",
        stem=name.removesuffix(".json"),
    )
    for line in headline(result):
        trainer.log(f"[{stage}] {line}")
    if stage == "base":
        return None
    try:
        base = json.loads((trainer.out / BEFORE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        base = None
    return {
        "base": _figures(base) if base else None,
        "tuned": _figures(result),
        "files": {"base": BEFORE_FILE, "tuned": AFTER_FILE},
    }
