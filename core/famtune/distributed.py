"""Data parallelism inside one training process: which samples this rank trains on, and the few
collectives that make N processes train exactly like one.

famtune's batch order is a pure function of (seed, epoch): one list of *units* (sample indices, or
packed rows) per epoch. A global micro-batch is the next ``world x batch_size`` units of that list;
each rank takes its contiguous share of it. So N processes with per-device batch b train on the
same samples at every optimizer step as one process with batch N x b, and the data position saved
in a checkpoint (units consumed in the epoch) does not depend on the number of processes: a run
saved by 2 processes resumes in 1 and vice versa.

The launcher (torchrun) is in :mod:`famtune.launch`; this module runs in each worker.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError

#: Seconds a collective waits for a missing peer before the run fails (torch's default is 30 min).
DEFAULT_TIMEOUT_S = 600
TIMEOUT_ENV = "FAMTUNE_DIST_TIMEOUT"
#: The recipe's ``distributed`` key: how the model is spread over processes when there are several.
PRESETS = ("ddp", "fsdp", "zero2", "zero3")


def launched_worker() -> bool:
    """Whether this process was started by a launcher (torchrun, accelerate launch) as one rank."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this run's workers (0 on the first try)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def resume_after_restart(resume: str | bool | None, output_dir: str) -> str | bool | None:
    """The resume setting for this worker. After an elastic restart (``--max-restarts``) the workers
    run the same command again; they continue from the last complete checkpoint instead of starting
    the run over (and from scratch when the first attempt saved none)."""
    if resume or restart_count() == 0:
        return resume
    from famtune.run_state import CHECKPOINTS

    root = Path(output_dir) / CHECKPOINTS
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").exists()] if root.exists() else []
    return "latest" if done else None


def timeout_seconds() -> int:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise FamtuneError(f"{TIMEOUT_ENV}={raw!r}; expected a positive number of seconds")
    return seconds


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched_worker() else 1


def make_accelerator(recipe, **extra: Any):
    """The run's Accelerator: gloo on CPU, NCCL on CUDA, a bounded wait for missing peers, and the
    recipe's sharding preset (see :mod:`famtune.presets`); ``extra`` are more Accelerator keyword
    arguments (the experiment trackers)."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    from famtune.checkpoint import resolve_dtype
    from famtune.presets import accelerate_plugins

    # accelerate only picks its multi-CPU (gloo) mode when told the run has no accelerator.
    cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "cpu": cpu,
        "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_seconds()))],
        # famtune shards its own batches and counts optimizer steps over the whole world; without
        # split_batches accelerate's scheduler would advance once per process at every step.
        "dataloader_config": DataLoaderConfiguration(split_batches=True),
        **extra,
    }
    if world_size() > 1:
        if recipe.distributed == "fsdp" and recipe.save_steps:
            raise FamtuneError(
                f"distributed: fsdp with save_steps: {recipe.save_steps}: famtune cannot save "
                "resumable checkpoints of a sharded run yet; set save_steps: 0, or use ddp"
            )
        kwargs.update(
            accelerate_plugins(
                recipe.distributed,
                batch_size=recipe.batch_size,
                grad_accum=recipe.grad_accum,
                max_grad_norm=recipe.max_grad_norm,
                world=world_size(),
                compute_dtype_name=str(resolve_dtype(recipe.compute_dtype)).removeprefix("torch."),
            )
        )
    accelerator = Accelerator(**kwargs)
    if cpu and "fsdp_plugin" in kwargs:
        # accelerate turns FSDP on for accelerator devices only and would silently run DDP here;
        # FSDP2 itself runs on CPU processes (gloo), which is how famtune tests the preset.
        from accelerate.utils import DistributedType

        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = kwargs["fsdp_plugin"]
    return accelerator


def full_state_dict(accelerator, model) -> dict[str, Any] | None:
    """The whole (gathered) state dict of a sharded model (FSDP2, ZeRO-3), for the main process
    to save; every process must call this. None when each process holds the whole model."""
    from torch.distributed.fsdp import FSDPModule

    state: Any
    if isinstance(model, FSDPModule):
        # asked of torch directly: accelerate's own FSDP flag does not survive on CPU processes
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        torch_module: Any = model
        state = get_model_state_dict(torch_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is None or plugin.zero_stage != 3:
            return None
        state = accelerator.get_state_dict(model)
    # plain tensors with storage of their own: PEFT's save_pretrained reads storage pointers
    return {k: v.detach().cpu().clone() for k, v in (state or {}).items()}


def quantization_settings(recipe) -> dict[str, Any] | None:
    """The exact NF4 settings when the preset changes famtune's defaults (4-bit storage in the
    compute dtype under parameter sharding), else None."""
    from famtune.checkpoint import resolve_dtype
    from famtune.presets import PARAMETER_SHARDING, nf4_settings

    if recipe.quantization != "nf4" or world_size() == 1 or recipe.distributed not in PARAMETER_SHARDING:
        return None
    return nf4_settings(recipe.distributed, str(resolve_dtype(recipe.compute_dtype)).removeprefix("torch."))


def split_evenly(chunk: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Rank ``rank``'s contiguous share of ``chunk``; shares differ in size by at most one."""
    base, extra = divmod(len(chunk), world)
    start = rank * base + min(rank, extra)
    return list(chunk[start : start + base + (1 if rank < extra else 0)])


@dataclass(frozen=True)
class MicroBatch:
    """This rank's units of one global micro-batch. ``real`` is False for a stand-in: when a final
    global batch has fewer units than ranks, a rank without a share still runs forward and backward
    (every rank must take part in each gradient all-reduce) on a copy of one unit with no label."""

    units: list[Any]
    real: bool = True


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1
    accelerator: Any = None

    @classmethod
    def of(cls, accelerator) -> DataParallel:
        return cls(accelerator.process_index, accelerator.num_processes, accelerator)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def global_micro_batches(self, n_units: int, batch_size: int) -> int:
        return -(-n_units // (batch_size * self.world))

    def step_batches(
        self, units: Sequence[Any], start: int, batch_size: int, grad_accum: int
    ) -> tuple[list[MicroBatch], int]:
        """This rank's micro-batches of the optimizer step that begins at ``units[start]``, and the
        position after it. Every rank gets the same number of micro-batches."""
        group, pos = [], start
        for _ in range(grad_accum):
            chunk = units[pos : pos + batch_size * self.world]
            if not chunk:
                break
            mine = split_evenly(chunk, self.rank, self.world)
            group.append(MicroBatch(mine) if mine else MicroBatch([chunk[0]], real=False))
            pos += len(chunk)
        return group, pos

    def eval_batches(self, n_batches: int) -> list[int | None]:
        """Indices of the evaluation batches this rank scores; ``None`` stands for a forward pass
        whose result is dropped, so every rank runs as many passes as the others."""
        mine: list[int | None] = list(range(self.rank, n_batches, self.world))
        rounds = -(-n_batches // self.world)
        return mine + [None] * (rounds - len(mine))

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over all ranks (no communication in a single process)."""
        if self.world == 1:
            return [float(v) for v in values]
        import torch

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.accelerator.device)
        return [float(v) for v in self.accelerator.reduce(t, reduction="sum")]


def data_position(state_dir: Path, batch_in_epoch: int, batch_size: int) -> int:
    """Units consumed in the epoch at a checkpoint. Checkpoints written before the position was
    saved in units (single process only) counted micro-batches of ``batch_size``."""
    import json

    state = json.loads((Path(state_dir) / "trainer_state.json").read_text())
    if "units_in_epoch" in state:
        return int(state["units_in_epoch"])
    return batch_in_epoch * batch_size


def refuse_when_sharded(command: str) -> None:
    """Merging and chatting load one whole model in one process: under a launcher they would run
    once per rank and race on the output."""
    if launched_worker() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FamtuneError(
            f"`famtune {command}` runs in one process; it was started as rank "
            f"{os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']} by a launcher "
            f"(torchrun/accelerate launch). Run it directly: famtune {command} ..."
        )
