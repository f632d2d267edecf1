"""What a training run leaves on disk: metrics.jsonl, resumable checkpoints, the loss curve.

A checkpoint (``OUTPUT/checkpoints/step-N/``) holds the adapter weights (safetensors), the
optimizer and scheduler state, every RNG state and the data position. It is read back with
``torch.load(weights_only=True)``: plain tensors and containers, never arbitrary pickles.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError

CHECKPOINTS = "checkpoints"


class StopOnInterrupt:
    """The first Ctrl-C (SIGINT) asks the run to stop at the next optimizer-step boundary, where
    its state is consistent and can be saved; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nfamtune: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
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


def save_checkpoint(out: Path, step: int, epoch: int, micro_in_epoch: int, model, optimizer, scheduler,
                    accelerator, extra: dict[str, Any] | None = None) -> Path:
    import torch

    path = Path(out) / CHECKPOINTS / f"step-{step}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "epoch": epoch, "batch_in_epoch": micro_in_epoch, **(extra or {})}, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # a checkpoint is either complete or absent
    accelerator.wait_for_everyone()
    return path


def find_checkpoint(out: Path, resume: str | bool) -> Path:
    if isinstance(resume, str) and resume not in ("true", "latest"):
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise FamtuneError(f"{resume}: not a famtune checkpoint (no trainer_state.json)")
        return path
    root = Path(out) / CHECKPOINTS
    found = sorted((p for p in root.glob("step-*") if (p / "trainer_state.json").exists()),
                   key=lambda p: int(p.name.split("-")[1])) if root.exists() else []
    if not found:
        raise FamtuneError(f"{root}: no checkpoint to resume from; run without --resume or set save_steps")
    return found[-1]


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> tuple[int, int, int]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    # safetensors names the CPU "cpu" only; accelerate's multi-process CPU device is "cpu:0"
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    weights = load_file(str(path / "adapter_model.safetensors"), device=device)
    set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location=device))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state["step"], state["epoch"], state["batch_in_epoch"]


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
