"""Sharding presets: the recipe's ``distributed`` key turned into accelerate's FSDP and DeepSpeed
plugins, with the settings QLoRA needs.

- ``ddp``: every process holds the whole model; gradients are averaged (the default).
- ``fsdp``: PyTorch FSDP2 (``fully_shard``) per decoder layer; parameters, gradients and optimizer
  state sharded over the processes.
- ``zero2`` / ``zero3``: DeepSpeed ZeRO stage 2 (optimizer state and gradients sharded) or 3 (the
  parameters too). DeepSpeed is not a famtune dependency: install it on the GPU machines.

QLoRA under parameter sharding (``fsdp``, ``zero3``): FSDP and ZeRO-3 flatten and shard tensors of
one floating dtype, so the 4-bit weights are packed in the compute dtype
(``bnb_4bit_quant_storage`` = ``bnb_4bit_compute_dtype``) instead of uint8, and the model is loaded
in that dtype. famtune.json records these settings, so merge and chat rebuild the same base.
"""

from __future__ import annotations

from typing import Any

from famtune.errors import FamtuneError

#: Presets that shard the parameters themselves, so the 4-bit storage must be a float dtype.
PARAMETER_SHARDING = ("fsdp", "zero3")


def nf4_settings(preset: str, compute_dtype_name: str) -> dict[str, Any]:
    """famtune's NF4 settings (``famtune.quantization.nf4_config``) as this preset needs them."""
    from famtune.quantization import nf4_config

    settings = nf4_config(compute_dtype_name)
    if preset in PARAMETER_SHARDING:
        settings["bnb_4bit_quant_storage"] = compute_dtype_name
    return settings


def bitsandbytes_storage(settings: dict[str, Any]) -> Any:
    """The torch dtype bitsandbytes packs 4-bit weights into for these settings."""
    from famtune.quantization import bitsandbytes_config

    return bitsandbytes_config(settings).bnb_4bit_quant_storage


def fsdp_plugin_kwargs() -> dict[str, Any]:
    """accelerate ``FullyShardedDataParallelPlugin`` arguments for LoRA/QLoRA.

    FSDP2 always keeps the original parameters, which is what PEFT's ``use_orig_params`` advice
    is about under FSDP1: frozen base weights and trainable LoRA weights sit side by side in one
    layer. ``cpu_ram_efficient_loading`` reads the checkpoint once (rank 0) and broadcasts it, so
    a node does not hold one full copy per process; the adapter is gathered whole for saving.
    """
    return {
        "fsdp_version": 2,
        "auto_wrap_policy": "transformer_based_wrap",
        "reshard_after_forward": True,
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",
    }


def deepspeed_config(
    preset: str, *, batch_size: int, grad_accum: int, world: int, max_grad_norm: float, compute_dtype_name: str
) -> dict[str, Any]:
    """A complete DeepSpeed config (no ``auto`` values) for ZeRO-2 or ZeRO-3."""
    if preset not in ("zero2", "zero3"):
        raise FamtuneError(f"distributed: {preset!r} is not a DeepSpeed preset; expected zero2 or zero3")
    zero: dict[str, Any] = {
        "stage": 2 if preset == "zero2" else 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "allgather_bucket_size": 5e7,
    }
    if preset == "zero3":
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,
            }
        )
        zero.pop("allgather_bucket_size")
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": compute_dtype_name == "bfloat16"},
        "fp16": {"enabled": compute_dtype_name == "float16"},
        "zero_optimization": zero,
    }


def check_deepspeed_config(config: dict[str, Any], world: int) -> None:
    """The invariants DeepSpeed checks at start-up, checked here without DeepSpeed installed, then
    the config handed to accelerate's own plugin, which fills and cross-checks it."""
    from accelerate.utils import DeepSpeedPlugin

    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    if config["train_batch_size"] != micro * accum * world:
        raise FamtuneError(
            f"DeepSpeed config: train_batch_size {config['train_batch_size']} != {micro} x {accum} x {world} processes"
        )
    if config["bf16"]["enabled"] and config["fp16"]["enabled"]:
        raise FamtuneError("DeepSpeed config: bf16 and fp16 both enabled")
    if config["zero_optimization"]["stage"] not in (2, 3):
        raise FamtuneError(f"DeepSpeed config: ZeRO stage {config['zero_optimization']['stage']}; famtune uses 2 or 3")
    plugin = DeepSpeedPlugin(hf_ds_config=dict(config))
    if plugin.zero_stage != config["zero_optimization"]["stage"]:
        raise FamtuneError(f"DeepSpeed config: accelerate read ZeRO stage {plugin.zero_stage}")


def accelerate_plugins(
    preset: str,
    *,
    batch_size: int = 1,
    grad_accum: int = 1,
    max_grad_norm: float = 1.0,
    compute_dtype_name: str = "float32",
    world: int = 1,
) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for ``preset`` (nothing for plain DDP)."""
    if preset == "ddp":
        return {}
    if preset == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {"fsdp_plugin": FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs())}
    if preset in ("zero2", "zero3"):
        import importlib.util

        from accelerate.utils import DeepSpeedPlugin

        if importlib.util.find_spec("deepspeed") is None:
            raise FamtuneError(
                f"distributed: {preset} needs DeepSpeed, which is not installed; "
                "pip install deepspeed on the training machines, or use distributed: ddp or fsdp"
            )
        config = deepspeed_config(
            preset,
            batch_size=batch_size,
            grad_accum=grad_accum,
            world=world,
            max_grad_norm=max_grad_norm,
            compute_dtype_name=compute_dtype_name,
        )
        check_deepspeed_config(config, world)
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=config)}
    raise FamtuneError(f"distributed: {preset!r}; expected ddp, fsdp, zero2 or zero3")
