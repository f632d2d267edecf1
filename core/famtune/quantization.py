"""famtune's 4-bit base: the exact bitsandbytes settings, and the kernel path its layers compute on.

Both are written into ``famtune.json`` (``quantization_config``, ``nf4_kernel``) so that merge, chat
and a plain transformers + PEFT user rebuild the base exactly as training saw it.
"""

from __future__ import annotations

from typing import Any

#: QLoRA's settings: NF4 blocks of 64 with double-quantized absmax, packed into uint8 storage.
NF4_SETTINGS: dict[str, Any] = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_quant_storage": "uint8",
}

#: The one kernel path famtune uses for 4-bit layers on every device: dequantize the block to the
#: compute dtype, then a dense matmul. On CPUs with AVX512-BF16, bitsandbytes would otherwise repack
#: the weights at the first inference call and compute in bf16 whatever the compute dtype: logits
#: move by up to ~0.4 on the demo model against training's, and backward breaks on the repacked form.
NF4_KERNEL = "dequantize"


def nf4_config(compute_dtype_name: str) -> dict[str, Any]:
    """The ``BitsAndBytesConfig`` keyword arguments, as JSON, for a compute dtype name (``float32``...)."""
    return {**NF4_SETTINGS, "bnb_4bit_compute_dtype": compute_dtype_name}


def bitsandbytes_config(settings: dict[str, Any]) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**settings)


def use_nf4_kernel(model: Any, kernel: str = NF4_KERNEL) -> int:
    """Put every 4-bit layer of ``model`` on ``kernel``; returns how many layers were set."""
    if kernel != NF4_KERNEL:
        from famtune.errors import FamtuneError

        raise FamtuneError(f"unknown 4-bit kernel path {kernel!r} in famtune.json; this famtune knows {NF4_KERNEL!r}")
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
