#!/usr/bin/env python
"""famtune against TRL on the shared fixture, interleaved in one invocation, with the ratio.

These machines are shared and noisy, so a throughput figure only means something next to the
baseline measured minutes apart: each round runs TRL (``baseline_trl.py --mode nopack``) and then
famtune (``train_throughput.py``, packed by default), one process each, and the ratio of their
non-pad tokens/s is reported per round and as the median over rounds.

TRL lives in its own virtualenv (``--trl-python``; default /work/trlvenv/bin/python when it exists).

    python bench/compare_trl.py [--rounds 1] [--steps 30] [--famtune-modes pack,nopack]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
DEFAULT_TRL_PYTHON = "/work/trlvenv/bin/python"


def run_result(cmd: list[str], label: str, log) -> dict:
    log(f"[compare] {label}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise SystemExit(f"{label} failed (exit {proc.returncode}); last lines of its log:\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def trl_problem(python: str | None) -> str | None:
    """Why TRL cannot run with this interpreter, or None."""
    if not python:
        return f"no TRL interpreter: {DEFAULT_TRL_PYTHON} does not exist; pass --trl-python PATH of a venv with trl"
    if not Path(python).exists():
        return f"--trl-python {python!r} does not exist; pass the python of a venv with trl installed"
    probe = subprocess.run([python, "-c", "import trl, peft, bitsandbytes, datasets"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"TRL is unavailable in {python} ({last}); install trl there or pass another --trl-python"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workdir", default="/tmp/famtune-bench")
    ap.add_argument("--famtune-modes", default="pack", help="comma-separated: pack, nopack")
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON if Path(DEFAULT_TRL_PYTHON).exists() else None)
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    problem = trl_problem(args.trl_python)
    if problem:
        print(f"TRL UNAVAILABLE: {problem}", flush=True)
        return 2
    modes = [m.strip() for m in args.famtune_modes.split(",") if m.strip()]
    work = Path(args.workdir)
    fixture = work / "fixture"
    if not (fixture / "model" / "model.safetensors").exists():
        subprocess.run(
            [sys.executable, str(SHARED_BENCH / "make_fixture.py"), str(fixture)], check=True, stdout=subprocess.DEVNULL
        )

    env_note = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if env_note:
        log(f"[compare] note: MALLOC_* set in this environment apply to both frameworks: {env_note}")
    rows = []
    for rnd in range(1, args.rounds + 1):
        trl = run_result(
            [
                args.trl_python,
                str(SHARED_BENCH / "baseline_trl.py"),
                "--fixture",
                str(fixture),
                "--mode",
                "nopack",
                "--steps",
                str(args.steps),
                "--threads",
                "2",
                "--workdir",
                str(work / "trl-out"),
            ],
            f"round {rnd} trl nopack",
            log,
        )
        rows.append((rnd, trl))
        print(
            f"round {rnd} trl nopack: {trl['nonpad_tok_per_s']} non-pad tok/s, peak RSS {trl['peak_rss_mib']} MiB, "
            f"final loss {trl['final_loss']}",
            flush=True,
        )
        for mode in modes:
            fam = run_result(
                [
                    sys.executable,
                    str(ROOT / "bench" / "train_throughput.py"),
                    "--mode",
                    mode,
                    "--steps",
                    str(args.steps),
                    "--workdir",
                    str(work),
                ],
                f"round {rnd} famtune {mode}",
                log,
            )
            rows.append((rnd, fam))
            print(
                f"round {rnd} famtune {mode}: {fam['nonpad_tok_per_s']} non-pad tok/s, peak RSS "
                f"{fam['peak_rss_mib']} MiB, final loss {fam['final_loss']} -> "
                f"{fam['nonpad_tok_per_s'] / trl['nonpad_tok_per_s']:.2f}x TRL nopack",
                flush=True,
            )
    for res in (r for _, r in rows):
        print("RESULT " + json.dumps(res), flush=True)
    for mode in modes:
        ratios = [
            f["nonpad_tok_per_s"] / t["nonpad_tok_per_s"]
            for (ra, t), (rb, f) in ((a, b) for a in rows for b in rows)
            if ra == rb and t["framework"] == "trl" and f["framework"] == "famtune" and f["mode"] == mode
        ]
        print(
            f"RATIO famtune {mode} / trl nopack: median {statistics.median(ratios):.2f}x over {len(ratios)} "
            f"round(s): {', '.join(f'{x:.2f}' for x in ratios)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
