"""Recipe validation in one place: what each key means, its allowed values, and the paths it names.

Every check here runs when the recipe loads, before any model does, and fails with
``KEY: what is wrong; what to do``. The same table gives ``famtune train --help`` its key list and
the docs their reference, so the three cannot drift apart.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from famtune.errors import FamtuneError


@dataclass(frozen=True)
class Rule:
    meaning: str
    low: float | None = None  # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    high_open: bool = False  # the upper bound itself is not allowed
    low_open: bool = False  # the lower bound itself is not allowed
    choices: tuple[Any, ...] = ()
    what_to_do: str = ""


def _r(meaning: str, **kw: Any) -> Rule:
    return Rule(meaning, **kw)


RULES: dict[str, Rule] = {
    "model": _r("base checkpoint: a directory, Org/Name (Hugging Face) or modelscope:Org/Name"),
    "data": _r("training data, a JSON or JSONL file"),
    "output_dir": _r("where the adapter, metrics and checkpoints go"),
    "family": _r("force a family instead of the plugin's claim (null: the claim)"),
    "data_format": _r(
        "auto, conversation, messages, alpaca or sharegpt",
        choices=("auto", "conversation", "messages", "alpaca", "sharegpt"),
    ),
    "eval_data": _r("evaluation data file (null: none, or eval_split)"),
    "eval_split": _r(
        "fraction of data held out for evaluation when eval_data is not given", low=0, high=1, high_open=True
    ),
    "skip_bad_records": _r("skip malformed records (each one reported) instead of stopping"),
    "max_length": _r("tokens per sample; longer samples are truncated and counted", low=2),
    "masking": _r("label masking policy (null: the family's default; famtune data check lists them)"),
    "system": _r("system prompt for samples without one (null: the family's default)"),
    "trust_remote_code": _r("allow the checkpoint's own Python code to run"),
    "quantization": _r("nf4 (QLoRA, double quant) or none (LoRA on the full-precision base)", choices=("nf4", "none")),
    "compute_dtype": _r(
        "auto (bf16/fp16 on CUDA, fp32 on CPU), bf16, fp16 or fp32",
        choices=("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"),
    ),
    "half_matmul": _r("bf16/fp16 NF4 matmuls: auto, native or fp32"),
    "lora_r": _r("LoRA rank", low=1),
    "lora_alpha": _r("LoRA scaling numerator (scale = lora_alpha / lora_r)", low=0, low_open=True),
    "lora_dropout": _r("dropout on the LoRA input", low=0, high=1, high_open=True),
    "lora_targets": _r("default, all-linear, or a list of module names"),
    "learning_rate": _r("peak learning rate (AdamW)", low=0, low_open=True),
    "weight_decay": _r("AdamW weight decay", low=0),
    "epochs": _r("passes over the data (max_steps > 0 overrides it)", low=0),
    "max_steps": _r("optimizer steps; 0: use epochs", low=0),
    "batch_size": _r("micro-batch size (rows of max_length tokens when packing)", low=1),
    "grad_accum": _r("micro-batches per optimizer step", low=1),
    "warmup_ratio": _r("fraction of steps of linear warmup before the cosine decay", low=0, high=1),
    "max_grad_norm": _r("gradient clipping norm", low=0, low_open=True),
    "gradient_checkpointing": _r("recompute activations in backward to save memory"),
    "packing": _r(
        "auto: pack where the family keeps samples apart; true: required; false: off", choices=("auto", True, False)
    ),
    "seed": _r("seed of the batch order, LoRA init and dropout", low=0, high=2**32 - 1),
    "nan_policy": _r(
        "on a non-finite loss or gradient norm: stop, or skip_step (skip that update)", choices=("stop", "skip_step")
    ),
    "logging_steps": _r("write metrics every N steps", low=1),
    "eval_steps": _r("eval loss + generations every N steps (0: only at the end)", low=0),
    "save_steps": _r("resumable checkpoint every N steps (0: only interrupted runs save one)", low=0),
    "evaluation_inputs": _r("prompts answered before, during and after training"),
    "max_new_tokens": _r("tokens generated per evaluation input", low=1),
    "progress": _r("show a progress bar"),
}

# Names other trainers use for famtune's keys (TRL/transformers, LLaMA-Factory, XTuner): accepted.
ALIASES: dict[str, str] = {
    "model_name_or_path": "model",
    "pretrained_model_name_or_path": "model",
    "train_file": "data",
    "data_path": "data",
    "data_files": "data",
    "eval_file": "eval_data",
    "validation_file": "eval_data",
    "val_size": "eval_split",
    "gradient_accumulation_steps": "grad_accum",
    "accumulative_counts": "grad_accum",
    "num_train_epochs": "epochs",
    "max_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "lr": "learning_rate",
    "max_seq_length": "max_length",
    "cutoff_len": "max_length",
    "max_norm": "max_grad_norm",
    "lora_rank": "lora_r",
    "lora_target_modules": "lora_targets",
    "target_modules": "lora_targets",
    "evaluation_freq": "eval_steps",
    "random_seed": "seed",
}
# Names whose meaning differs from any one famtune key: refused with what to write instead.
NEAR_MISSES: dict[str, str] = {
    "bf16": "compute_dtype: bf16",
    "fp16": "compute_dtype: fp16",
    "dataset": "data (a file path, not a registered dataset name)",
    "lora_target": "lora_targets (a list of module names, or default / all-linear)",
    "load_in_4bit": "quantization: nf4",
    "quantization_bit": "quantization: nf4",
    "per_device_eval_batch_size": "batch_size (evaluation uses the training batch size)",
    "template": "family (the family's chat template is always used)",
    "prompt_template": "family (the family's chat template is always used)",
    "warmup_steps": "warmup_ratio (a fraction of the steps)",
    "lr_scheduler_type": "warmup_ratio (famtune always uses warmup then cosine decay)",
}


def canonical_key(key: str, known: set[str], where: str) -> str:
    """The famtune key for ``key``, following aliases; an unknown key is an error with a suggestion."""
    import difflib

    if key in known:
        return key
    if key in ALIASES and ALIASES[key] in known:
        return ALIASES[key]
    if key in NEAR_MISSES:
        raise FamtuneError(f"{where}: unknown recipe key {key!r} (did you mean {NEAR_MISSES[key]}?)")
    close = difflib.get_close_matches(key, sorted(known | set(ALIASES)), n=3)
    close = list(dict.fromkeys(ALIASES.get(c, c) for c in close))
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise FamtuneError(f"{where}: unknown recipe key {key!r}{hint}; `famtune train --help` lists the recipe keys")


def _bad(key: str, value: Any, expected: str) -> FamtuneError:
    return FamtuneError(f"{key}: {value!r} is out of range; expected {expected}")


def check_ranges(recipe: Any) -> None:
    """Every key's value against its rule."""
    for key, rule in RULES.items():
        if not hasattr(recipe, key):
            continue
        value = getattr(recipe, key)
        if rule.choices and value not in rule.choices:
            shown = ", ".join("true" if c is True else "false" if c is False else str(c) for c in rule.choices)
            raise FamtuneError(f"{key}: {value!r} is not allowed; expected one of {shown}")
        if rule.low is None and rule.high is None or value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise FamtuneError(f"{key}: {value!r} is not a finite number; give a number")
        below = value < rule.low or (rule.low_open and value == rule.low) if rule.low is not None else False
        above = value > rule.high or (rule.high_open and value == rule.high) if rule.high is not None else False
        if below or above:
            lo = "" if rule.low is None else ("> " if rule.low_open else ">= ") + _num(rule.low)
            hi = "" if rule.high is None else ("< " if rule.high_open else "<= ") + _num(rule.high)
            raise _bad(key, value, " and ".join(x for x in (lo, hi) if x) + f" ({rule.meaning})")
    if getattr(recipe, "max_steps", 1) == 0 and getattr(recipe, "epochs", 1) == 0:
        raise FamtuneError("epochs: 0 with max_steps: 0 trains nothing; set epochs > 0 or max_steps > 0")
    targets = getattr(recipe, "lora_targets", "default")
    if isinstance(targets, list) and (not targets or not all(isinstance(t, str) and t for t in targets)):
        raise FamtuneError(
            f"lora_targets: {targets!r}; expected default, all-linear or a non-empty list of module names"
        )
    inputs = getattr(recipe, "evaluation_inputs", [])
    if not all(isinstance(t, str) for t in inputs):
        raise FamtuneError(f"evaluation_inputs: {inputs!r}; expected a list of prompt strings")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_local_spec(spec: str) -> bool:
    """Whether a model source names a local path (not Org/Name or modelscope:Org/Name)."""
    if spec.startswith("modelscope:") or spec.startswith("tiny:"):
        return False
    return os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def check_paths(recipe: Any, where: str) -> None:
    """The files and directories the recipe names exist, have the right kind and can be written."""
    for key in ("data", "eval_data"):
        path = getattr(recipe, key, None)
        if not path:
            continue
        if not os.path.exists(path):
            raise FamtuneError(f"{key}: {path}: no such file; check the path (relative paths are relative to {where})")
        if os.path.isdir(path):
            raise FamtuneError(f"{key}: {path} is a directory; give the JSON or JSONL file inside it")
        if not os.access(path, os.R_OK):
            raise FamtuneError(f"{key}: {path}: not readable; fix its permissions")
    model = recipe.model
    if _is_local_spec(model):
        if not os.path.exists(model):
            raise FamtuneError(
                f"model: {model}: no such directory; give a local checkpoint directory, Org/Name or modelscope:Org/Name"
            )
        if not os.path.isdir(model):
            raise FamtuneError(f"model: {model} is a file; give the checkpoint directory that holds config.json")
    out = recipe.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise FamtuneError(f"output_dir: {out} is a file; choose a directory")
    if os.path.isdir(model) and os.path.realpath(out) == os.path.realpath(model):
        raise FamtuneError(
            f"output_dir: {out} is the base model's directory; choose a new directory "
            "(an adapter there would load on top of the base unasked)"
        )
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise FamtuneError(f"output_dir: {out}: {probe} is a file, so the directory cannot be created; choose another")
    try:  # a real write: permission bits alone miss read-only mounts and say nothing for root
        import tempfile

        with tempfile.TemporaryFile(dir=probe, prefix=".famtune-probe-"):
            pass
    except OSError as exc:
        raise FamtuneError(
            f"output_dir: {out}: cannot write in {probe} ({exc.strerror}); choose a writable directory"
        ) from None


def aliases_help(width: int = 100) -> str:
    """The other trainers' key names a recipe may use, for ``famtune train --help``."""
    import textwrap

    return "\n".join(
        textwrap.wrap(
            "other trainers' key names accepted: " + ", ".join(f"{a}={k}" for a, k in ALIASES.items()),
            width,
            subsequent_indent="  ",
        )
    )
