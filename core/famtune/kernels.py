"""Faster kernels for two hot spots of QLoRA training, with the same numerics.

**LoRA dropout.** Each LoRA layer drops inputs with its own random mask. ``torch.nn.Dropout``
draws one random number per element through ``bernoulli_``; on a CPU that costs more than the
layer's matmuls (17% of a step on the benchmark fixture). ``LoraDropout`` takes 16 random bits
per element from 64-bit draws instead, a quarter of the draws. The drop probability is rounded
to a multiple of 1/65536 (0.05 becomes 0.0500031) and kept tokens are scaled by the inverse of
the rounded keep probability, so the expectation is exact. Gradient checkpointing restores the
generator's state before recomputing, so the recomputed masks equal the first ones.

**Half-precision 4-bit matmuls on hardware without half-precision matrix units.** With
``compute_dtype: bf16`` every NF4 layer multiplies bf16 activations by bf16 dequantized weights
with fp32 accumulation. A CPU without AVX512-BF16/AMX (or a GPU without bf16 tensor cores)
emulates that product and runs it 4-5x slower than an fp32 GEMM. The product of two bf16 numbers
is exact in fp32, so widening both operands, running the fp32 GEMM and rounding the result to
bf16 computes the same bf16 matmul (results differ from the emulated kernel only in summation
order). ``half_matmul_is_emulated`` measures the device once; where widening is faster, the
4-bit layers run ``_WidenedMatmul4bit`` (forward and backward) instead of the emulated product.
"""

from __future__ import annotations

import functools
import time

from famtune.errors import FamtuneError

HALF_MATMUL_CHOICES = ("auto", "native", "fp32")


@functools.cache
def _lora_dropout_class():
    """Built on first use, so that importing this module does not import torch."""
    import torch

    class MaskedScale(torch.autograd.Function):
        """``x * keep * scale``, keeping only the boolean mask (1 byte per element) for backward."""

        @staticmethod
        def forward(ctx, x, keep, scale):
            ctx.save_for_backward(keep)
            ctx.scale = scale
            return x.mul(keep).mul_(scale)

        @staticmethod
        def backward(ctx, grad):
            (keep,) = ctx.saved_tensors
            return grad.mul(keep).mul_(ctx.scale), None, None

    class LoraDropout(torch.nn.Module):
        """Inverted dropout from 16 random bits per element (see the module docstring)."""

        def __init__(self, p: float) -> None:
            super().__init__()
            if not 0.0 <= p < 1.0:
                raise ValueError(f"dropout probability must be in [0, 1), got {p}")
            self.p = p
            self.drop = int(round(p * 65536))
            self.scale = 65536.0 / (65536 - self.drop)

        def extra_repr(self) -> str:
            return f"p={self.p}"

        def forward(self, x):
            if not self.training or self.drop == 0:
                return x
            n = x.numel()
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
            words.random_(-(2**63), 2**63 - 1)  # all 64 bits uniform (one value of 2^64 excluded)
            bits = words.view(torch.int16)[:n].view(x.shape)
            keep = bits >= (self.drop - 32768)  # P(keep) = (65536 - drop) / 65536
            return MaskedScale.apply(x, keep, self.scale)

    return LoraDropout


def lora_dropout(p: float):
    return _lora_dropout_class()(p)


def use_fast_lora_dropout(model) -> int:
    """Replace the ``nn.Dropout`` of every LoRA layer in ``model``; returns how many were replaced."""
    import torch

    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                drops[name] = lora_dropout(drop.p)
                replaced += 1
    return replaced


# -- half-precision matmuls through fp32 kernels -------------------------------------------------


def _sync(device) -> None:
    import torch

    accel = getattr(torch, "accelerator", None)
    if device.type != "cpu" and accel is not None:
        accel.synchronize(device)


@functools.cache
def _probe(device_str: str, dtype_name: str) -> tuple[float, float]:
    """Seconds for one 512x1024x1024 matmul in ``dtype``, natively and widened to fp32."""
    import torch

    device = torch.device(device_str)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(512, 1024, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(1024, 1024, generator=gen).to(device=device, dtype=dtype)

    def best(fn) -> float:
        fn()
        _sync(device)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        return min(times)

    native = best(lambda: a @ b)
    widened = best(lambda: (a.float() @ b.float()).to(dtype))
    return native, widened


def half_matmul_is_emulated(device, dtype) -> tuple[bool, str]:
    """Whether ``dtype`` matmuls on ``device`` run faster widened to fp32, and the measured figures."""
    import torch

    if dtype not in (torch.bfloat16, torch.float16):
        return False, f"{dtype} is not a half-precision type"
    native, widened = _probe(str(device), str(dtype).replace("torch.", ""))
    flops = 2 * 512 * 1024 * 1024
    why = (
        f"{str(dtype).replace('torch.', '')} matmul {flops / native / 1e9:.0f} GFLOP/s native, "
        f"{flops / widened / 1e9:.0f} GFLOP/s through fp32 kernels"
    )
    return widened * 1.3 < native, why


@functools.cache
def _widened_matmul_class():
    import bitsandbytes.functional as bnbf
    import torch

    class WidenedMatmul4bit(torch.autograd.Function):
        """``x @ dequant(W).T + b`` in the dtype of ``x``, computed by fp32 kernels."""

        @staticmethod
        def forward(ctx, x, weight, bias, quant_state):
            w = bnbf.dequantize_4bit(weight, quant_state).to(x.dtype)
            ctx.quant_state = quant_state
            ctx.bias_dtype = None if bias is None else bias.dtype
            ctx.save_for_backward(weight)
            out = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
            return out.to(x.dtype)

        @staticmethod
        def backward(ctx, grad):
            (weight,) = ctx.saved_tensors
            grad_x = grad_bias = None
            if ctx.needs_input_grad[0]:
                w = bnbf.dequantize_4bit(weight, ctx.quant_state).to(grad.dtype)
                grad_x = (grad.float() @ w.float()).to(grad.dtype)
            if ctx.needs_input_grad[2]:
                grad_bias = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)
            return grad_x, None, grad_bias, None

    return WidenedMatmul4bit


def _widened_forward(layer, x):
    """The training forward of a bitsandbytes ``Linear4bit``, with the matmul widened to fp32."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(layer)
    dtype = layer.compute_dtype or x.dtype
    bias = None if layer.bias is None else layer.bias.to(dtype)
    out = _widened_matmul_class().apply(x.to(dtype), layer.weight, bias, layer.weight.quant_state)
    return out.to(x.dtype)


def widen_4bit_matmuls(model) -> int:
    """Route every bitsandbytes 4-bit layer of ``model`` through the widened matmul; returns the count."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.compute_dtype is not None:
            module.forward = functools.partial(_widened_forward, module)
            count += 1
    return count


def resolve_half_matmul(setting: str, device, dtype) -> tuple[bool, str]:
    """The recipe's ``half_matmul`` (auto, native or fp32) against the device: (widen?, why)."""
    if setting not in HALF_MATMUL_CHOICES:
        raise FamtuneError(f"half_matmul: {setting!r} is not one of {', '.join(HALF_MATMUL_CHOICES)}")
    if setting == "native":
        return False, "half_matmul: native (recipe)"
    emulated, why = half_matmul_is_emulated(device, dtype)
    if setting == "fp32":
        return True, f"half_matmul: fp32 kernels (recipe; {why})"
    if emulated:
        return True, f"half_matmul: fp32 kernels, because this device emulates half precision ({why})"
    return False, f"half_matmul: native ({why})"
