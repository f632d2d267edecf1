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
RESULT line names the attention path the run used (summary.json's ``attention``). ``--profile``
profiles the steps after the first with torch.profiler and reports each phase of a step (the names
famtune's trainer gives them) in ms per step, split by kind of work, with its most expensive ops
(docs/users/performance.md).

    python bench/train_throughput.py [--mode pack|nopack] [--shape tiny|wide] [--max-length 512]
        [--batch 8] [--workdir /tmp/famtune-bench] [--steps 30] [--profile]
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


# The training step's phases, as famtune's trainer names them (torch.profiler.record_function).
PHASES = ("famtune.collate", "famtune.forward", "famtune.backward", "famtune.clip_grad", "famtune.optimizer")
# Regions inside a phase reported on their own: the output head with its loss (fused) or the loss.
REGIONS = ("famtune.head_loss", "famtune.loss")
GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "aten::addmv", "aten::mv"}
COPIES = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat", "aten::index"}


def kind_of(name: str) -> str:
    """The kind of work of one profiled op, from its name."""
    low = name.lower()
    if "dequant" in low or "bitsandbytes" in low or "quantize_4bit" in low:
        return "nf4 dequantize"
    if name in GEMM:
        return "gemm"
    if "scaled_dot_product" in low or "attention" in low or "flash" in low:
        return "attention"
    if name in COPIES:
        return "copies and casts"
    if "embedding" in low:
        return "embedding"
    return "other ops"


def phase_profile(events, steps: int, wall_s: float) -> dict:
    """Milliseconds per step of each phase, split by kind of work (ops' self time, the output head
    and its loss as one kind), and the part of the wall time spent outside the phases (logging,
    the data order, Python between steps)."""
    steps = max(steps, 1)
    phases: dict[str, dict[str, float]] = {p.split(".")[1]: {} for p in PHASES}
    totals = dict.fromkeys(phases, 0.0)
    ops: dict[str, dict[str, float]] = {p: {} for p in phases}
    for ev in events:
        if ev.name in PHASES:
            totals[ev.name.split(".")[1]] += ev.cpu_time_total
        phase, region, parent = None, None, ev
        while parent is not None:
            if parent.name in REGIONS and region is None:
                region = "output head + loss" if parent.name == "famtune.head_loss" else "loss"
            if parent.name in PHASES:
                phase = parent.name.split(".")[1]
                break
            parent = parent.cpu_parent
        if phase is None or ev.name in PHASES or ev.name in REGIONS:
            continue
        kind = region or kind_of(ev.name)
        phases[phase][kind] = phases[phase].get(kind, 0.0) + ev.self_cpu_time_total
        op = f"{region}: {ev.name}" if region else ev.name
        ops[phase][op] = ops[phase].get(op, 0.0) + ev.self_cpu_time_total
    ms = 1000.0 * steps
    out: dict = {"steps": steps, "step_ms": round(wall_s * 1000 / steps, 1), "phases": {}}
    for name, kinds in phases.items():
        out["phases"][name] = {
            "ms": round(totals[name] / ms, 1),
            "by_kind": {k: round(v / ms, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v / ms >= 0.05},
            "top_ops": {k: round(v / ms, 1) for k, v in sorted(ops[name].items(), key=lambda kv: -kv[1])[:8]},
        }
    inside = sum(totals.values()) / ms
    out["outside_phases_ms"] = round(out["step_ms"] - inside, 1)
    return out


def format_profile(p: dict) -> str:
    lines = [f"per-step profile over {p['steps']} steps: {p['step_ms']} ms/step"]
    for name, ph in p["phases"].items():
        share = 100 * ph["ms"] / p["step_ms"] if p["step_ms"] else 0
        kinds = ", ".join(f"{k} {v}" for k, v in ph["by_kind"].items())
        lines.append(f"  {name:<10} {ph['ms']:>9.1f} ms {share:5.1f}%  ({kinds})")
        if ph["ms"] >= 0.05 * p["step_ms"]:
            lines.append("  " + " " * 10 + " top ops: " + ", ".join(f"{k} {v}" for k, v in ph["top_ops"].items()))
    lines.append(f"  {'outside':<10} {p['outside_phases_ms']:>9.1f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/famtune-bench")
    ap.add_argument("--mode", choices=["pack", "nopack"], default="pack")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shape", choices=["tiny", "wide"], default="tiny", help="the fixture's model shape")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per (packed) row")
    ap.add_argument("--batch", type=int, default=8, help="rows (or samples) per step")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile the steps after the first (torch.profiler) and report each phase's time by kind of work",
    )
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
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.profile else None
    profiled: dict[str, float] = {}

    def log(*a):
        print(*a, file=sys.stderr)
        m = re.match(r"step (\d+)/", str(a[0])) if a else None
        if m:
            cpu_at[int(m.group(1))] = time.process_time()
            if profiler is not None and int(m.group(1)) == 1:  # the first step's warm-up is left out
                profiler.start()
                profiled["t0"] = time.perf_counter()

    t0 = time.perf_counter()
    summary = train(recipe, log=log, overwrite=True)  # a rerun replaces the previous one
    total_s = time.perf_counter() - t0
    profile = None
    if profiler is not None and "t0" in profiled:
        wall_profiled = time.perf_counter() - profiled["t0"]
        profiler.stop()
        profile = phase_profile(profiler.events(), summary["steps"] - 1, wall_profiled)
        print(format_profile(profile), file=sys.stderr)
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
        **({"profile": profile} if profile else {}),
    }
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
