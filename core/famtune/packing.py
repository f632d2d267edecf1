"""Packing: several samples per row of ``max_length`` tokens, kept apart inside the model.

Padding a batch to its longest sample wastes about half the compute on chat data. Packing fills
each row with whole samples (best-fit decreasing) and tells the model where each one starts with
position ids that restart at 0. transformers turns restarting position ids into a per-row
block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``) when no 2-D attention
mask is given, so no token attends across a sample boundary. That mask still costs one
``max_length`` x ``max_length`` block per row; with ``boundaries=True`` the collator also passes the
sample boundaries (transformers' varlen kwargs, computed once per batch) so the attention chosen
by ``famtune.attention`` runs per sample and skips the blocks between samples.
Whether a family's model honours packing at all is the plugin's answer to ``famtune_supports_packing``.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import Any

from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError


def best_fit_decreasing(lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity``.

    Longest first, each item goes to the open bin whose free space is the smallest that still
    fits it (best fit); ``order`` breaks ties between equal lengths, so a shuffled order gives a
    different but equally tight packing each epoch.
    """
    if order is None:
        order = range(len(lengths))
    rank = {i: k for k, i in enumerate(order)}
    items = sorted(rank, key=lambda i: (-lengths[i], rank[i]))
    bins: list[list[int]] = []
    # Open bins as (free space, bin number), kept sorted so the best fit is one bisect away.
    free: list[tuple[int, int]] = []
    for i in items:
        n = lengths[i]
        if n > capacity:
            raise FamtuneError(
                f"a sample of {n} tokens does not fit a packed row of {capacity}; "
                "truncate samples to max_length before packing"
            )
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def epoch_rows(lengths: Sequence[int], capacity: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed rows of one epoch, in training order: a pure function of (seed, epoch)."""
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = best_fit_decreasing(lengths, capacity, order)
    rng.shuffle(rows)
    return rows


def collate_packed(rows: list[list[Any]], pad_id: int, device, boundaries: bool = False) -> dict[str, Any]:
    """Rows of samples (each with ``input_ids`` and ``labels``) into one right-padded batch.

    No attention mask: the restarting ``position_ids`` carry the sample boundaries, and padding
    at a row's end is a block of its own that no real token attends to. The label of each
    sample's first token is ignored so the loss never asks the previous sample's last token to
    predict it. With ``boundaries``, the batch also carries the varlen attention kwargs
    (``famtune.attention.sample_boundaries``).
    """
    import torch

    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.input_ids)
            ids[r, at : at + n] = torch.tensor(s.input_ids)
            labels[r, at : at + n] = torch.tensor(s.labels)
            labels[r, at] = IGNORE_INDEX
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device)}
    if boundaries:
        from famtune.attention import sample_boundaries

        cuts = sample_boundaries([[len(s.input_ids) for s in row] for row in rows], width)
        batch.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cuts.items()})
    return batch
