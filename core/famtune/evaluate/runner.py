"""``famtune eval``: load a model the way chat does, score an eval file, write eval.json and eval.md."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError
from famtune.evaluate.records import TASKS, read_eval_file
from famtune.evaluate.scoring import EvalSettings, ScoringModel, evaluate_mcq, evaluate_qa

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
SPEC_KEYS = {"data": str, "task": str, "batch_size": int, "max_new_tokens": int, "choice_format": str, "limit": int}


def parse_eval_spec(spec: Any, where: str) -> dict[str, Any] | None:
    """A recipe's ``eval:`` section, checked: ``{data: FILE, task: mcq|qa, batch_size, max_new_tokens,
    choice_format, limit}``."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise FamtuneError(f"{where}: eval is {spec!r}; expected a mapping like {{data: test.jsonl, task: mcq}}")
    for key, value in spec.items():
        if key not in SPEC_KEYS:
            raise FamtuneError(f"{where}: unknown eval key {key!r}; expected {', '.join(SPEC_KEYS)}")
        if not isinstance(value, SPEC_KEYS[key]) or isinstance(value, bool):
            raise FamtuneError(f"{where}: eval.{key} is {value!r}; expected {SPEC_KEYS[key].__name__}")
    if not spec.get("data"):
        raise FamtuneError(f"{where}: eval has no data; set eval.data to an MCQ or QA file")
    if spec.get("task", "mcq") not in TASKS:
        raise FamtuneError(f"{where}: eval.task is {spec['task']!r}; expected {' or '.join(TASKS)}")
    return {"task": "mcq", **spec}


def settings_from(spec: dict[str, Any], progress: bool = True, seed: int = 0) -> EvalSettings:
    kw = {k: spec[k] for k in ("batch_size", "max_new_tokens", "choice_format") if k in spec}
    kw.setdefault("max_new_tokens", 16 if spec.get("task", "mcq") == "mcq" else 128)
    return EvalSettings(progress=progress, seed=seed, **kw)


def score_file(sm: ScoringModel, data: str, task: str, settings: EvalSettings, limit: int = 0) -> dict[str, Any]:
    items = read_eval_file(data, task)
    if not items:
        raise FamtuneError(f"{data}: no eval records; add at least one")
    in_file = len(items)
    if limit:
        items = items[:limit]
    result = (evaluate_mcq if task == "mcq" else evaluate_qa)(sm, items, settings)
    return {"data": str(data), "questions_in_file": in_file, **result}


def headline(result: dict[str, Any]) -> list[str]:
    """The figures of one eval result as short lines."""

    def acc(a: dict[str, Any]) -> str:
        lo, hi = a["ci95"]
        return f"{a['accuracy']:.1%} ({a['correct']}/{a['total']}, 95% CI {lo:.1%}-{hi:.1%})"

    if result["task"] == "mcq":
        g = result["generation"]
        lines = [
            f"accuracy by option log-likelihood: {acc(result['loglikelihood'])}",
            f"accuracy by greedy answer:         {acc(g)}; unparseable answers: {g['unparseable']}",
        ]
    else:
        lines = [
            f"exact match: {acc(result['exact_match'])}",
            f"BLEU: {result['bleu']:.2f}",
            f"ROUGE-L F1: {result['rougeL']:.4f}",
        ]
    left = result.get("questions_in_file", result["questions"]) - result["questions"]
    lines.append(
        f"{result['questions']} questions"
        + (f" (--limit: {left} more in the file not scored)" if left else "")
        + f" in {result['seconds']:.1f}s "
        f"({result['questions_per_s']:.2f} questions/s)"
    )
    return lines


def render_markdown(result: dict[str, Any], title: str) -> str:
    from famtune.evaluate.report_section import md_escape

    out = [f"# {title}", "", f"Data: `{result['data']}` ({result['questions']} questions, task {result['task']})", ""]
    out += [f"- {line}" for line in headline(result)] + [""]
    if result["task"] == "mcq":
        out += ["| line | answer | log-likelihood | greedy answer | generated text |", "|---|---|---|---|---|"]
        for it in result["items"]:
            out.append(
                f"| {it['line']} | {it['answer']} | {it['loglikelihood']['prediction']} | "
                f"{it['generation']['prediction'] or '(unparseable)'} | {md_escape(it['generation']['text'])} |"
            )
    else:
        out += ["| line | reference | answer | exact | ROUGE-L |", "|---|---|---|---|---|"]
        for it in result["items"]:
            out.append(
                f"| {it['line']} | {md_escape(it['answer'])} | {md_escape(it['prediction'])} | "
                f"{int(it['exact_match'])} | {it['rougeL']:.3f} |"
            )
    return "\n".join(out) + "\n"


def write_result(result: dict[str, Any], out_dir: str | Path, title: str, stem: str = "eval") -> Path:
    """``STEM.json`` (every figure and answer) and ``STEM.md`` (the summary) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(render_markdown(result, title), encoding="utf-8")
    return out


def run_eval(
    model: str,
    data: str,
    task: str,
    *,
    adapter: str | None = None,
    output: str | None = None,
    settings: EvalSettings | None = None,
    limit: int = 0,
    trust_remote_code: bool = False,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Load ``model`` (+ ``adapter``) on chat's path, score ``data``, write the result to ``output``."""
    from famtune.chat import load_chat_model

    settings = settings or EvalSettings()
    read_eval_file(data, task)  # a bad file stops before minutes of model loading
    t0 = time.perf_counter()
    session = load_chat_model(model, adapter, trust_remote_code=trust_remote_code)
    log(
        f"eval: {model}" + (f" + adapter {adapter}" if adapter else "") + f" ({session.family.name}), "
        f"loaded in {time.perf_counter() - t0:.1f}s"
    )
    result = score_file(ScoringModel.from_session(session), data, task, settings, limit)
    result.update({"model": model, "adapter": adapter, "family": session.family.describe()})
    out = Path(output or (Path(adapter) / "eval" if adapter else "famtune-eval"))
    write_result(result, out, f"famtune eval: {Path(model).name}" + (f" + {Path(adapter).name}" if adapter else ""))
    for line in headline(result):
        log(f"eval: {line}")
    log(f"eval: wrote {out / EVAL_JSON} and {out / EVAL_MD}")
    return result
