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
RUN_CURVES_PNG = "loss_curves_per_run.png"
TINY_PREFIX = "tiny:"
# Below this many eval samples, eval-loss differences between models are mostly noise.
SMALL_EVAL_SET = 50
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
COLUMNS = (
    "model",
    "family",
    "masking",
    "plugin",
    "parameters",
    "trainable",
    "adapter",
    "final train loss",
    "eval loss",
    "tokens/s",
    "peak memory",
    "wall time",
    "status",
)


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
        "model": run.spec + (f" [{run.adapter}]" if getattr(run, "adapter", "") else ""),
        "name": run.name,
        "dir": str(d),
        "family": plugin.get("family") or run.family,
        "plugin": {k: plugin.get(k) for k in ("plugin", "distribution", "version")} if plugin else None,
        "parameters": count_parameters(meta.get("base_path")) if summary else None,
        "trainable_parameters": (s.get("parameters") or {}).get("trainable"),
        "adapter_bytes": adapter.stat().st_size if summary and adapter.is_file() else None,
        "final_train_loss": s.get("final_loss"),
        "eval_loss": s.get("eval_loss"),
        "tokens_per_s": s.get("tokens_per_s"),
        "peak_rss_mib": s.get("peak_rss_mib"),
        "peak_accelerator_mib": s.get("peak_accelerator_mib"),
        "steps": s.get("steps"),
        "wall_s": run.wall_s,
        "status": "ok" if run.status == "skipped" else run.status,
        "skipped": run.status == "skipped",
        "error": run.error,
        "note": run.note,
        "masking": meta.get("masking"),
        "curve": {
            "train": [[r["step"], r["loss"]] for r in records if "loss" in r],
            "eval": [[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
        },
        "answers": {
            "before": (before or {}).get("generations") or [],
            "after": (after or {}).get("generations") or [],
            "after_step": (after or {}).get("step"),
        },
        "resolved_recipe": resolved,
        "train_samples": (s.get("data") or {}).get("train_samples"),
        "eval_samples": (s.get("data") or {}).get("eval_samples"),
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
        "famtune_version": famtune.__version__,
        "python": platform.python_version(),
        "libraries": libs,
        "plugins": [
            {"name": n, "distribution": i.distribution, "version": i.version, "families": plugins.families_of(n)}
            for n, i in plugins.infos.items()
        ],
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
    return [
        m["model"],
        m["family"] or "-",
        m["masking"] or "-",
        f"{p.get('plugin')} ({p.get('distribution')} {p.get('version')})" if p.get("plugin") else "-",
        _num(m["parameters"]),
        _num(m["trainable_parameters"]),
        _bytes(m["adapter_bytes"]),
        _num(m["final_train_loss"], "{:.4f}"),
        _num(m["eval_loss"], "{:.4f}"),
        _num(m["tokens_per_s"], "{:,.0f}"),
        _memory(m),
        _num(m["wall_s"], "{:.0f} s"),
        status,
    ]


def highlights(models: list[dict[str, Any]]) -> list[str]:
    """One line per criterion naming the best model, so a reader can choose at a glance."""
    ok = [m for m in models if m["status"] == "ok"]
    out = []
    for label, key, fmt, best in (
        ("lowest eval loss", "eval_loss", "{:.4f}", min),
        ("lowest final train loss", "final_train_loss", "{:.4f}", min),
        ("fastest training", "tokens_per_s", "{:,.0f} tokens/s", max),
        ("lowest peak memory", "peak_rss_mib", "{:.0f} MiB RSS", min),
        ("smallest adapter", "adapter_bytes", None, min),
    ):
        have = [m for m in ok if m[key] is not None]
        if have:
            m = best(have, key=lambda x: x[key])
            value = _bytes(m[key]) if fmt is None else fmt.format(m[key])
            out.append(f"{label}: {m['model']} ({m['family']}, {value})")
    return out


def ranking(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall order of the finished models: by eval loss when every one has it, else by final train
    loss. Models whose value is equal at the shown precision (4 decimals) share a rank and are flagged
    as tied; failed models come last, unranked."""
    ok = [m for m in models if m["status"] == "ok"]
    key, criterion = (
        ("eval_loss", "eval loss")
        if ok and all(m["eval_loss"] is not None for m in ok)
        else ("final_train_loss", "final train loss")
    )
    ranked = sorted((m for m in ok if m[key] is not None), key=lambda m: m[key])
    shown = [round(m[key], 4) for m in ranked]
    rows, rank = [], 0
    for i, m in enumerate(ranked):
        if i == 0 or shown[i] != shown[i - 1]:
            rank = i + 1
        tie = shown.count(shown[i]) > 1
        rows.append(
            {
                "rank": rank,
                "model": m["model"],
                "family": m["family"],
                "value": m[key],
                "tie": tie,
                "eval_samples": m.get("eval_samples"),
            }
        )
    rows += [
        {
            "rank": None,
            "model": m["model"],
            "family": m["family"],
            "value": None,
            "tie": False,
            "eval_samples": m.get("eval_samples"),
        }
        for m in models
        if m not in ranked
    ]
    winners = [r["model"] for r in rows if r["rank"] == 1]
    return {"criterion": criterion, "rows": rows, "winners": winners}


def ranking_lines(rank: dict[str, Any]) -> list[str]:
    """The ranking as sentences: the winner (or the tie for first), then each model's place."""
    if not rank["winners"]:
        return ["No model finished, so there is no ranking."]
    first = (
        f"Overall best by {rank['criterion']}: {rank['winners'][0]}"
        if len(rank["winners"]) == 1
        else f"Tied for best by {rank['criterion']}: {', '.join(rank['winners'])}"
    )
    return [first + "."]


def ranking_cells(rank: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in rank["rows"]:
        place = "-" if r["rank"] is None else f"{r['rank']}" + (" (tie)" if r["tie"] else "")
        value = "failed" if r["rank"] is None and r["value"] is None else _num(r["value"], "{:.4f}")
        out.append([place, r["model"], r["family"] or "-", value, _num(r["eval_samples"])])
    return out


def caveats(models: list[dict[str, Any]]) -> list[str]:
    """What the reader must know before trusting the figures: random-weight demo models, tiny eval sets."""
    out = []
    tiny = [m["model"] for m in models if str(m["model"]).startswith(TINY_PREFIX)]
    if tiny:
        out.append(
            f"Demo models: {', '.join(tiny)} {'is a' if len(tiny) == 1 else 'are'} tiny random-weight "
            f"model{'s' if len(tiny) > 1 else ''} built locally, not the real checkpoint"
            f"{'s' if len(tiny) > 1 else ''}. The figures show that the pipeline works; they say nothing "
            "about how the real models compare."
        )
    sizes = sorted({m["eval_samples"] for m in models if m["status"] == "ok" and m.get("eval_samples") is not None})
    if sizes and sizes[0] == 0:
        out.append("No eval set: models are ranked by their final train loss, which rewards memorising the data.")
    elif sizes and sizes[0] < SMALL_EVAL_SET:
        n = " to ".join(map(str, (sizes[0], sizes[-1]))) if len(sizes) > 1 else str(sizes[0])
        out.append(f"The eval set has {n} samples: eval-loss differences this small a set gives are mostly noise.")
    return out


def _clean(text: str) -> str:
    """An answer for display: outer whitespace dropped (some families open a reply with a header
    newline), control characters of untrained models shown as escapes."""
    return "".join(
        c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in (text or "").strip()
    )


def plot_curves(models: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
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
        # outside the axes, so no curve is ever hidden behind it
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.set_title("loss of every model (same data, recipe and seed)")
    fig.tight_layout()
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_run_curves(models: list[dict[str, Any]], png: Path) -> None:
    """One small plot per run (train and eval loss, log scale), titled with the model's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cols = 2 if len(models) in (2, 4) else min(len(models), 3) or 1
    rows = max(1, -(-len(models) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(models):
            ax.axis("off")
            continue
        m = models[i]
        color = f"C{i % 10}"
        if m["curve"]["train"]:
            ax.plot(*zip(*m["curve"]["train"]), color=color, label="train")
        if m["curve"]["eval"]:
            ax.plot(*zip(*m["curve"]["eval"]), "o--", color="black", label="eval")
        if m["curve"]["train"] or m["curve"]["eval"]:
            ax.set_yscale("log")
            values = [v for _, v in m["curve"]["train"] + m["curve"]["eval"] if v > 0]
            if values and max(values) / min(values) >= 10:
                # across decades the major ticks suffice; minor labels (3x10^-1, ...) would clutter
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.legend(fontsize=7, loc="upper right", framealpha=0.6)
        else:
            ax.text(
                0.5,
                0.5,
                "no curve" + (" (failed)" if m["status"] != "ok" else ""),
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set_title(f"{m['model']} ({m['family'] or '?'})", fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("loss (log)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("loss per run", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>") or " "


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows
    ]


def answers_by_prompt(models: list[dict[str, Any]], prompts: list[str]) -> list[tuple[str, list[list[str]]]]:
    out = []
    for k, prompt in enumerate(prompts):
        rows = []
        for m in models:
            b, a = m["answers"]["before"], m["answers"]["after"]
            rows.append(
                [
                    m["model"],
                    _clean(b[k]["output"]) if k < len(b) else "-",
                    _clean(a[k]["output"]) if k < len(a) else "-",
                ]
            )
        out.append((prompt, rows))
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    lines = ["# famtune comparison", ""]
    for note in doc.get("caveats", []):
        lines += [f"> **Note:** {note}", ""]
    lines += [doc["headline"], ""]
    if "ranking" in doc:
        lines += (
            ["## Ranking", ""]
            + ranking_lines(doc["ranking"])
            + [""]
            + _md_table(
                ["rank", "model", "family", doc["ranking"]["criterion"], "eval samples"], ranking_cells(doc["ranking"])
            )
            + [""]
        )
    lines += [f"- {h}" for h in doc["highlights"]] + [""]
    lines += ["## Results", ""] + _md_table(list(COLUMNS), [row_cells(m) for m in doc["models"]]) + [""]
    notes = [f"- {m['model']}: {m['note']}" for m in doc["models"] if m["note"]]
    lines += notes + ([""] if notes else [])
    lines += task_eval_markdown(doc["models"])
    lines += ["## Loss curves", "", f"![loss curves]({CURVES_PNG})", ""]
    if doc.get("run_curves"):
        lines += [f"![loss per run]({RUN_CURVES_PNG})", ""]
    lines += ["## Answers before and after training", ""]
    for prompt, rows in doc["answers"]:
        lines += [f"### {prompt}", ""] + _md_table(["model", "before (step 0)", "after training"], rows) + [""]
    lines += [
        "## Repeat this comparison",
        "",
        "```",
        doc["command"],
        "```",
        "",
        "Shared recipe (`recipe.yaml` in this directory):",
        "",
        "```yaml",
        doc["recipe_yaml"].rstrip(),
        "```",
        "",
    ]
    env = doc["environment"]
    lines += (
        ["Plugins:", ""]
        + _md_table(
            ["plugin", "distribution", "version", "families"],
            [[p["name"], p["distribution"], p["version"], ", ".join(p["families"])] for p in env["plugins"]],
        )
        + [""]
    )
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)
    lines += [
        f"famtune {env['famtune_version']}, Python {env['python']}, {libs}.",
        "",
        "Each model's resolved recipe is `<run>/recipe.yaml`; all figures are in `results.json`.",
        "",
    ]
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
        "body{font-family:system-ui,'WenQuanYi Zen Hei','Noto Sans CJK SC',sans-serif;margin:2em;max-width:1200px}"
        ".wide{overflow-x:auto}.wide table{font-size:.9em}img{max-width:100%}.banner{background:#fff4e5;border:1px solid #f0a020;"
        "border-radius:4px;padding:.6em 1em;margin:1em 0}.winner{font-size:1.15em;font-weight:600}"
        "table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "th{background:#f3f3f3}.answers td{white-space:pre-wrap;max-width:420px}pre{background:#f6f6f6;"
        "padding:1em;overflow:auto}.failed{color:#b00}",
        "</style></head><body>",
        "<h1>famtune comparison</h1>",
        "".join(f"<div class='banner'><b>Note:</b> {e(c)}</div>" for c in doc.get("caveats", [])),
        f"<p>{e(doc['headline'])}</p>",
    ]
    if "ranking" in doc:
        parts += [
            "<h2>Ranking</h2>",
            "".join(f"<p class='winner'>{e(line)}</p>" for line in ranking_lines(doc["ranking"])),
            table(
                ["rank", "model", "family", doc["ranking"]["criterion"], "eval samples"],
                ranking_cells(doc["ranking"]),
                "ranking",
            ),
        ]
    parts += [
        "<ul>" + "".join(f"<li>{e(h)}</li>" for h in doc["highlights"]) + "</ul>",
        "<h2>Results</h2>",
        "<div class='wide'>" + table(list(COLUMNS), [row_cells(m) for m in doc["models"]]) + "</div>",
        "".join(f"<p>{e(m['model'])}: {e(m['note'])}</p>" for m in doc["models"] if m["note"]),
        *task_eval_html(doc["models"], table),
        "<h2>Loss curves</h2>",
        f"<img alt='loss curves' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
        (
            f"<img alt='loss per run' src='data:image/png;base64,{base64.b64encode(doc['run_curves']).decode()}'>"
            if doc.get("run_curves")
            else ""
        ),
        "<h2>Answers before and after training</h2>",
    ]
    for prompt, rows in doc["answers"]:
        parts += [f"<h3>{e(prompt)}</h3>", table(["model", "before (step 0)", "after training"], rows, "answers")]
    parts += [
        "<h2>Repeat this comparison</h2>",
        f"<pre>{e(doc['command'])}</pre>",
        "<p>Shared recipe (<code>recipe.yaml</code> in this directory):</p>",
        f"<pre>{e(doc['recipe_yaml'])}</pre>",
        table(
            ["plugin", "distribution", "version", "families"],
            [[p["name"], p["distribution"], p["version"], ", ".join(p["families"])] for p in env["plugins"]],
        ),
        f"<p>famtune {e(env['famtune_version'])}, Python {e(env['python'])}, "
        + e(", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v))
        + ".</p>",
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
    plot_run_curves(models, out / RUN_CURVES_PNG)
    ok = sum(m["status"] == "ok" for m in models)
    steps = shared.get("max_steps") or f"{shared.get('epochs', 1)} epoch(s)"
    headline = (
        f"{len(models)} models trained on the same data ({Path(str(shared.get('data'))).name}), "
        f"steps {steps}, seed {shared.get('seed', 42)}, quantization {shared.get('quantization', 'nf4')}, "
        f"LoRA r={shared.get('lora_r', 8)} alpha={shared.get('lora_alpha', 16)} "
        f"targets {shared.get('lora_targets', 'default')}, masking {shared.get('masking') or 'family default'}"
        f"; {ok} of {len(models)} completed."
    )
    samples = sorted(
        {
            (m["train_samples"], m["eval_samples"])
            for m in models
            if m["status"] == "ok" and m["train_samples"] is not None
        },
        key=str,
    )
    if samples:
        headline += " Samples per model (train + eval): " + ", ".join(f"{t} + {v}" for t, v in samples) + "."
    prompts = list(shared.get("evaluation_inputs") or [])
    doc = {
        "headline": headline,
        "highlights": highlights(models),
        "models": models,
        "answers": answers_by_prompt(models, prompts),
        "command": f"famtune compare {out / 'recipe.yaml'} --output {work}",
        "recipe_yaml": recipe_yaml,
        "environment": environment(),
        "ranking": ranking(models),
        "caveats": caveats(models),
        "run_curves": (out / RUN_CURVES_PNG).read_bytes(),
    }
    (out / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    (out / "report.html").write_text(render_html(doc, (out / CURVES_PNG).read_bytes()), encoding="utf-8")
    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": recipe,
        "command": doc["command"],
        "environment": doc["environment"],
        "highlights": doc["highlights"],
        "models": models,
        "ranking": doc["ranking"],
        "caveats": doc["caveats"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
