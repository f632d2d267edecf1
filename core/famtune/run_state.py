"""What a training run leaves on disk: metrics.jsonl, resumable checkpoints, the loss curve.

A checkpoint (``OUTPUT/checkpoints/step-N/``) holds the adapter weights (safetensors), the
optimizer and scheduler state, every RNG state and the data position. It is read back with
``torch.load(weights_only=True)``: plain tensors and containers, never arbitrary pickles.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from famtune import durable
from famtune.errors import FamtuneError
from famtune.faults import crash_point

CHECKPOINTS = "checkpoints"


class StopOnInterrupt:
    """The first SIGINT (Ctrl-C) or SIGTERM (what schedulers and ``docker stop`` send) asks the run
    to stop at the next optimizer-step boundary, where its state is consistent and can be saved;
    a second one of either ends the process at once."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"\nfamtune: {self.signal_name}: stopping after this step and saving a checkpoint (send it again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


class MetricsLog:
    """``metrics.jsonl``; only the main process writes it when several train together."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def reset(self) -> None:
        if self.enabled:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop what an interrupted run logged after its last checkpoint, so resumed steps are not doubled."""
        if not self.enabled:
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    np_state = json.loads(state["numpy"])
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_tensors(obj: Any, path: Path) -> None:
    import torch

    # Through a Python file object, so a full disk surfaces as OSError(ENOSPC) rather than
    # torch's "basic_ios::clear: iostream error".
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(
    out: Path,
    step: int,
    epoch: int,
    micro_in_epoch: int,
    model,
    optimizer,
    scheduler,
    accelerator,
    extra: dict[str, Any] | None = None,
    write_extra=None,
) -> Path:
    """Write ``checkpoints/step-N`` through ``step-N.tmp``: files, fsync, manifest, then one rename."""
    path = Path(out) / CHECKPOINTS / f"step-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            accelerator.unwrap_model(model).save_pretrained(tmp)
            crash_point("checkpoint_write")
            _save_tensors(optimizer.state_dict(), tmp / "optimizer.pt")
            crash_point("checkpoint_write")
            _save_tensors(scheduler.state_dict(), tmp / "scheduler.pt")
            _save_tensors(_rng_state(), tmp / "rng.pt")
            if write_extra is not None:
                write_extra(tmp)
            (tmp / "trainer_state.json").write_text(
                json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": micro_in_epoch, **(extra or {})}, indent=2)
                + "\n"
            )
            crash_point("checkpoint_write")
            durable.write_manifest(tmp)
            crash_point("checkpoint_rename")
            durable.replace_directory(tmp, path)  # a checkpoint is either complete or absent
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if durable.is_disk_full(exc):
                raise durable.disk_full_error(
                    path.parent,
                    _previous_size(path.parent),
                    f"the checkpoint of step {step} could not be written; free space, "
                    "then continue with: famtune train RECIPE --resume",
                ) from None
            raise
    accelerator.wait_for_everyone()
    return path


def _previous_size(root: Path) -> int | None:
    done = [p for p in root.glob("step-*") if _STEP_DIR.fullmatch(p.name)]
    return durable.directory_size(done[0]) if done else None


_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Finished-looking checkpoint directories, newest first (``step-N.tmp`` never counts)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def clean_stale(out: Path, log=print) -> None:
    """Remove ``*.tmp``/``*.old-*`` leftovers of writes a crash interrupted (the run lock is held)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and (p.name.endswith(".tmp") or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)
            log(f"famtune: removed {p}, left by an interrupted checkpoint write")


def find_checkpoint(out: Path, resume: str | bool, log=print) -> Path:
    """The checkpoint to resume from: the given one, or the newest whose manifest verifies."""
    if isinstance(resume, str) and resume not in ("true", "latest"):
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise FamtuneError(f"{resume}: not a famtune checkpoint (no trainer_state.json)")
        bad = durable.verify_manifest(path)
        if bad:
            raise FamtuneError(
                f"{resume}: damaged checkpoint ({bad}); resume from another one "
                "or with --resume alone to take the newest good one"
            )
        return path
    clean_stale(out, log)
    found = checkpoint_dirs(out)
    for path in found:
        bad = durable.verify_manifest(path)
        if bad is None:
            return path
        log(f"famtune: warning: skipping damaged checkpoint {path}: {bad}")
    root = Path(out) / CHECKPOINTS
    if found:
        raise FamtuneError(f"{root}: none of the {len(found)} checkpoints verifies; start again with --overwrite")
    raise FamtuneError(f"{root}: no checkpoint to resume from; run without --resume or set save_steps")


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FamtuneError(
            f"{path}/trainer_state.json: unreadable ({type(exc).__name__}); resume from another checkpoint"
        ) from None


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> tuple[int, int, int]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = read_trainer_state(path)
    # safetensors names the CPU "cpu" only; accelerate's multi-process CPU device is "cpu:0"
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    try:
        weights = load_file(str(path / "adapter_model.safetensors"), device=device)
        set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location=device))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    except Exception as exc:  # a verified checkpoint of another shape (e.g. another lora_r)
        raise FamtuneError(
            f"{path}: cannot be loaded into this run ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); resume with the recipe "
            "that wrote it, or start again with --overwrite"
        ) from None
    return state["step"], state["epoch"], state["batch_in_epoch"]


def save_adapter(out: Path, save) -> None:
    """The final adapter, written by ``save(directory)`` beside ``out`` first and moved in once
    complete, so an interrupted save never leaves a truncated ``adapter_model.safetensors`` in ``out``."""
    staging = Path(out) / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save(staging)
        crash_point("final_save")
        for f in staging.rglob("*"):
            if f.is_file():
                durable.fsync_path(f)
        for f in sorted(staging.iterdir(), key=lambda p: p.suffix == ".json"):  # weights first, config last
            target = Path(out) / f.name
            if f.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(f, target)
        durable.fsync_path(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss), in MiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_accelerator_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLog(metrics_path).records()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
