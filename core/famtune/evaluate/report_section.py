"""Before/after task scores for the ``famtune compare`` report: one row per model with each
metric as base → tuned (delta), and the questions whose answer changed, side by side."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

BEFORE_FILE = "eval-base.json"
AFTER_FILE = "eval-tuned.json"
# (label, how to read the figure from an eval result, is it a fraction)
MCQ_METRICS = (
    ("MCQ accuracy (log-likelihood)", lambda r: r["loglikelihood"]["accuracy"], True),
    ("MCQ accuracy (greedy answer)", lambda r: r["generation"]["accuracy"], True),
)
QA_METRICS = (
    ("exact match", lambda r: r["exact_match"]["accuracy"], True),
    ("BLEU", lambda r: r["bleu"], False),
    ("ROUGE-L", lambda r: r["rougeL"], False),
)
MAX_CHANGED = 20  # changed answers shown per model; results.json keeps them all


def md_escape(text: str) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", "<br>") or " "


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_task_eval(run_dir: str | Path) -> dict[str, Any] | None:
    """The base (step 0) and tuned eval results a training run wrote, or None without an eval task."""
    before, after = _load(Path(run_dir) / BEFORE_FILE), _load(Path(run_dir) / AFTER_FILE)
    latest = after or before
    if latest is None:
        return None
    task = latest["task"]
    metrics = MCQ_METRICS if task == "mcq" else QA_METRICS
    figures = []
    for label, get, fraction in metrics:
        b = get(before) if before else None
        a = get(after) if after else None
        figures.append(
            {
                "metric": label,
                "base": b,
                "tuned": a,
                "fraction": fraction,
                "delta": a - b if a is not None and b is not None else None,
            }
        )
    extra = {}
    if task == "mcq":
        extra["unparseable"] = {
            "base": (before or {}).get("generation", {}).get("unparseable"),
            "tuned": (after or {}).get("generation", {}).get("unparseable"),
        }
    return {
        "task": task,
        "data": latest["data"],
        "figures": figures,
        "changed": changed_answers(before, after),
        **extra,
    }


def changed_answers(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Questions whose answer differs between base and tuned model."""
    if not before or not after:
        return []
    out = []
    for b, a in zip(before["items"], after["items"]):
        if before["task"] == "mcq":
            bt = (
                f"{b['generation']['prediction'] or '?'} (log-lik {b['loglikelihood']['prediction']}): "
                f"{b['generation']['text']}"
            )
            at = (
                f"{a['generation']['prediction'] or '?'} (log-lik {a['loglikelihood']['prediction']}): "
                f"{a['generation']['text']}"
            )
            if (b["generation"]["prediction"], b["loglikelihood"]["prediction"], b["generation"]["text"]) == (
                a["generation"]["prediction"],
                a["loglikelihood"]["prediction"],
                a["generation"]["text"],
            ):
                continue
        else:
            bt, at = b["prediction"], a["prediction"]
            if bt == at:
                continue
        out.append({"line": a["line"], "question": a["question"], "reference": a["answer"], "base": bt, "tuned": at})
    return out


def _fmt(v: float | None, fraction: bool, signed: bool = False) -> str:
    if v is None:
        return "-"
    if fraction:
        return f"{v * 100:+.1f} pt" if signed else f"{v:.1%}"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def cell(f: dict[str, Any]) -> str:
    return f"{_fmt(f['base'], f['fraction'])} → {_fmt(f['tuned'], f['fraction'])} ({_fmt(f['delta'], f['fraction'], True)})"


def tables(models: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[tuple[str, list[list[str]]]]]:
    """(header, one row per model with a task eval, per model the changed answers as rows)."""
    have = [m for m in models if m.get("task_eval")]
    labels: list[str] = []
    for m in have:
        labels += [f["metric"] for f in m["task_eval"]["figures"] if f["metric"] not in labels]
    header = ["model", "data"] + [f"{lab} base → tuned (Δ)" for lab in labels] + ["unparseable base → tuned"]
    rows, changed = [], []
    for m in have:
        te = m["task_eval"]
        by = {f["metric"]: f for f in te["figures"]}
        un = te.get("unparseable")
        rows.append(
            [m["model"], Path(te["data"]).name]
            + [cell(by[lab]) if lab in by else "-" for lab in labels]
            + [f"{un['base']} → {un['tuned']}" if un else "-"]
        )
        changed.append(
            (
                m["model"],
                [
                    [str(c["line"]), c["question"], str(c["reference"]), c["base"], c["tuned"]]
                    for c in te["changed"][:MAX_CHANGED]
                ],
            )
        )
    return header, rows, changed


CHANGED_HEADER = ["line", "question", "reference", "base (step 0)", "tuned"]


def markdown_lines(models: list[dict[str, Any]]) -> list[str]:
    header, rows, changed = tables(models)
    if not rows:
        return []
    lines = ["## Task evaluation: base → tuned", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in rows] + [""]
    for model, items in changed:
        lines += [f"### Answers that changed: {model}", ""]
        if not items:
            lines += ["No answer changed.", ""]
            continue
        lines += ["| " + " | ".join(CHANGED_HEADER) + " |", "|" + "---|" * len(CHANGED_HEADER)]
        lines += ["| " + " | ".join(md_escape(c) for c in r) + " |" for r in items] + [""]
    return lines


def html_parts(models: list[dict[str, Any]], table) -> list[str]:
    """The same section for report.html, drawn with the report's own ``table(header, rows, cls)``."""
    header, rows, changed = tables(models)
    if not rows:
        return []
    parts = ["<h2>Task evaluation: base → tuned</h2>", table(header, rows)]
    for model, items in changed:
        parts.append(f"<h3>Answers that changed: {html.escape(model)}</h3>")
        parts.append(table(CHANGED_HEADER, items, "answers") if items else "<p>No answer changed.</p>")
    return parts
