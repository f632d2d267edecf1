"""The training loss: the output head runs only where a label is supervised, in chunks, fused with
the cross-entropy.

A causal LM's head turns every position's hidden state into a vocabulary-sized row of logits, but
the loss reads only the rows whose next token is supervised (assistant tokens: about half of a chat
batch). On a 7B chat model the head and its logits are the largest single cost: a 152k-token
vocabulary makes 1.2 GB of fp32 logits per 2k tokens, and the cross-entropy keeps three such
tensors (logits, log-softmax, gradient) at its peak.

famtune's loss, for every family:

1. A forward pre-hook on the model's output embeddings takes the hidden states of the supervised
   positions only.
2. Where the head is a plain linear layer whose output the model returns unchanged (checked once
   per model on a real batch: the model's logits for those rows must equal ``head(hidden)``
   exactly), the head is not run by the model at all: ``_FusedHeadLoss`` computes the logits a
   chunk of rows at a time, takes the summed cross-entropy and its gradient with respect to the
   hidden states in the same pass, and keeps only that gradient. The logits never exist for more
   than one chunk (at most ``CHUNK_ELEMENTS`` values).
3. Otherwise (a family that scales or soft-caps its logits after the head) the model's head runs
   on the supervised rows and the cross-entropy is taken from its logits.

Both give the same sum over the same tokens as the model's own loss, divided by the same token
count. If a model does not route its logits through its output-embedding module at all, the hook
never fires; the full logits then come back and the loss is taken from them.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from famtune.encoding import IGNORE_INDEX

# Logit values computed at once by the fused loss: 64M fp32 values = 256 MiB per chunk, about 440
# rows of a 152k vocabulary. The head's two GEMMs per chunk are most of the loss's time, and fewer
# rows make them slower: on the wide bench fixture (fp32 head, 2,187 rows) the loss took 6.3 s at
# 110 rows per chunk (16M values), 4.6 s at 440 and 4.2 s at 1,100 (bench/train_throughput.py --profile).
CHUNK_ELEMENTS = 1 << 26
# Rows the fusability check compares. A few rows decide it as well as all of them,
# and all of them would materialise the full logits the fused loss exists to avoid (2,300 rows of
# a 152k vocabulary are 1.4 GB of fp32, twice: the model's and the reference).
PROBE_ROWS = 16


def next_token_targets(labels):
    """``(mask, targets)``: positions whose next token is supervised, and those next tokens."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask[:, :-1]]


def _unwrap(model):
    while hasattr(model, "module"):  # DDP, FSDP and DeepSpeed wrappers
        model = model.module
    return model


class _HeadHook:
    """For one forward pass: the output head sees only the rows in ``mask``; with ``capture``
    it sees none of them and the selected hidden states are kept in ``hidden`` instead. A ``mask``
    of None selects every row (what a meta-device probe can do: boolean indexing needs values)."""

    def __init__(self, head, mask, capture: bool) -> None:
        self.head, self.mask, self.capture = head, mask, capture
        self.hidden = None
        self.fired = False

    def _select(self, module, args, kwargs):
        self.fired = True
        rows = args[0].flatten(0, -2) if self.mask is None else args[0][self.mask]
        if self.capture:
            self.hidden = rows
            rows = rows[:0]
        return (rows,) + tuple(args[1:]), kwargs

    def __enter__(self):
        self.handle = (
            self.head.register_forward_pre_hook(self._select, with_kwargs=True) if self.head is not None else None
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


@functools.cache
def _fused_head_loss_class():
    import torch

    class FusedHeadLoss(torch.autograd.Function):
        """``sum_i CE(hidden_i @ W.T + b, target_i) / num_items``, chunk by chunk; keeps d/d hidden."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, num_items):
            vocab = weight.shape[0]
            rows = max(1, CHUNK_ELEMENTS // vocab)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
            # An fp32 head (QLoRA's) writes every chunk's logits into one buffer: a host allocator
            # then serves one chunk-sized block per step instead of one per chunk, which fragment.
            fp32 = weight.dtype == torch.float32
            buffer = torch.empty((min(rows, hidden.shape[0]), vocab), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows]
                t = targets[start : start + rows]
                if fp32:  # what F.linear computes (mm, or addmm with the bias), into the buffer
                    logits = buffer[: len(t)]
                    if bias is None:
                        torch.mm(h.float(), weight.t(), out=logits)
                    else:
                        torch.addmm(bias, h.float(), weight.t(), out=logits)
                else:
                    logits = buffer[: len(t)].copy_(torch.nn.functional.linear(h.to(weight.dtype), weight, bias))
                # Softmax in place of the logits, so one chunk-sized tensor exists at a time.
                picked = logits.gather(1, t[:, None]).squeeze(1)
                top = logits.amax(dim=1, keepdim=True)
                probs = logits.sub_(top).exp_()
                norm = probs.sum(dim=1, keepdim=True)
                total += (norm.log() + top).squeeze(1).sub_(picked).sum()
                probs.div_(norm)
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[start : start + rows] = probs.to(weight.dtype) @ weight
            ctx.save_for_backward(grad, num_items)
            ctx.hidden_dtype = hidden.dtype
            return total / num_items

        @staticmethod
        def backward(ctx, grad_out):
            grad, num_items = ctx.saved_tensors
            return (grad * (grad_out / num_items)).to(ctx.hidden_dtype), None, None, None, None

    return FusedHeadLoss


# Models whose head output was checked against the fused computation: True if it matched.
_FUSABLE: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _fusable(model, head, inputs, every_row: bool = False) -> bool:
    """Whether ``model`` returns exactly ``head(hidden)`` (checked once per model, on the first
    ``PROBE_ROWS`` positions of a batch; every position with ``every_row``). Both probe passes
    start from the same random state and leave it as it was, so dropout draws the same masks in
    both and training's random stream is untouched.

    On the meta device (``famtune estimate``) there are no values to compare: the model must
    return the very tensor its head produced, which a soft-cap or a rescale would replace."""
    import torch

    if model in _FUSABLE:
        return _FUSABLE[model]
    ok = False
    mask = None
    if not every_row:
        # The first positions of the batch, supervised or not: any rows show whether the model
        # returns head(hidden), and the choice must not depend on the labels, or ranks of a
        # multi-process run holding different labels would run different passes (and collectives).
        ids = inputs["input_ids"]
        mask = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        mask[:PROBE_ROWS] = True
        mask = mask.view(ids.shape)
    if (
        isinstance(head, torch.nn.Linear)
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    ):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        produced: list[Any] = []
        try:
            with torch.no_grad():
                with torch.random.fork_rng(devices=devices), _HeadHook(head, mask, capture=True) as probe:
                    model(**inputs)
                seen = head.register_forward_hook(lambda module, args, out: produced.append(out))
                try:
                    with torch.random.fork_rng(devices=devices), _HeadHook(head, mask, capture=False) as hook:
                        logits = model(**inputs).logits
                finally:
                    seen.remove()
                ok = probe.hidden is not None and hook.fired and logits.dim() == 2
                if ok:
                    ok = produced[-1] is logits if logits.is_meta else torch.equal(logits, head(probe.hidden))
        except Exception:  # e.g. a sharded head that only its wrapper can run: use the model's head
            ok = False
    _FUSABLE[model] = ok
    return ok


def head_is_fusable(model) -> bool:
    """Whether :func:`causal_lm_loss` will take the fused head loss for ``model`` (frozen, as in
    training; on any device, the meta device included): the same check, on a small batch."""
    import torch

    head = _unwrap(model).get_output_embeddings()
    if head is None:
        return False
    vocab = head.weight.shape[0]
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(head.weight.device)
    # No attention mask: building one from a meta tensor would read its values.
    return _fusable(model, head, {"input_ids": ids}, every_row=True)


def causal_lm_loss(model, batch: dict[str, Any], num_items):
    """Summed next-token cross-entropy over the supervised labels, divided by ``num_items``.

    ``batch`` holds ``input_ids``, ``labels`` and either ``attention_mask`` or ``position_ids``;
    ``num_items`` is the supervised-token count the loss is normalised by (that of the whole
    accumulated step, so micro-batches weigh by their tokens).
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask, targets = next_token_targets(labels)
    head = _unwrap(model).get_output_embeddings()
    num = num_items if torch.is_tensor(num_items) else torch.tensor(float(num_items), device=labels.device)
    num = num.to(device=labels.device, dtype=torch.float32)
    if head is not None and _fusable(model, head, inputs):
        with _HeadHook(head, mask, capture=True) as hook:
            model(**inputs)
        with torch.profiler.record_function("famtune.head_loss"):  # the head runs here, fused with the loss
            return _fused_head_loss_class().apply(hook.hidden, head.weight, head.bias, targets, num)
    with _HeadHook(head, mask, capture=False) as hook:
        logits = model(**inputs).logits
    picked = logits if hook.fired and logits.dim() == 2 else logits[mask]
    with torch.profiler.record_function("famtune.loss"):  # the head ran inside the model
        return F.cross_entropy(picked.float(), targets, reduction="sum") / num
