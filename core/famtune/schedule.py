"""The learning-rate schedule: linear warmup, then cosine decay to 0 at the last step.

Changing the step budget on ``--resume`` (``max_steps`` or ``epochs``) never makes the rate jump:
from the resume step the rate decays by the same cosine from its value there to 0 at the new last
step. Each such change is a segment ``[start_step, start_factor, end_step]`` kept in the checkpoint,
so a later resume rebuilds the exact schedule the run has followed.
"""

from __future__ import annotations

import math
from typing import Any


def lr_factor(step: int, warmup: int, total: int, segments: list[list[float]]) -> float:
    """The multiplier of the peak learning rate at ``step`` (the same formula as transformers'
    ``get_cosine_schedule_with_warmup``, so a run without segments matches it bit for bit)."""
    for start, factor, end in reversed(segments):
        if step >= start:
            progress = float(step - start) / float(max(1, end - start))
            return factor * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def build_scheduler(optimizer: Any, warmup: int, total: int, segments: list[list[float]]) -> Any:
    from torch.optim.lr_scheduler import LambdaLR

    # A plain function (not a callable object): LambdaLR then keeps it out of its state_dict, so a
    # loaded checkpoint cannot swap the schedule built here for an older one.
    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, segments)

    return LambdaLR(optimizer, factor)


def extend(segments: list[list[float]], at_step: int, warmup: int, old_total: int, new_total: int) -> list[list[float]]:
    """The segments after changing the last step from ``old_total`` to ``new_total`` at ``at_step``."""
    if new_total == old_total:
        return segments
    return [*segments, [at_step, lr_factor(at_step, warmup, old_total, segments), new_total]]
