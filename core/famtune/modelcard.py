"""The model card (``README.md``) of an adapter and of a merged model, through huggingface_hub.

Everything comes from what the run left on disk (``famtune.json``, ``recipe.yaml``,
``summary.json``, ``metrics.jsonl``), so a card can be rewritten at any time and says only what
was measured. The loading snippet uses plain transformers/PEFT, without famtune.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from famtune.metadata import read_metadata

CARD_FILE = "README.md"


def file_sha256(path: str | Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _recipe(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _last_generations(run_dir: Path) -> tuple[int | None, list[dict[str, str]]]:
    last: tuple[int | None, list[dict[str, str]]] = (None, [])
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return last
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("generations") and record.get("step", 0) > 0:
            last = (record["step"], record["generations"])
    return last


def _previous_data_hashes(directory: Path) -> dict[str, str]:
    """Data hashes an earlier card recorded (a merge reads the adapter's card when the data has moved)."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(directory / CARD_FILE)
    except Exception:  # no card, or PEFT's template without our metadata
        return {}
    found = (card.data.to_dict().get("famtune") or {}).get("data_sha256")
    return dict(found) if isinstance(found, dict) else {}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def build_card(run_dir: str | Path, merged_dir: str | Path | None = None, merge_report: dict[str, Any] | None = None):
    """The ``ModelCard`` of the adapter in ``run_dir``, or of the merged model in ``merged_dir`` made from it."""
    from huggingface_hub import ModelCard, ModelCardData

    from famtune.recipes import is_model_source

    run = Path(run_dir)
    meta = read_metadata(run) or {}
    recipe = _recipe(run)
    summary = _read_json(run / "summary.json") or {}
    plugin = meta.get("plugin") or {}
    base = meta.get("base_model") or recipe.get("model") or "?"
    merged = merged_dir is not None
    where = str(merged_dir if merged else run)

    hashes = _previous_data_hashes(run)
    for key in ("data", "eval_data"):
        if recipe.get(key):
            digest = file_sha256(recipe[key])
            if digest:
                hashes[Path(recipe[key]).name] = digest

    data = ModelCardData(
        # the hub's base_model field takes hub ids only, not local paths or ModelScope ids
        base_model=base if is_model_source(base) and not base.startswith("modelscope:") else None,
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=[
            "famtune",
            "lora",
            "qlora" if meta.get("quantization") == "nf4" else "full-precision-base",
            meta.get("family") or "unknown-family",
        ]
        + (["merged"] if merged else []),
        famtune={
            "version": meta.get("famtune_version"),
            "family": meta.get("family"),
            "template": meta.get("template"),
            "plugin": plugin,
            "data_sha256": hashes,
        },
    )

    title = Path(where).resolve().name
    kind = "A full model: the LoRA adapter merged into its base" if merged else "A LoRA adapter"
    lines = [
        f"# {title}",
        "",
        f"{kind}, fine-tuned from `{base}` with famtune "
        f"(family `{meta.get('family')}`, chat template `{meta.get('template')}`).",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| family | `{meta.get('family')}` (plugin {plugin.get('name')}, {plugin.get('distribution')} "
        f"{plugin.get('version')}) |",
        f"| chat template | `{meta.get('template')}` (saved as the tokenizer's `chat_template` on merge) |",
        f"| base quantization | {meta.get('quantization')} (compute dtype {meta.get('compute_dtype')}) |",
        f"| LoRA | r={recipe.get('lora_r')}, alpha={recipe.get('lora_alpha')}, dropout={recipe.get('lora_dropout')}, "
        f"targets {', '.join(meta.get('lora_targets') or []) or recipe.get('lora_targets')} |",
        f"| label masking | {meta.get('masking')} |",
        f"| stop token ids | {meta.get('stop_ids')} |",
    ]
    if merged and merge_report:
        lines.append(
            f"| merge | into the {merge_report.get('base_precision', '?')} base, {merge_report.get('dtype')}, "
            f"{merge_report.get('layout')} layout |"
        )
    lines += ["", "## Training data", ""]
    d = summary.get("data") or {}
    if not hashes and not d:
        lines.append("Not recorded (the training data file is not where the recipe said).")
    for name, digest in hashes.items():
        lines.append(f"- `{name}`: sha256 `{digest}`")
    if d:
        lines.append(
            f"- {d.get('records')} records: {d.get('train_samples')} training and {d.get('eval_samples')} "
            f"evaluation samples, {d.get('tokens')} tokens ({d.get('supervised_tokens')} supervised); "
            f"skipped {d.get('skipped_bad_records')}, truncated {d.get('truncated')}, dropped "
            f"{d.get('dropped_no_supervision')}"
        )
    lines += ["", "## Training results", ""]
    if summary:
        eval_loss = summary.get("eval_loss")
        lines += [
            "| | |",
            "|---|---|",
            f"| optimizer steps | {summary.get('steps')} |",
            f"| final train loss | {summary['final_loss']:.4f} |"
            if summary.get("final_loss") is not None
            else "| final train loss | - |",
            f"| eval loss | {eval_loss:.4f} |" if eval_loss is not None else "| eval loss | no eval set |",
            f"| tokens/s | {summary.get('tokens_per_s') or 0:,.0f} |",
            f"| trainable parameters | {(summary.get('parameters') or {}).get('trainable', 0):,} |",
        ]
    else:
        lines.append(
            "No `summary.json` beside the adapter (an unfinished run, or one not made by `famtune train`): "
            "no training figures to report."
        )
    step, gens = _last_generations(run)
    if gens:
        lines += [
            "",
            f"Greedy answers to the recipe's `evaluation_inputs` at step {step}:",
            "",
            "| prompt | answer |",
            "|---|---|",
        ] + [f"| {_cell(g['input'])} | {_cell(g['output'])} |" for g in gens]
    lines += ["", "## Use it", ""] + (_merged_snippet(where, merge_report) if merged else _adapter_snippet(where, base))
    if recipe:
        import yaml

        lines += [
            "",
            "## Recipe",
            "",
            "Repeat the run with `famtune train recipe.yaml` (this recipe, resolved):",
            "",
            "```yaml",
            yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip(),
            "```",
        ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)


def _merged_snippet(where: str, merge_report: dict[str, Any] | None) -> list[str]:
    remote = (merge_report or {}).get("layout") == "original"
    trust = ", trust_remote_code=True" if remote else ""
    return [
        "A plain transformers model: the tokenizer carries the chat template and `generation_config.json` the "
        "stop ids, so nothing famtune-specific is needed."
        + (
            " This copy is in the family's original layout, whose code lives in the repository "
            "(`trust_remote_code=True`)."
            if remote
            else ""
        ),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"path = {where!r}",
        f"tokenizer = AutoTokenizer.from_pretrained(path{trust})",
        f"model = AutoModelForCausalLM.from_pretrained(path{trust})",
        'messages = [{"role": "user", "content": "Who are you?"}]',
        'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64)",
        'print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
    ]


def _adapter_snippet(where: str, base: str) -> list[str]:
    return [
        "With famtune, which applies the family's chat format and stop ids:",
        "",
        "```bash",
        f"famtune chat {base} --adapter {where}",
        f"famtune merge {where} merged/   # a plain transformers model",
        "```",
        "",
        "With plain PEFT (the base must be in the native transformers layout the adapter was trained on; for "
        "families whose original checkpoints need remote code, use `famtune merge` instead):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base!r})",
        f"model = PeftModel.from_pretrained(base, {where!r})",
        "```",
    ]


def write_model_card(
    run_dir: str | Path, merged_dir: str | Path | None = None, merge_report: dict[str, Any] | None = None
) -> Path:
    """Write ``README.md`` into ``merged_dir`` (a merge) or ``run_dir`` (an adapter)."""
    card = build_card(run_dir, merged_dir, merge_report)
    path = Path(merged_dir if merged_dir is not None else run_dir) / CARD_FILE
    card.save(path)
    return path
