"""The report of a ``famtune compare`` run: ``report.md``, a self-contained ``report.html``,
``results.json``, ``loss_curves.png`` and the ``recipe.yaml`` that repeats the comparison.

Everything is read from the per-model run directories (``summary.json``, ``metrics.jsonl``,
``famtune.json``, the adapter), so a report can be rebuilt from finished runs at any time.
"""
from __future__ import annotations

import base64
import html
import json
import platform
import struct
import time
import unicodedata
from pathlib import Path
from typing import Any

import famtune
from famtune.evaluate.report_section import html_parts as task_eval_html
from famtune.evaluate.report_section import markdown_lines as task_eval_markdown
from famtune.evaluate.report_section import read_task_eval

REPORT_DIR = "report"
CURVES_PNG = "loss_curves.png"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
COLUMNS = ("model", "family", "masking", "plugin", "parameters", "trainable", "adapter", "final train loss", "eval loss",
           "tokens/s", "peak memory", "wall time", "status")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _records(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def count_parameters(model_dir: str | None) -> int | None:
    """Parameters of a checkpoint, from its safetensors headers (no weights are loaded)."""
    if not model_dir or not Path(model_dir).is_dir():
        return None
    total, found = 0, False
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total, found = total + n, True
    return total if found else None


def model_result(run: Any) -> dict[str, Any]:
    """One model's row, curves, answers and resolved recipe."""
    import yaml

    d = Path(run.out)
    summary = _read_json(d / "summary.json") if run.status in ("ok", "skipped") else None
    meta = _read_json(d / "famtune.json") or {}
    plugin = (summary or {}).get("family") or run.plugin or {}
    records = _records(d) if summary else []
    gens = [r for r in records if r.get("generations")]
    before = next((r for r in gens if r["step"] == 0), None)
    after = next((r for r in reversed(gens) if r["step"] > 0), None)
    adapter = d / "adapter_model.safetensors"
    recipe_file = d / "recipe.yaml" if (d / "recipe.yaml").is_file() and summary else d / "compare-input.yaml"
    try:
        resolved = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        resolved = None
    s = summary or {}
    return {
        "model": run.spec, "name": run.name, "dir": str(d),
        "family": plugin.get("family") or run.family,
        "plugin": {k: plugin.get(k) for k in ("plugin", "distribution", "version")} if plugin else None,
        "parameters": count_parameters(meta.get("base_path")) if summary else None,
        "trainable_parameters": (s.get("parameters") or {}).get("trainable"),
        "adapter_bytes": adapter.stat().st_size if summary and adapter.is_file() else None,
        "final_train_loss": s.get("final_loss"), "eval_loss": s.get("eval_loss"),
        "tokens_per_s": s.get("tokens_per_s"), "peak_rss_mib": s.get("peak_rss_mib"),
        "peak_accelerator_mib": s.get("peak_accelerator_mib"), "steps": s.get("steps"),
        "wall_s": run.wall_s, "status": "ok" if run.status == "skipped" else run.status,
        "skipped": run.status == "skipped", "error": run.error, "note": run.note,
        "masking": meta.get("masking"),
        "curve": {"train": [[r["step"], r["loss"]] for r in records if "loss" in r],
                  "eval": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r]},
        "answers": {"before": (before or {}).get("generations") or [], "after": (after or {}).get("generations") or [],
                    "after_step": (after or {}).get("step")},
        "resolved_recipe": resolved,
        "task_eval": read_task_eval(d) if summary else None,
    }


def environment() -> dict[str, Any]:
    from importlib import metadata

    from famtune.plugins import get_plugins

    plugins = get_plugins()
    libs = {}
    for lib in LIBRARIES:
        try:
            libs[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            libs[lib] = None
    return {
        "famtune_version": famtune.__version__, "python": platform.python_version(), "libraries": libs,
        "plugins": [{"name": n, "distribution": i.distribution, "version": i.version,
                     "families": plugins.families_of(n)} for n, i in plugins.infos.items()],
    }


# -- formatting ------------------------------------------------------------------------------------

def _num(v: Any, fmt: str = "{:,}") -> str:
    return "-" if v is None else fmt.format(v)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _memory(m: dict[str, Any]) -> str:
    if m["peak_rss_mib"] is None:
        return "-"
    acc = m.get("peak_accelerator_mib")
    return f"{m['peak_rss_mib']:.0f} MiB RSS" + (f", {acc:.0f} MiB GPU" if acc else "")


def row_cells(m: dict[str, Any]) -> list[str]:
    p = m["plugin"] or {}
    status = "ok" + (" (earlier run)" if m["skipped"] else "") if m["status"] == "ok" else f"FAILED: {m['error']}"
    return [m["model"], m["family"] or "-", m["masking"] or "-",
            f"{p.get('plugin')} ({p.get('distribution')} {p.get('version')})" if p.get("plugin") else "-",
            _num(m["parameters"]), _num(m["trainable_parameters"]), _bytes(m["adapter_bytes"]),
            _num(m["final_train_loss"], "{:.4f}"), _num(m["eval_loss"], "{:.4f}"), _num(m["tokens_per_s"], "{:,.0f}"),
            _memory(m), _num(m["wall_s"], "{:.0f} s"), status]


def highlights(models: list[dict[str, Any]]) -> list[str]:
    """One line per criterion naming the best model, so a reader can choose at a glance."""
    ok = [m for m in models if m["status"] == "ok"]
    out = []
    for label, key, fmt, best in (("lowest eval loss", "eval_loss", "{:.4f}", min),
                                  ("lowest final train loss", "final_train_loss", "{:.4f}", min),
                                  ("fastest training", "tokens_per_s", "{:,.0f} tokens/s", max),
                                  ("lowest peak memory", "peak_rss_mib", "{:.0f} MiB RSS", min),
                                  ("smallest adapter", "adapter_bytes", None, min)):
        have = [m for m in ok if m[key] is not None]
        if have:
            m = best(have, key=lambda x: x[key])
            value = _bytes(m[key]) if fmt is None else fmt.format(m[key])
            out.append(f"{label}: {m['model']} ({m['family']}, {value})")
    return out


def _clean(text: str) -> str:
    """An answer for display: outer whitespace dropped (some families open a reply with a header
    newline), control characters of untrained models shown as escapes."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}"
                   for c in (text or "").strip())


def plot_curves(models: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, m in enumerate(models):
        color = f"C{i % 10}"
        if m["curve"]["train"]:
            ax.plot(*zip(*m["curve"]["train"]), color=color, label=f"{m['model']} train")
        if m["curve"]["eval"]:
            ax.plot(*zip(*m["curve"]["eval"]), "o--", color=color, label=f"{m['model']} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title("loss of every model (same data, recipe and seed)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>") or " "


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


def answers_by_prompt(models: list[dict[str, Any]], prompts: list[str]) -> list[tuple[str, list[list[str]]]]:
    out = []
    for k, prompt in enumerate(prompts):
        rows = []
        for m in models:
            b, a = m["answers"]["before"], m["answers"]["after"]
            rows.append([m["model"], _clean(b[k]["output"]) if k < len(b) else "-",
                         _clean(a[k]["output"]) if k < len(a) else "-"])
        out.append((prompt, rows))
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    lines = ["# famtune comparison", "", doc["headline"], ""]
    lines += [f"- {h}" for h in doc["highlights"]] + [""]
    lines += ["## Results", ""] + _md_table(list(COLUMNS), [row_cells(m) for m in doc["models"]]) + [""]
    notes = [f"- {m['model']}: {m['note']}" for m in doc["models"] if m["note"]]
    lines += notes + ([""] if notes else [])
    lines += task_eval_markdown(doc["models"])
    lines += ["## Loss curves", "", f"![loss curves]({CURVES_PNG})", ""]
    lines += ["## Answers before and after training", ""]
    for prompt, rows in doc["answers"]:
        lines += [f"### {prompt}", ""] + _md_table(["model", "before (step 0)", "after training"], rows) + [""]
    lines += ["## Repeat this comparison", "", "```", doc["command"], "```", "",
              "Shared recipe (`recipe.yaml` in this directory):", "", "```yaml", doc["recipe_yaml"].rstrip(), "```", ""]
    env = doc["environment"]
    lines += ["Plugins:", ""] + _md_table(
        ["plugin", "distribution", "version", "families"],
        [[p["name"], p["distribution"], p["version"], ", ".join(p["families"])] for p in env["plugins"]]) + [""]
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)
    lines += [f"famtune {env['famtune_version']}, Python {env['python']}, {libs}.", "",
              "Each model's resolved recipe is `<run>/recipe.yaml`; all figures are in `results.json`.", ""]
    return "\n".join(lines)


def render_html(doc: dict[str, Any], png: bytes) -> str:
    e = html.escape

    def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    env = doc["environment"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>famtune comparison</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "th{background:#f3f3f3}.answers td{white-space:pre-wrap;max-width:420px}pre{background:#f6f6f6;"
        "padding:1em;overflow:auto}.failed{color:#b00}",
        "</style></head><body>",
        f"<h1>famtune comparison</h1><p>{e(doc['headline'])}</p>",
        "<ul>" + "".join(f"<li>{e(h)}</li>" for h in doc["highlights"]) + "</ul>",
        "<h2>Results</h2>", table(list(COLUMNS), [row_cells(m) for m in doc["models"]]),
        "".join(f"<p>{e(m['model'])}: {e(m['note'])}</p>" for m in doc["models"] if m["note"]),
        *task_eval_html(doc["models"], table),
        "<h2>Loss curves</h2>",
        f"<img alt='loss curves' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
        "<h2>Answers before and after training</h2>",
    ]
    for prompt, rows in doc["answers"]:
        parts += [f"<h3>{e(prompt)}</h3>", table(["model", "before (step 0)", "after training"], rows, "answers")]
    parts += [
        "<h2>Repeat this comparison</h2>", f"<pre>{e(doc['command'])}</pre>",
        "<p>Shared recipe (<code>recipe.yaml</code> in this directory):</p>", f"<pre>{e(doc['recipe_yaml'])}</pre>",
        table(["plugin", "distribution", "version", "families"],
              [[p["name"], p["distribution"], p["version"], ", ".join(p["families"])] for p in env["plugins"]]),
        f"<p>famtune {e(env['famtune_version'])}, Python {e(env['python'])}, "
        + e(", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)) + ".</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(work: Path, shared: dict[str, Any], specs: list[str], runs: list[Any]) -> Path:
    import yaml

    out = Path(work) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    models = [model_result(r) for r in runs]
    recipe = {"models": list(specs), **shared}
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    (out / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    plot_curves(models, out / CURVES_PNG)
    ok = sum(m["status"] == "ok" for m in models)
    steps = shared.get("max_steps") or f"{shared.get('epochs', 1)} epoch(s)"
    headline = (f"{len(models)} models trained on the same data ({Path(str(shared.get('data'))).name}), "
                f"steps {steps}, seed {shared.get('seed', 42)}, quantization {shared.get('quantization', 'nf4')}, "
                f"LoRA r={shared.get('lora_r', 8)} alpha={shared.get('lora_alpha', 16)} "
                f"targets {shared.get('lora_targets', 'default')}, masking {shared.get('masking') or 'family default'}"
                f"; {ok} of {len(models)} completed.")
    prompts = list(shared.get("evaluation_inputs") or [])
    doc = {
        "headline": headline, "highlights": highlights(models), "models": models,
        "answers": answers_by_prompt(models, prompts),
        "command": f"famtune compare {out / 'recipe.yaml'} --output {work}",
        "recipe_yaml": recipe_yaml, "environment": environment(),
    }
    (out / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    (out / "report.html").write_text(render_html(doc, (out / CURVES_PNG).read_bytes()), encoding="utf-8")
    results = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recipe": recipe, "command": doc["command"],
               "environment": doc["environment"], "highlights": doc["highlights"], "models": models}
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
