#!/usr/bin/env python
"""Training throughput of famtune on the shared benchmark fixture, with the shared settings.

Builds the fixture with ../shared/bench/make_fixture.py (once, cached in --workdir), trains 30
QLoRA steps exactly as the TRL baseline does (NF4 + double quant, bf16 compute, LoRA r=16/alpha=32/
dropout 0.05 on every decoder linear layer, max_length 512, batch 8, lr 2e-4 cosine with 3% warmup,
gradient checkpointing, seed 42, 2 torch threads, loss on assistant tokens + <|im_end|>) and
prints one line ``RESULT {json}`` with the baseline's fields.

``--mode pack`` (the default, as in a plain famtune run) packs samples into rows of 512 tokens
that never attend to each other; ``--mode nopack`` pads each batch of 8 samples to its longest.
``--shape`` picks the fixture's model (make_fixture.py --shape: ``tiny``, or ``wide`` with a
Qwen2.5-sized 151,936-row embedding and head); ``--max-length`` and ``--batch`` change the row
length and rows per step (e.g. ``--max-length 4096 --batch 1`` for long packed rows, whose
throughput should match 512 x 8 when attention skips the blocks between packed samples). The
RESULT line names the attention path the run used (summary.json's ``attention``).

    python bench/train_throughput.py [--mode pack|nopack] [--shape tiny|wide] [--max-length 512]
        [--batch 8] [--workdir /tmp/famtune-bench] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/famtune-bench")
    ap.add_argument("--mode", choices=["pack", "nopack"], default="pack")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shape", choices=["tiny", "wide"], default="tiny", help="the fixture's model shape")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per (packed) row")
    ap.add_argument("--batch", type=int, default=8, help="rows (or samples) per step")
    ap.add_argument("--compute-dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--half-matmul",
        default="auto",
        choices=["auto", "native", "fp32"],
        help="native: keep the emulated bf16 matmul (to see what the fp32 kernels buy)",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    work = Path(args.workdir)
    # The tiny fixture keeps its historical folder, so earlier caches stay valid.
    fixture = work / ("fixture" if args.shape == "tiny" else f"fixture-{args.shape}")
    if not (fixture / "model" / "model.safetensors").exists():
        subprocess.run(
            [sys.executable, str(SHARED_BENCH / "make_fixture.py"), str(fixture), "--shape", args.shape],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    out_dir = work / f"out-{args.mode}-{args.shape}-{args.max_length}x{args.batch}"

    import torch

    torch.set_num_threads(args.threads)
    from famtune.recipe import load_recipe
    from famtune.train import train

    recipe = load_recipe(
        None,
        {
            "model": str(fixture / "model"),
            "data": str(fixture / "data" / "train.jsonl"),
            "output_dir": str(out_dir),
            "quantization": "nf4",
            "compute_dtype": args.compute_dtype,
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "lora_targets": "all-linear",
            "max_length": args.max_length,
            "batch_size": args.batch,
            "grad_accum": 1,
            "learning_rate": 2e-4,
            "warmup_ratio": 0.03,
            "gradient_checkpointing": True,
            "max_steps": args.steps,
            "seed": 42,
            "logging_steps": 1,
            "progress": False,
            "evaluation_inputs": [],
            "packing": args.mode == "pack",
            "half_matmul": args.half_matmul,
        },
    )
    # Process CPU seconds when each "step N/M" line is logged: on a shared machine, tokens per CPU
    # second from step 1 to the last (the first step's warm-up left out) move less with other load
    # than wall-clock tokens/s.
    cpu_at: dict[int, float] = {}

    def log(*a):
        print(*a, file=sys.stderr)
        m = re.match(r"step (\d+)/", str(a[0])) if a else None
        if m:
            cpu_at[int(m.group(1))] = time.process_time()

    t0 = time.perf_counter()
    summary = train(recipe, log=log, overwrite=True)  # a rerun replaces the previous one
    total_s = time.perf_counter() - t0
    wall = summary["train_wall_s"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    # tokens_per_s in metrics.jsonl is cumulative: times elapsed_s it gives the tokens seen so far
    seen = {r["step"]: (r["tokens_per_s"] * r["elapsed_s"], r["elapsed_s"]) for r in records if "tokens_per_s" in r}
    steady = None
    if 1 in seen and 1 in cpu_at and len(seen) > 1:
        last = max(seen)
        tokens = seen[last][0] - seen[1][0]
        steady = {
            "steady_nonpad_tok_per_s": round(tokens / (seen[last][1] - seen[1][1]), 1),
            "cpu_nonpad_tok_per_s": round(tokens / (cpu_at[last] - cpu_at[1]), 1),
        }
    res = {
        "framework": "famtune",
        "mode": args.mode,
        "shape": args.shape,
        "max_length": args.max_length,
        "batch": args.batch,
        "attention": (summary.get("attention") or {}).get("path"),
        "steps": summary["steps"],
        "wall_s": round(wall, 3),
        "tokens_total": summary["tokens_total"],
        "tokens_nonpad": summary["tokens_nonpad"],
        "tokens_supervised": summary["tokens_supervised"],
        "nonpad_tok_per_s": round(summary["tokens_nonpad"] / wall, 1),
        "total_tok_per_s": round(summary["tokens_total"] / wall, 1),
        "supervised_tok_per_s": round(summary["tokens_supervised"] / wall, 1),
        **(steady or {}),
        "pad_fraction": round(1 - summary["tokens_nonpad"] / max(1, summary["tokens_total"]), 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "process_cpu_user_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 2),
        "process_cpu_sys_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_stime, 2),
        "process_minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        "malloc_tuning": os.environ.get("FAMTUNE_MALLOC_TUNING", "1") != "0",
        "compute_dtype": args.compute_dtype,
        "kernels": summary.get("kernels"),
        "torch_threads": torch.get_num_threads(),
        "total_run_s": round(total_s, 1),
    }
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
