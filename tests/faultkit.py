"""Fault injection for `famtune train`: real processes, real SIGKILLs, real corrupt files.

Used by tests/test_faults.py (a few targeted kills) and bench/fault_inject.py (a seeded sweep).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from famtune.demo import DEMO_DIR

# Every run of one experiment must compute the same thing: same thread count, no malloc tuning drift.
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SETTINGS = dict(
    max_steps=6,
    save_steps=2,
    batch_size=2,
    max_length=128,
    lora_dropout=0.1,
    evaluation_inputs=[],
    progress=False,
    logging_steps=1,
    packing=False,
)


def write_recipe(path: Path, model: Path, out: Path, **extra) -> Path:
    recipe = {
        "model": str(model),
        "data": str(DEMO_DIR / "identity.jsonl"),
        "output_dir": str(out),
        **SETTINGS,
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def train_cmd(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "famtune.cli", "train", str(recipe), *args]


def run_train(recipe: Path, *args: str, crash_at: str | None = None, timeout: int = 600):
    env = {**os.environ, **RUN_ENV}
    env.pop("FAMTUNE_CRASH_AT", None)
    if crash_at:
        env["FAMTUNE_CRASH_AT"] = crash_at
    return subprocess.run(train_cmd(recipe, *args), capture_output=True, text=True, env=env, timeout=timeout)


def start_train(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        train_cmd(recipe, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **RUN_ENV},
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train ended (rc {proc.returncode}) before the awaited moment:\n{proc.stderr.read()}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.exists() else 0


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text


def flip_bit(path: Path, seed: int) -> int:
    """Flip one bit at a seeded position; returns the byte offset."""
    data = bytearray(path.read_bytes())
    pos = random.Random(seed).randrange(len(data))
    data[pos] ^= 1 << random.Random(seed + 1).randrange(8)
    path.write_bytes(bytes(data))
    return pos


def verified_checkpoint_exists(out: Path) -> bool:
    return any(
        p.parent.name.startswith("step-") and not p.parent.name.endswith(".tmp")
        for p in (out / "checkpoints").glob("*/manifest.json")
    )


def kill_randomly_until_done(recipe: Path, out: Path, seed: int, max_kills: int, log=print) -> dict:
    """Run, SIGKILL at a seeded random moment (after a random number of steps, or at a named point
    inside a checkpoint write or the final save), continue, repeat; then finish. Returns the figures."""
    rng = random.Random(seed)
    figures = {"kills": 0, "resumes": 0, "tracebacks": 0, "rc": None}
    points = [
        "checkpoint_write:1",
        "checkpoint_write:2",
        "checkpoint_write:3",
        "checkpoint_rename:1",
        "checkpoint_rename:2",
        "final_save",
    ]
    args: tuple[str, ...] = ()
    for _ in range(max_kills):
        if rng.random() < 0.5:
            res = run_train(recipe, *args, crash_at=rng.choice(points))
            killed, err = res.returncode == -signal.SIGKILL, res.stderr
        else:
            proc = start_train(recipe, *args)
            base, after = steps_logged(out) if args == ("--resume",) else 0, rng.randrange(1, SETTINGS["max_steps"])
            try:
                wait_for(lambda base=base, after=after: steps_logged(out) >= base + after, proc)
                time.sleep(rng.uniform(0, 0.3))
            except AssertionError:
                pass
            killed = proc.poll() is None
            if killed:
                proc.kill()
            _, err = proc.communicate(timeout=600)
        figures["tracebacks"] += has_traceback(err)
        figures["kills"] += killed
        log(f"seed {seed}: {'killed' if killed else 'ended'} ({' '.join(args) or 'new run'})")
        if (out / "summary.json").exists():
            break
        args = ("--resume",) if verified_checkpoint_exists(out) else ("--overwrite",)
        figures["resumes"] += args == ("--resume",)
    if not (out / "summary.json").exists():
        res = run_train(recipe, *args)
        figures["tracebacks"] += has_traceback(res.stderr)
        figures["rc"] = res.returncode
    else:
        figures["rc"] = 0
    return figures
