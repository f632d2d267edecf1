"""``famtune merge``: fold a LoRA adapter into its base and write a model plain transformers loads.

The merge streams: each base tensor is read, (re)quantized, given its LoRA delta and written
before the next is read, so memory holds a few tensors rather than the model.

A QLoRA adapter learned a correction to the NF4-quantized base, not to the original weights, so
by default it is merged into the dequantized NF4 weights it was trained against. The output
carries famtune's chat template, stop ids and sampling defaults, so ``apply_chat_template`` and
``generate`` reproduce the training format without famtune installed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError
from famtune.merge_stream import _dtype_name, stream_plan, write_merged
from famtune.metadata import META_FILE, read_metadata, write_metadata

BASE_PRECISIONS = ("trained", "original")
LAYOUTS = ("native", "original")
# Files that layout "original" never copies from the base: the plugin writes config and weights.
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".index.json")


def merge(
    adapter_dir: str,
    out_dir: str,
    *,
    max_shard_size: str = "2GB",
    base: str | None = None,
    base_precision: str = "trained",
    layout: str = "native",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    stream: bool = True,
    log=print,
) -> dict:
    """Merge the adapter in ``adapter_dir`` into its base and write the result to ``out_dir``.

    With ``stream`` (the default) the weights are merged tensor by tensor straight from the
    base's safetensors; where that cannot reproduce the in-memory merge exactly, the whole model
    is loaded instead and the log says why.

    The model is written into ``OUT.tmp-PID/model/`` and renamed to ``OUT`` only once complete and
    fsynced (an earlier merge at ``OUT`` is replaced at that moment), so ``OUT`` is never a mix of
    two merges or a partial one, and the staging directory itself has no config.json at its top,
    so no loader takes it for a model.
    """
    from famtune import durable
    from famtune.faults import crash_point

    _check_destination(out_dir, adapter_dir)
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", str(max_shard_size), flags=re.IGNORECASE):
        raise FamtuneError(f"max shard size {max_shard_size!r} is invalid; use a number and a unit, e.g. 2GB or 500MB")
    if _parse_size(max_shard_size) < 1000:
        raise FamtuneError(f"max shard size {max_shard_size!r} is too small; use at least 1KB, e.g. 2GB or 500MB")
    _clean_stale_staging(out_dir, log)
    staging_root = f"{os.path.abspath(out_dir)}.tmp-{os.getpid()}"
    shutil.rmtree(staging_root, ignore_errors=True)
    os.makedirs(staging_root)
    Path(staging_root, "INCOMPLETE").write_text("a famtune merge was being written here; it did not finish.\n")
    staging = os.path.join(staging_root, "model")
    try:
        report = _merge_into(
            adapter_dir,
            staging,
            max_shard_size=max_shard_size,
            base=base,
            base_precision=base_precision,
            layout=layout,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            stream=stream,
            log=log,
            dest=out_dir,
        )
        durable.write_manifest(staging)
        crash_point("merge_publish")
        durable.replace_directory(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging_root, ignore_errors=True)
        if durable.is_disk_full(exc):
            raise durable.disk_full_error(
                os.path.dirname(os.path.abspath(out_dir)),
                None,
                f"the merge was not written ({out_dir} is unchanged); free space and run famtune merge again",
            ) from None
        raise
    shutil.rmtree(staging_root, ignore_errors=True)
    report["out_dir"] = str(out_dir)
    return _finish(report, out_dir, log)


def _check_destination(out_dir: str, adapter_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FamtuneError(f"output {out_dir!r} is a file; choose a directory for the merged model")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and os.path.abspath(out_dir) != os.path.abspath(adapter_dir):
        try:
            earlier = read_metadata(out_dir).get("merged")
        except FamtuneError:
            earlier = False
        if not earlier:
            raise FamtuneError(
                f"output {out_dir!r} is not empty and holds no earlier famtune merge; choose a new or empty directory"
            )


def _clean_stale_staging(out_dir: str, log) -> None:
    """Remove staging directories of merges into ``out_dir`` whose process is gone."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    for entry in os.scandir(parent or "."):
        m = re.fullmatch(re.escape(name) + r"\.(?:tmp|old)-(\d+)", entry.name)
        if not m or not entry.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its merge is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        log(f"famtune: removed {entry.path}, left by an interrupted merge")


def _merge_into(
    adapter_dir: str,
    out_dir: str,
    *,
    max_shard_size: str,
    base: str | None,
    base_precision: str,
    layout: str,
    dtype: str | None,
    trust_remote_code: bool,
    stream: bool,
    log,
    dest: str,
) -> dict:
    from famtune.checkpoint import open_checkpoint

    if base_precision not in BASE_PRECISIONS:
        raise FamtuneError(f"base precision {base_precision!r} is unknown; expected trained or original")
    if layout not in LAYOUTS:
        raise FamtuneError(f"layout {layout!r} is unknown; expected native or original")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", str(max_shard_size), flags=re.IGNORECASE):
        raise FamtuneError(f"max shard size {max_shard_size!r} is invalid; use a number and a unit, e.g. 2GB or 500MB")
    meta = read_metadata(adapter_dir)
    spec = base or (
        meta["base_path"] if meta.get("base_path") and os.path.isdir(meta["base_path"]) else meta.get("base_model")
    )
    if not spec or not meta.get("family"):
        raise FamtuneError(
            f"{adapter_dir}/{META_FILE} names no base model or family; pass the base checkpoint "
            "explicitly or re-run famtune train"
        )
    ckpt = open_checkpoint(spec, family=meta["family"], trust_remote_code=trust_remote_code)
    for other, what in ((adapter_dir, "adapter"), (ckpt.path, "base")):
        if os.path.abspath(dest) == os.path.abspath(other):
            raise FamtuneError(
                f"output {out_dir!r} is the {what} directory; choose a new directory for the merged model"
            )
    out_dtype = _output_dtype(dtype, ckpt.config, log)
    report: dict[str, Any] = {
        "out_dir": str(out_dir),
        "adapter_dir": str(adapter_dir),
        "base": ckpt.path,
        "family": ckpt.family.name,
        "dtype": _dtype_name(out_dtype),
        "layout": layout,
        "adapter": _adapter_method(adapter_dir, meta, log),
    }

    plan, why_not = (
        stream_plan(ckpt, adapter_dir, meta, base_precision, out_dtype) if stream else (None, "streaming turned off")
    )
    if plan is not None:
        log(
            f"famtune: streaming the merge tensor by tensor from {plan.native_dir} "
            f"({len(plan.nf4_weights)} weights through NF4, LoRA on {len(plan.lora)}); the model is never built"
        )
        return _merge_streaming(plan, ckpt, meta, out_dir, max_shard_size, layout, report, log)
    log(f"famtune: cannot stream this merge ({why_not}); loading the whole model instead")

    if meta.get("quantization") == "nf4" and base_precision == "trained":
        log(f"famtune: loading {spec} as NF4, as the adapter was trained, and dequantizing it")
        model = ckpt.load_model(
            quantization="nf4",
            compute_dtype=meta.get("compute_dtype", "auto"),
            quantization_config=meta.get("quantization_config"),
        )
        replace_linear4bit(model)
        report["base_precision"] = "trained (dequantized NF4)"
    else:
        log(f"famtune: loading {spec} in {_dtype_name(out_dtype)}")
        model = ckpt.load_model(quantization="none", compute_dtype=_dtype_name(out_dtype))
        report["base_precision"] = "original"
        if meta.get("quantization") == "nf4":
            diff = nf4_weight_difference(ckpt, model, meta.get("compute_dtype", "auto"))
            report["max_abs_weight_diff"] = diff
            log(
                f"famtune: the adapter was trained against NF4 weights; they differ from the original weights "
                f"by up to {diff:.4g} (max abs); merging into the original weights anyway"
            )

    import torch
    from peft import PeftModel

    with torch.no_grad():
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        model = model.to(out_dtype)
    tokenizer = ckpt.load_tokenizer()
    tokenizer.chat_template = ckpt.family.chat_template()

    _write_layout(lambda d: _write_native(model, tokenizer, ckpt, meta, d, max_shard_size), ckpt, out_dir, layout)
    return report


def _adapter_method(adapter_dir: str, meta: dict[str, Any] | None, log) -> str:
    """The adapter's method, logged so the user sees what is folded in (famtune.adapters)."""
    import json

    from famtune.adapters import method_of

    path = Path(adapter_dir, "adapter_config.json")
    acfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    method = method_of(meta, acfg)
    if ((meta or {}).get("adapter") or {}).get("converted_to_lora"):
        log(f"famtune: {method} adapter: saved as a plain LoRA delta against the original base, merged as such")
    return method


def _merge_streaming(
    plan, ckpt: Any, meta: dict[str, Any], out_dir: str, max_shard_size: str, layout: str, report: dict[str, Any], log
) -> dict:
    tokenizer = ckpt.load_tokenizer()
    tokenizer.chat_template = ckpt.family.chat_template()
    gen = _generation_config(tokenizer, ckpt, meta)  # validated before anything is written

    def write(target: str) -> None:
        diff = write_merged(plan, target, _parse_size(max_shard_size))
        if diff is not None:
            report["max_abs_weight_diff"] = diff
        gen.save_pretrained(target)
        tokenizer.save_pretrained(target)
        write_metadata(target, {**meta, "merged": True})

    _write_layout(write, ckpt, out_dir, layout)
    report["base_precision"] = "trained (dequantized NF4)" if plan.nf4_weights else "original"
    report["streamed"] = True
    if "max_abs_weight_diff" in report:
        log(
            f"famtune: the adapter was trained against NF4 weights; they differ from the original weights "
            f"by up to {report['max_abs_weight_diff']:.4g} (max abs); merging into the original weights anyway"
        )
    return report


def _write_layout(write_native, ckpt: Any, out_dir: str, layout: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    if layout == "native":
        write_native(out_dir)
        return
    # Build the native layout next to the output (same filesystem, no copy of gigabytes through /tmp).
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=".famtune-merge-") as tmp:
        write_native(tmp)
        if not ckpt.family.write_original_layout(tmp, str(out_dir), dict(ckpt.config)):
            raise FamtuneError(
                f"family {ckpt.family.name!r} has no layout other than the native one; "
                "run famtune merge without --layout original"
            )
        _copy_base_extras(ckpt.path, out_dir)
        for name in ("generation_config.json", META_FILE):
            shutil.copy2(os.path.join(tmp, name), os.path.join(out_dir, name))


def _finish(report: dict[str, Any], out_dir: str, log) -> dict:
    from famtune.modelcard import write_model_card

    write_model_card(report["adapter_dir"], out_dir, report)  # replaces any README.md copied from the base
    report["files"] = sorted(p.name for p in Path(out_dir).iterdir())
    report["shards"] = sum(1 for n in report["files"] if n.endswith(".safetensors"))
    log(f"famtune: wrote the merged model to {out_dir} ({report['shards']} safetensors file(s), {report['dtype']})")
    return report


def replace_linear4bit(model: Any) -> int:
    """Swap every bitsandbytes ``Linear4bit`` for a ``torch.nn.Linear`` holding its dequantized weight.

    PEFT then attaches plain LoRA layers whose merge is exact, and transformers stops treating the
    model as quantized (so it saves as ordinary full-precision weights).
    """
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    count = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, bnb.nn.Linear4bit):
                    continue
                weight = dequantize_4bit(child.weight.data, child.weight.quant_state)
                linear = torch.nn.Linear(
                    child.in_features, child.out_features, bias=child.bias is not None, device="meta"
                )
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.to(weight.dtype), requires_grad=False)
                setattr(parent, name, linear)
                count += 1
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    return count


def nf4_weight_difference(ckpt: Any, original: Any, compute_dtype: str) -> float:
    """Max abs difference between the original weights and the dequantized NF4 ones training saw."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    quantized = ckpt.load_model(quantization="nf4", compute_dtype=compute_dtype)
    weights = dict(original.named_modules())
    worst = 0.0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit) and name in weights:
                deq = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                ref = weights[name].weight.detach().to(deq.device).float()
                worst = max(worst, (deq - ref).abs().max().item())
    del quantized
    return worst


def generation_config_dict(
    base_dir: str, stop_ids: list[int], sampling: dict[str, Any], pad_id: int | None
) -> dict[str, Any]:
    """The base's generation_config.json (family keys kept) with famtune's stop ids and sampling."""
    from famtune.checkpoint import read_json

    path = Path(base_dir, "generation_config.json")
    gen = read_json(path) if path.exists() else {}
    for key in ("transformers_version", "_from_model_config"):  # bookkeeping of the base's save, not settings
        gen.pop(key, None)
    gen.update(sampling)
    gen["eos_token_id"] = list(stop_ids)
    gen["pad_token_id"] = pad_id if pad_id is not None else stop_ids[0]
    return gen


def _write_native(
    model: Any, tokenizer: Any, ckpt: Any, meta: dict[str, Any], out_dir: str, max_shard_size: str
) -> None:
    # Validate before anything is written: a bad sampling key must not leave a half-written model.
    model.generation_config = _generation_config(tokenizer, ckpt, meta)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    write_metadata(out_dir, {**meta, "merged": True})


def _generation_config(tokenizer: Any, ckpt: Any, meta: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    stop_ids = list(meta.get("stop_ids") or [])
    sampling = dict(meta.get("generation") or {})
    if not stop_ids:
        defaults = ckpt.family.generation_defaults(tokenizer)
        stop_ids, sampling = list(defaults.stop_ids), {**defaults.sampling, **sampling}
    return GenerationConfig.from_dict(generation_config_dict(ckpt.path, stop_ids, sampling, tokenizer.pad_token_id))


def _parse_size(text: str) -> int:
    """``2GB`` -> bytes, in the decimal units transformers' ``max_shard_size`` uses."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])B\s*", str(text), flags=re.IGNORECASE)
    return int(float(m.group(1)) * 1000 ** ("KMGT".index(m.group(2).upper()) + 1))


def _copy_base_extras(base_dir: str, out_dir: str) -> None:
    """Tokenizer files and the family's own code, which the original layout needs beside its weights."""
    for entry in os.scandir(base_dir):
        if not entry.is_file() or entry.name.endswith(_NOT_COPIED) or entry.name == META_FILE:
            continue
        target = os.path.join(out_dir, entry.name)
        if not os.path.exists(target):
            shutil.copy2(entry.path, target)


def _output_dtype(dtype: str | None, base_config: dict[str, Any], log) -> Any:
    import torch

    from famtune.checkpoint import resolve_dtype

    if dtype is not None:
        return resolve_dtype(dtype)
    stored = base_config.get("torch_dtype") or base_config.get("dtype")
    try:
        return resolve_dtype(stored) if isinstance(stored, str) and stored != "auto" else torch.float32
    except FamtuneError:
        log(f"famtune: the base config's dtype {stored!r} is not bf16, fp16 or fp32; writing float32 (use --dtype)")
        return torch.float32
