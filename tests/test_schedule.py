"""The learning-rate schedule: transformers' warmup+cosine exactly, and no jump when --resume
changes the step budget."""

from __future__ import annotations

import math

import pytest

from famtune.schedule import build_scheduler, extend, lr_factor


def test_without_changes_it_is_transformers_cosine_bit_for_bit():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    for warmup, total in ((0, 1), (3, 40), (10, 17)):
        params = [torch.nn.Parameter(torch.zeros(1))]
        ours = build_scheduler(torch.optim.SGD(params, lr=0.3), warmup, total, [])
        theirs = get_cosine_schedule_with_warmup(torch.optim.SGD(params, lr=0.3), warmup, total)
        for _ in range(total + 2):
            assert ours.get_last_lr() == theirs.get_last_lr()
            ours.optimizer.step(), ours.step(), theirs.step()


@pytest.mark.parametrize("new_total", [20, 60, 11])
def test_a_changed_budget_continues_from_the_current_rate_down_to_zero(new_total):
    warmup, old_total, at = 2, 30, 10
    segments = extend([], at, warmup, old_total, new_total)
    before = [lr_factor(s, warmup, old_total, []) for s in range(at + 1)]
    after = [lr_factor(s, warmup, old_total, segments) for s in range(new_total + 1)]
    assert after[: at + 1] == before  # the past is unchanged, and no jump at the resume step
    assert all(a >= b for a, b in zip(after[at:], after[at + 1 :]))  # decays monotonically
    assert after[new_total] == pytest.approx(0.0, abs=1e-12)
    # a second change chains from the first
    again = extend(segments, at + 1, warmup, old_total, new_total + 5)
    assert lr_factor(at + 1, warmup, old_total, again) == after[at + 1]
    assert lr_factor(new_total + 5, warmup, old_total, again) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(lr_factor(at, warmup, old_total, again), before[at])


def test_scheduler_state_from_a_checkpoint_cannot_replace_the_schedule():
    import torch

    params = [torch.nn.Parameter(torch.zeros(1))]
    old = build_scheduler(torch.optim.SGD(params, lr=1.0), 0, 10, [])
    for _ in range(5):
        old.optimizer.step(), old.step()
    new = build_scheduler(torch.optim.SGD(params, lr=1.0), 0, 10, extend([], 5, 0, 10, 20))
    new.load_state_dict(old.state_dict())
    new.optimizer.step(), new.step()
    assert new.get_last_lr()[0] == pytest.approx(lr_factor(6, 0, 10, extend([], 5, 0, 10, 20)))
