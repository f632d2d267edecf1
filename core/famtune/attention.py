"""Varlen attention for packed rows: each packed sample attends only to itself, and the blocks
between samples are never computed.

A packed row of ``max_length`` tokens holds many samples. transformers' default path turns the
restarting position ids into a dense ``max_length`` x ``max_length`` block-diagonal mask per row,
so attention costs ``max_length`` per token however short the samples are (at 4096 tokens the
masked-out blocks are >90% of the work). Here the packed collator also passes the sample
boundaries once per batch, as transformers' own flash-attention varlen kwargs
(``cu_seq_lens_q``/``cu_seq_lens_k`` over the flattened rows, ``max_length_q``/``max_length_k``),
and the model's attention runs one causal attention per sample:

- on CUDA with flash-attn installed (and a half-precision compute dtype), transformers'
  ``flash_attention_2`` consumes those kwargs with flash-attention's varlen kernel;
- otherwise the ``famtune_varlen`` implementation registered here through transformers'
  extension points (``AttentionInterface`` for the attention, ``AttentionMaskInterface`` so no
  dense mask is built for a packed batch) loops over the samples with PyTorch's
  ``scaled_dot_product_attention`` (causal, no mask), on CPU and GPU alike.

Every model that dispatches through ``ALL_ATTENTION_FUNCTIONS`` benefits with no per-family code.
A model that cannot (its own attention code, or an attention feature the loop does not have, such
as ALiBi biases) keeps the dense block-diagonal mask; a probe on the loaded model decides, and
the path taken is recorded in summary.json (``attention``). Unpacked calls (evaluation,
generation) go through the plain SDPA path unchanged.
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from famtune.errors import FamtuneError

#: Name of the per-sample SDPA implementation in transformers' attention registries.
VARLEN_SDPA = "famtune_varlen"
FLASH = "flash_attention_2"
#: ``FAMTUNE_PACKED_ATTENTION=mask`` keeps the dense block-diagonal mask (to compare, or to rule
#: the varlen path out when debugging a model).
FORCE_ENV = "FAMTUNE_PACKED_ATTENTION"
#: The kwargs transformers' flash-attention varlen path reads; famtune's loop reads the same.
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class AttentionPath:
    """Which attention a run's packed rows use, and why (summary.json's ``attention``)."""

    path: str  # "varlen-sdpa" | "flash-varlen" | "block-diagonal-mask" | "padded"
    why: str

    @property
    def wants_boundaries(self) -> bool:
        return self.path in ("varlen-sdpa", "flash-varlen")

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "why": self.why}


class _PackedForward:
    """State of one forward pass that received sample boundaries: no dense mask is built and
    every attention call must consume the boundaries (else a sample could see its neighbours)."""

    def __init__(self) -> None:
        self.calls = 0


_ACTIVE: contextvars.ContextVar[_PackedForward | None] = contextvars.ContextVar("famtune_packed", default=None)


def sample_boundaries(lengths_per_row: list[list[int]], width: int) -> dict[str, Any]:
    """The varlen kwargs for rows of ``width`` tokens holding samples of the given lengths, as
    cumulative offsets into the flattened ``rows x width`` tokens; a row's padding tail is a
    segment of its own (its outputs are never supervised)."""
    import torch

    cu = [0]
    for lengths in lengths_per_row:
        start = cu[-1]
        for n in lengths:
            cu.append(cu[-1] + n)
        if cu[-1] < start + width:
            cu.append(start + width)
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": longest, "max_length_k": longest}


# The last boundaries read as Python ints, so the layers of one batch convert them once.
_LAST_OFFSETS: list[Any] = [None, None]


def _offsets(cu) -> list[int]:
    if _LAST_OFFSETS[0] is not cu:
        _LAST_OFFSETS[0], _LAST_OFFSETS[1] = cu, [int(x) for x in cu.tolist()]
    return _LAST_OFFSETS[1]


def varlen_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers attention function: per-sample causal SDPA when the call carries sample
    boundaries, transformers' own SDPA otherwise. Shapes as transformers' ``sdpa`` path:
    ``(batch, heads, tokens, head_dim)`` in, ``(batch, tokens, heads, head_dim)`` out."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sdpa = torch.nn.functional.scaled_dot_product_attention

    cu = kwargs.get("cu_seq_lens_q")
    packed = _ACTIVE.get()
    if cu is None:
        if packed is not None:
            raise FamtuneError(
                "packed sample boundaries did not reach the attention layers of this model; "
                "train with packing: false, or a model whose forward passes attention kwargs on"
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if packed is not None:
        packed.calls += 1
    for feature in ("position_bias", "softcap", "s_aux"):
        if kwargs.get(feature) is not None:
            raise FamtuneError(f"famtune's varlen attention has no {feature}; this model keeps the dense packed mask")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise FamtuneError("famtune's varlen attention is causal only")
    # The same call as transformers' SDPA path on a lone sample (grouped-query heads included),
    # so a packed sample computes exactly what it computes alone.
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    batch, width = query.shape[0], query.shape[2]
    window = kwargs.get("sliding_window")
    offsets = _offsets(cu)
    if offsets[-1] != batch * width:
        raise FamtuneError(f"packed boundaries cover {offsets[-1]} tokens, the batch has {batch * width}")
    p = dropout if module.training else 0.0
    rows: list[list[Any]] = [[] for _ in range(batch)]
    for a, b in zip(offsets, offsets[1:]):
        r, s, e = a // width, a % width, a % width + (b - a)
        if e > width:
            raise FamtuneError(f"a packed sample spans rows {r} and {r + 1}: boundaries must cut at every row's end")
        q, k, v = query[r : r + 1, :, s:e], key[r : r + 1, :, s:e], value[r : r + 1, :, s:e]
        n = e - s
        if window is not None and n > window:
            i = torch.arange(n, device=query.device)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            out = sdpa(q, k, v, attn_mask=band, dropout_p=p, scale=scaling, enable_gqa=gqa)
        else:
            out = sdpa(q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
        rows[r].append(out)
    out = torch.cat([torch.cat(parts, dim=2) if len(parts) > 1 else parts[0] for parts in rows])
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*args, **kwargs):
    """transformers mask function: no mask for a forward that carries sample boundaries (the
    attention keeps samples apart itself), SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if _ACTIVE.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


_REGISTERED = False


def register() -> None:
    """Register ``famtune_varlen`` with transformers' attention and mask registries (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_mask)
    _REGISTERED = True


def _enter_packed(module, args, kwargs):
    if kwargs.get("cu_seq_lens_q") is not None:
        module._famtune_packed_token = _ACTIVE.set(_PackedForward())
    return None


def _leave_packed(module, args, kwargs, output):
    token = module.__dict__.pop("_famtune_packed_token", None)
    if token is not None:
        _ACTIVE.reset(token)
    return None


def _install_hooks(model) -> None:
    if getattr(model, "_famtune_varlen_hooks", False):
        return
    model.register_forward_pre_hook(_enter_packed, with_kwargs=True)
    model.register_forward_hook(_leave_packed, with_kwargs=True, always_call=True)
    model._famtune_varlen_hooks = True


def flash_attn_usable(device, compute_dtype) -> bool:
    """flash-attention's varlen kernel: CUDA, the flash_attn package, a half-precision dtype."""
    import torch

    from famtune.checkpoint import resolve_dtype

    if isinstance(compute_dtype, str):
        compute_dtype = resolve_dtype(compute_dtype)
    return (
        getattr(device, "type", str(device)) == "cuda"
        and compute_dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
    )


def probe(model, implementation: str) -> str | None:
    """Run a two-sample packed batch through ``model`` with ``implementation``; None if every
    attention call consumed the boundaries, else why not."""
    import torch

    state = _PackedForward()
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 1, 2]], device=device)
    kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in sample_boundaries([[3, 2]], 5).items()}
    token = _ACTIVE.set(state) if implementation == VARLEN_SDPA else None
    try:
        with torch.no_grad():
            # the hooks are not installed yet: the probe sets the packed state itself
            model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]], device=device), use_cache=False, **kwargs)
    except Exception as exc:  # any failure means this model keeps the dense mask
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        if token is not None:
            _ACTIVE.reset(token)
    if implementation == VARLEN_SDPA and state.calls == 0:
        return "the model's attention does not dispatch through transformers' AttentionInterface"
    return None


def choose(model, packing: bool, device, compute_dtype) -> AttentionPath:
    """Pick and install the attention path for a training run on ``model`` (before adapters)."""
    if not packing:
        return AttentionPath("padded", "packing off: padded batches with an attention mask")
    dense = "block-diagonal-mask"
    if os.environ.get(FORCE_ENV, "").strip().lower() == "mask":
        return AttentionPath(dense, f"{FORCE_ENV}=mask")
    set_impl = getattr(model, "set_attn_implementation", None)
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if set_impl is None or can_set is None or not can_set() or not getattr(model, "_supports_attention_backend", False):
        return AttentionPath(dense, f"{type(model).__name__} does not use transformers' attention interface")
    before = model.config._attn_implementation
    if flash_attn_usable(device, compute_dtype) and getattr(model, "_supports_flash_attn", False):
        candidates = [(FLASH, "flash-varlen", "flash-attention varlen kernel"), (VARLEN_SDPA, "varlen-sdpa", "")]
    else:
        candidates = [(VARLEN_SDPA, "varlen-sdpa", "")]
    register()
    reasons = []
    for impl, path, what in candidates:
        try:
            set_impl(impl)
        except Exception as exc:  # not allowed for this model: try the next
            reasons.append(f"{impl}: {exc}")
            continue
        failure = probe(model, impl) if model.config._attn_implementation == impl else "not applied"
        if failure is None:
            _install_hooks(model)
            return AttentionPath(path, what or "per-sample scaled_dot_product_attention (no flash-attn here)")
        reasons.append(f"{impl}: {failure}")
        set_impl(before)
    return AttentionPath(dense, "; ".join(reasons))
