#!/usr/bin/env python
"""famtune against LLaMA-Factory and TRL on the shared fixture, workload by workload, in one run.

These machines are shared and noisy, so a throughput figure only means something next to its
peers measured minutes apart: for each workload (``SHAPE@MAX_LENGTHxBATCH``) and round this runs
LLaMA-Factory (``baseline_llamafactory.py``, neat_packing), TRL (``../shared/bench/baseline_trl.py``,
no packing, what most TRL users run) and famtune (``train_throughput.py``, packed), one process
each, with the shared settings, and prints a table per workload: non-pad tokens/s, peak RSS, final
loss, and famtune's ratio to each peer.

The peers live in their own virtualenvs (their pins conflict with famtune's lock):
``--trl-python`` (a venv with trl; see ../shared/bench/README.md) and ``--lf-python`` (see
``baseline_llamafactory.py``). A peer whose interpreter is missing is reported as skipped, with why.

    python bench/compare_peers.py [--workloads tiny@512x8,wide@512x8,tiny@4096x1] [--steps 10]
        [--rounds 1] [--trl-python /work/trlvenv/bin/python] [--lf-python /tmp/lfvenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
DEFAULT_TRL_PYTHON = "/work/trlvenv/bin/python"
DEFAULT_LF_PYTHON = "/tmp/lfvenv/bin/python"
DEFAULT_WORKLOADS = "tiny@512x8,wide@512x8,tiny@4096x1"


@dataclass(frozen=True)
class Workload:
    shape: str
    max_length: int
    batch: int

    @classmethod
    def parse(cls, text: str) -> Workload:
        m = re.fullmatch(r"(tiny|wide)@(\d+)x(\d+)", text.strip())
        if not m:
            raise SystemExit(f"workload {text!r}: expected SHAPE@MAX_LENGTHxBATCH, e.g. tiny@512x8 or wide@512x8")
        return cls(m[1], int(m[2]), int(m[3]))

    def __str__(self) -> str:
        return f"{self.shape}@{self.max_length}x{self.batch}"


def interpreter_problem(python: str, modules: str, what: str) -> str | None:
    """Why ``python`` cannot run a peer, or None."""
    if not Path(python).exists():
        return f"{python} does not exist (pass the python of a venv with {what})"
    probe = subprocess.run(
        [python, "-c", f"import {modules}"],
        capture_output=True,
        text=True,
        env={"DISABLE_VERSION_CHECK": "1", "PATH": "/usr/bin:/bin"},
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{what} does not import in {python} ({last})"
    return None


def run_result(cmd: list[str], label: str) -> dict:
    print(f"[compare] {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        return {"error": f"{label} failed (exit {proc.returncode}): {tail[-1500:]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def fixture_dir(work: Path, shape: str) -> Path:
    # train_throughput.py's folders, so famtune and the peers read the same files.
    fixture = work / ("fixture" if shape == "tiny" else f"fixture-{shape}")
    if not (fixture / "model" / "model.safetensors").exists():
        subprocess.run(
            [sys.executable, str(SHARED_BENCH / "make_fixture.py"), str(fixture), "--shape", shape],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return fixture


def commands(w: Workload, fixture: Path, work: Path, steps: int, trl: str, lf: str) -> dict[str, list[str]]:
    common = ["--steps", str(steps), "--max-length", str(w.max_length), "--batch", str(w.batch)]
    return {
        "llamafactory neat_packing": [
            lf,
            str(ROOT / "bench" / "baseline_llamafactory.py"),
            "--fixture",
            str(fixture),
            "--mode",
            "neat_packing",
            "--workdir",
            str(work / "lf-out"),
            *common,
        ],
        "trl nopack": [
            trl,
            str(SHARED_BENCH / "baseline_trl.py"),
            "--fixture",
            str(fixture),
            "--mode",
            "nopack",
            "--threads",
            "2",
            "--workdir",
            str(work / "trl-out"),
            *common,
        ],
        "famtune pack": [
            sys.executable,
            str(ROOT / "bench" / "train_throughput.py"),
            "--shape",
            w.shape,
            "--mode",
            "pack",
            "--workdir",
            str(work),
            *common,
        ],
    }


def table(w: Workload, results: dict[str, list[dict]], skipped: dict[str, str]) -> str:
    def med(rows: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    fam = results.get("famtune pack", [])
    fam_tps = med(fam, "nonpad_tok_per_s")
    fam_rss = med(fam, "peak_rss_mib")
    lines = [
        f"### {w}  (fixture {w.shape}, max_length {w.max_length}, batch {w.batch})",
        "",
        "| framework / mode | non-pad tok/s | peak RSS MiB | final loss | famtune speed-up | famtune RSS ratio |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        errors = [r["error"] for r in rows if "error" in r]
        if errors and len(errors) == len(rows):
            lines.append(f"| {label} | failed: {errors[0].splitlines()[0][:120]} | | | | |")
            continue
        tps, rss, loss = med(rows, "nonpad_tok_per_s"), med(rows, "peak_rss_mib"), med(rows, "final_loss")
        speed = f"{fam_tps / tps:.2f}x" if fam_tps and tps and label != "famtune pack" else ""
        mem = f"{fam_rss / rss:.2f}" if fam_rss and rss and label != "famtune pack" else ""
        lines.append(f"| {label} | {tps:,.0f} | {rss:,.0f} | {loss:.4f} | {speed} | {mem} |")
    for label, why in skipped.items():
        lines.append(f"| {label} | skipped: {why} | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/famtune-peers")
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    ap.add_argument("--lf-python", default=DEFAULT_LF_PYTHON)
    ap.add_argument("--only", default="", help="comma-separated subset: famtune, llamafactory, trl")
    args = ap.parse_args(argv)
    workloads = [Workload.parse(t) for t in args.workloads.split(",") if t.strip()]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    skipped_all = {
        "llamafactory neat_packing": interpreter_problem(args.lf_python, "llamafactory, bitsandbytes", "llamafactory"),
        "trl nopack": interpreter_problem(args.trl_python, "trl, peft, bitsandbytes, datasets", "trl"),
    }
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    report = []
    for w in workloads:
        fixture = fixture_dir(work, w.shape)
        cmds = commands(w, fixture, work, args.steps, args.trl_python, args.lf_python)
        skipped = {k: v for k, v in skipped_all.items() if v}
        results: dict[str, list[dict]] = {}
        for rnd in range(1, args.rounds + 1):
            for label, cmd in cmds.items():
                if label in skipped or (only and label.split()[0] not in only):
                    continue
                res = run_result(cmd, f"{w} round {rnd} {label}")
                res["workload"] = str(w)
                results.setdefault(label, []).append(res)
                print("RESULT " + json.dumps(res), flush=True)
        report.append(table(w, results, skipped))
        print(report[-1] + "\n", flush=True)
    print("\n\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
