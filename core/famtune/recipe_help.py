"""What each recipe key means, for ``famtune train --help``; defaults come from ``famtune.recipe.Recipe``."""

from __future__ import annotations

import dataclasses
import textwrap

KEY_MEANINGS = {
    "model": "a directory, Org/Name (Hugging Face) or modelscope:Org/Name",
    "data": "training data: JSON or JSONL (conversation, messages, alpaca or sharegpt)",
    "output_dir": "where the adapter, famtune.json, metrics.jsonl and summary.json go",
    "family": "force a family instead of the plugin's claim",
    "data_format": "auto, conversation, messages, alpaca or sharegpt",
    "eval_data": "evaluation data file (else eval_split)",
    "eval_split": "fraction of data held out for evaluation when eval_data is not given",
    "skip_bad_records": "skip and report malformed records instead of stopping",
    "max_length": "longest sample in tokens (longer ones are truncated and counted); packed row length",
    "masking": "label masking policy (null: the family's default; `famtune data check` lists them)",
    "system": "system prompt for samples without one (null: the family's default)",
    "trust_remote_code": "allow the checkpoint's own Python code to run",
    "quantization": "nf4 (QLoRA, 4-bit base) or none (LoRA on the full-precision base)",
    "compute_dtype": "auto (bf16/fp16 on CUDA, fp32 on CPU), bf16, fp16 or fp32",
    "half_matmul": "bf16/fp16 NF4 matmuls: auto, native or fp32",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scaling numerator (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_targets": "default, all-linear, or a list of module names",
    "adapter": "adapter method: lora, dora or adalora (PEFT's implementations)",
    "rslora": "rank-stabilised scaling alpha / sqrt(r) instead of alpha / r",
    "lora_init": "LoRA initialisation: default, gaussian, pissa, olora or loftq",
    "loraplus_lr_ratio": "LoRA+: the B matrices learn at this multiple of learning_rate (0: off)",
    "adalora_target_r": "AdaLoRA: average rank the budget shrinks to (0: lora_r / 2)",
    "learning_rate": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "epochs": "passes over the data (ignored when max_steps > 0)",
    "max_steps": "optimizer steps; > 0 overrides epochs",
    "batch_size": "samples (or packed rows) per micro-batch and process",
    "grad_accum": "micro-batches per optimizer step",
    "warmup_ratio": "fraction of steps of linear warmup before the cosine decay",
    "max_grad_norm": "gradient clipping norm",
    "gradient_checkpointing": "recompute activations in backward to save memory",
    "packing": "auto (where the family supports it), true (required) or false",
    "seed": "seed of initialisation, data order and dropout",
    "nan_policy": "non-finite loss or gradient norm: stop (naming step and samples) or skip_step",
    "logging_steps": "log loss, lr and throughput every N steps",
    "eval_steps": "eval loss and generations every N steps (0: only at the end)",
    "save_steps": "resumable checkpoint every N steps (0: only at the end)",
    "evaluation_inputs": "prompts answered before training and at every evaluation",
    "max_new_tokens": "longest generated answer at evaluation",
    "progress": "show a progress bar on a terminal (a plain log line otherwise)",
    "report_to": "experiment trackers: tensorboard, wandb, mlflow, trackio, ... (accelerate's)",
    "distributed": "with --nproc N: ddp, fsdp, zero2 or zero3 (docs/users/distributed.md)",
    "eval": "task scored on the base at step 0 and the adapter at the end: {data: FILE, task: mcq|qa}",
}


def recipe_keys_help(width: int = 100) -> str:
    """One line per recipe key: name, default, meaning."""
    from famtune.recipe import Recipe

    rows = []
    defaults = Recipe()
    for f in dataclasses.fields(Recipe):
        default = getattr(defaults, f.name)
        shown = (
            "null"
            if default is None
            else ("''" if default == "" else str(default).lower() if isinstance(default, bool) else str(default))
        )
        rows.append((f.name, shown, KEY_MEANINGS.get(f.name, "")))
    name_w = max(len(r[0]) for r in rows)
    default_w = min(max(len(r[1]) for r in rows), 14)
    lines = []
    indent = " " * (2 + name_w + 2 + default_w + 2)
    for name, shown, meaning in rows:
        head = f"  {name:<{name_w}}  {shown:<{default_w}}  "
        lines.append(
            textwrap.fill(meaning, width=width, initial_indent=head, subsequent_indent=indent)
            if meaning
            else head.rstrip()
        )
    return "\n".join(lines)
