"""The training loss, with the output head run only where a label is supervised.

A causal LM's head turns every position's hidden state into a vocabulary-sized row of logits,
but the loss reads only the rows whose next token is supervised (assistant tokens: about half of
a chat batch). On a 7B chat model the head and its logits are the largest single cost: a
152k-token vocabulary makes 1.2 GB of fp32 logits per 2k tokens, forward and backward. Here a
forward pre-hook on the model's output embeddings keeps only the supervised positions' hidden
states, so the head, whatever the family's forward does after it (scaling, soft-capping, the
cast to fp32), and the cross-entropy run on those rows alone. The loss is the same sum over the
same tokens as the model's own loss, divided by the same token count.

If a model does not route its logits through its output-embedding module, the hook never fires;
the full logits then come back and the loss is taken from them, so the result is the same, only
slower.
"""
from __future__ import annotations

from typing import Any

from famtune.encoding import IGNORE_INDEX


def next_token_targets(labels):
    """``(mask, targets)``: positions whose next token is supervised, and those next tokens."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask[:, :-1]]


class SupervisedHead:
    """Context for one forward pass: the output head sees only the rows in ``mask``."""

    def __init__(self, model) -> None:
        while hasattr(model, "module"):  # DDP, FSDP and DeepSpeed wrappers
            model = model.module
        self.head = model.get_output_embeddings()
        self.mask = None
        self.fired = False

    def _select(self, module, args, kwargs):
        self.fired = True
        hidden = args[0]
        return (hidden[self.mask],) + tuple(args[1:]), kwargs

    def __call__(self, mask):
        self.mask = mask
        self.fired = False
        return self

    def __enter__(self):
        self.handle = self.head.register_forward_pre_hook(self._select, with_kwargs=True) if self.head is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.mask = None


def causal_lm_loss(model, batch: dict[str, Any], num_items):
    """Summed next-token cross-entropy over the supervised labels, divided by ``num_items``.

    ``batch`` holds ``input_ids``, ``labels`` and either ``attention_mask`` or ``position_ids``;
    ``num_items`` is the supervised-token count the loss is normalised by (that of the whole
    accumulated step, so micro-batches weigh by their tokens).
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask, targets = next_token_targets(labels)
    with SupervisedHead(model)(mask) as head:
        logits = model(**inputs).logits
    if head.fired and logits.dim() == 2:
        picked = logits
    else:  # the head ran on every position: take the supervised rows from the full logits
        picked = logits[mask]
    return F.cross_entropy(picked.float(), targets, reduction="sum") / num_items
