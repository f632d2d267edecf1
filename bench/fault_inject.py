"""Seeded SIGKILL sweep over `famtune train`: for each seed, kill a run at random moments (after a
random number of steps, or inside a checkpoint write or the final save), continue it each time, and
check the final adapter is bit-identical to an uninterrupted run's.

    .venv/bin/python bench/fault_inject.py --seeds 5 --kills 3 [--workdir /tmp/famtune-faults]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from faultkit import kill_randomly_until_done, run_train, write_recipe

from conftest import build_tiny


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=3, help="kill attempts per seed")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="famtune-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny"
    if not (model / "config.json").exists():
        build_tiny("qwen2.5", model)
    ref = write_recipe(work / "ref.yaml", model, work / "ref")
    if not (work / "ref" / "summary.json").exists():
        shutil.rmtree(work / "ref", ignore_errors=True)
        assert run_train(ref).returncode == 0
    expected = (work / "ref" / "adapter_model.safetensors").read_bytes()
    total = {"runs": 0, "kills": 0, "resumes": 0, "exact": 0, "tracebacks": 0}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        out = work / f"seed-{seed}"
        shutil.rmtree(out, ignore_errors=True)
        recipe = write_recipe(work / f"seed-{seed}.yaml", model, out)
        fig = kill_randomly_until_done(recipe, out, seed, args.kills, log=lambda line: print(line, flush=True))
        exact = fig["rc"] == 0 and (out / "adapter_model.safetensors").read_bytes() == expected
        print(json.dumps({"seed": seed, **fig, "exact": exact}), flush=True)
        total["runs"] += 1
        total["exact"] += exact
        for key in ("kills", "resumes", "tracebacks"):
            total[key] += fig[key]
    print(json.dumps({"total": total}))
    return 0 if total["exact"] == total["runs"] and total["tracebacks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
