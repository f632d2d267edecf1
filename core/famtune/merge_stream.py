"""The streaming half of ``famtune merge``: one tensor at a time, never the whole model.

The base's safetensors are read with plain file reads (no mmap, whose touched pages would count
against the process until the file is closed) and the output is written tensor by tensor into a
safetensors file whose header is planned up front, so memory holds a few tensors, not a shard.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _dtype_name(dtype: Any) -> str:
    return str(dtype).split(".")[-1]


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass
class StreamPlan:
    native_dir: str
    tensors: dict[str, tuple[str, dict[str, Any]]]  # name -> (file, safetensors header entry)
    load_dtypes: dict[str, Any]  # name -> the dtype transformers would hold it in
    nf4_weights: set[str]  # weights the adapter was trained against in NF4 (empty: original precision)
    diff_weights: set[str]  # weights whose NF4 gap is reported (original precision of a QLoRA adapter)
    lora: dict[str, tuple[Any, Any, float]]  # weight name -> (A, B, scaling)
    out_dtype: Any
    config: dict[str, Any]
    quantization_config: Any = None


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(f: Any, entry: dict[str, Any], data_start: int) -> Any:
    import torch

    start, end = entry["data_offsets"]
    buf = bytearray(end - start)
    f.seek(data_start + start)
    f.readinto(buf)
    dtype = getattr(torch, _ST_DTYPES[entry["dtype"]])
    flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
    return flat.reshape(entry["shape"])


def _read_all(path: str) -> dict[str, Any]:
    header, start = _read_header(path)
    with open(path, "rb") as f:
        return {k: _read_tensor(f, v, start) for k, v in header.items()}


def stream_plan(
    ckpt: Any, adapter_dir: str, meta: dict[str, Any], base_precision: str, out_dtype: Any
) -> tuple[StreamPlan | None, str]:
    """What a streaming merge needs, or ``(None, reason)`` when only the in-memory merge is exact."""
    import torch

    from famtune.checkpoint import model_load_kwargs, resolve_dtype

    acfg_path = Path(adapter_dir, "adapter_config.json")
    weights_path = Path(adapter_dir, "adapter_model.safetensors")
    if not acfg_path.exists() or not weights_path.exists():
        return None, "the adapter has no adapter_config.json or adapter_model.safetensors"
    acfg = json.loads(acfg_path.read_text(encoding="utf-8"))
    if acfg.get("peft_type") == "ADALORA":
        return None, "AdaLoRA's SVD form (B, E, A with per-module ranks) is merged by PEFT"
    if acfg.get("use_dora"):
        return None, "DoRA's magnitude vector rescales each row by the norm of the merged weight, which PEFT computes"
    if str(acfg.get("init_lora_weights")).lower().startswith(("pissa", "olora", "corda")):
        return None, (
            f"the adapter is an unconverted {acfg['init_lora_weights']} adapter, which needs the residual "
            "base PEFT derives from the original"
        )
    unusual = [
        k
        for k in (
            "use_dora",
            "fan_in_fan_out",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "target_parameters",
        )
        if acfg.get(k)
    ]
    if acfg.get("peft_type") != "LORA" or acfg.get("bias", "none") != "none" or unusual:
        return None, f"the adapter uses {', '.join(unusual) or acfg.get('peft_type')!s}, which only PEFT merges"
    trained_nf4 = meta.get("quantization") == "nf4"
    compute = resolve_dtype(meta.get("compute_dtype", "auto")) if trained_nf4 else out_dtype
    load_dtype = compute if trained_nf4 and base_precision == "trained" else out_dtype
    # The family's loader on the meta device: it converts an original layout into its cached native
    # checkpoint (which the loaded model names) and gives the module tree without any weight in memory.
    try:
        model = ckpt.load_skeleton(load_dtype)
    except Exception as exc:  # the in-memory merge then reports the real problem, if any
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return None, f"the model cannot be opened on the meta device ({type(exc).__name__}: {first})"
    native_dir = str(getattr(model, "name_or_path", "") or ckpt.path)
    files = sorted(Path(native_dir).glob("*.safetensors"))
    if not files:
        return None, f"{native_dir} holds no safetensors weights"
    tensors = {}
    for f in files:
        header, _ = _read_header(str(f))
        tensors.update({k: (str(f), v) for k, v in header.items()})
    odd = sorted({v["dtype"] for _, v in tensors.values()} - set(_ST_DTYPES))
    if odd:
        return None, f"the checkpoint holds tensors of dtype {', '.join(odd)}"
    state = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if set(tensors) - set(state) or set(state) - set(tensors) - tied:
        return None, "the checkpoint's tensor names differ from the model's (transformers renames them on load)"
    load_dtypes = {k: state[k].dtype for k in tensors}
    nf4: set[str] = set()
    if trained_nf4:
        qconf = model_load_kwargs(
            "nf4", _dtype_name(compute), device=torch.device("cpu"), recorded=meta.get("quantization_config")
        )["quantization_config"]
        names = nf4_module_names(model, qconf)
        nf4 = {f"{n}.weight" for n in names if f"{n}.weight" in tensors}
    lora = _lora_deltas(acfg, str(weights_path), tensors)
    if isinstance(lora, str):
        return None, lora
    config = json.loads(Path(native_dir, "config.json").read_text(encoding="utf-8"))
    in_trained = base_precision == "trained"
    return StreamPlan(
        native_dir,
        tensors,
        load_dtypes,
        nf4 if in_trained else set(),
        set() if in_trained else nf4,
        lora,
        out_dtype,
        config,
        qconf if trained_nf4 else None,
    ), ""


def nf4_module_names(meta_model: Any, quantization_config: Any) -> set[str]:
    """The modules transformers would turn into ``Linear4bit``, found by running its own
    bitsandbytes quantizer preparation on a meta-device model (no weights involved)."""
    import bitsandbytes as bnb
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    Bnb4BitHfQuantizer(quantization_config)._process_model_before_weight_loading(meta_model, device_map={"": "cpu"})
    return {n for n, m in meta_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _lora_deltas(acfg: dict[str, Any], weights_path: str, tensors: dict[str, Any]):
    r, alpha = acfg["r"], acfg.get("lora_alpha", acfg["r"])
    scaling = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in _read_all(weights_path).items():
        module, _, which = key.removeprefix("base_model.model.").rpartition(".lora_")
        if which not in ("A.weight", "B.weight"):
            return f"the adapter holds {key!r}, which is not a LoRA A or B matrix"
        pairs.setdefault(f"{module}.weight", {})[which[0]] = value
    for name, ab in pairs.items():
        if name not in tensors or set(ab) != {"A", "B"}:
            return f"the adapter's {name!r} has no matching base weight"
    return {name: (ab["A"], ab["B"], scaling) for name, ab in pairs.items()}


def _merged_tensor(plan: StreamPlan, name: str, raw: Any) -> tuple[Any, float | None]:
    """One output tensor, cast exactly as load + dequantize + PEFT merge + ``.to(dtype)`` would."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    if not raw.is_floating_point():
        return raw, None
    w = raw.to(plan.load_dtypes[name])
    gap = None
    if name in plan.nf4_weights or name in plan.diff_weights:
        q = plan.quantization_config
        # NF4 training quantized the weight as loaded in the compute dtype, whatever the output dtype.
        packed, state = quantize_4bit(
            raw.to(q.bnb_4bit_compute_dtype),
            blocksize=64,
            compress_statistics=q.bnb_4bit_use_double_quant,
            quant_type=q.bnb_4bit_quant_type,
            quant_storage=torch.uint8,
        )
        deq = dequantize_4bit(packed, state)
        if name in plan.nf4_weights:
            w = deq
        else:
            gap = (deq.float() - w.float()).abs().max().item()
    if name in plan.lora:
        a, b, scaling = plan.lora[name]
        if a.dtype in (torch.float16, torch.bfloat16):  # PEFT computes B @ A in fp32 on CPU
            delta = ((b.float() @ a.float()) * scaling).to(a.dtype)
        else:
            delta = (b @ a) * scaling
        w += delta
    return w.to(plan.out_dtype), gap


def write_merged(plan: StreamPlan, out_dir: str, max_shard_bytes: int) -> float | None:
    """Write the merged weights and config.json; return the NF4 gap when it was measured."""
    import torch

    out_code = {v: k for k, v in _ST_DTYPES.items()}
    entries = []
    for name, (_, entry) in plan.tensors.items():
        dtype = _ST_DTYPES[entry["dtype"]]
        if entry["dtype"] in ("F64", "F32", "F16", "BF16"):
            dtype = _dtype_name(plan.out_dtype)
        numel = math.prod(entry["shape"])
        entries.append((name, out_code[dtype], entry["shape"], numel * getattr(torch, dtype).itemsize))
    shards: list[list[tuple[str, str, list[int], int]]] = [[]]
    for e in entries:
        if shards[-1] and sum(x[3] for x in shards[-1]) + e[3] > max_shard_bytes:
            shards.append([])
        shards[-1].append(e)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    handles: dict[str, tuple[Any, int]] = {}
    worst: float | None = None
    from famtune.backends.cpu import heap_trimmer

    release = heap_trimmer()  # host memory, whatever device trained the adapter
    try:
        for shard, fname in zip(shards, names):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, code, shape, nbytes in shard:
                header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            with open(os.path.join(out_dir, fname), "wb") as out:
                out.write(len(blob).to_bytes(8, "little") + blob)
                for name, _, _, nbytes in shard:
                    path, entry = plan.tensors[name]
                    if path not in handles:
                        handles[path] = (open(path, "rb"), _read_header(path)[1])
                    f, start = handles[path]
                    tensor, gap = _merged_tensor(plan, name, _read_tensor(f, entry, start))
                    if gap is not None:
                        worst = max(worst or 0.0, gap)
                    data = tensor.contiguous().reshape(-1).view(torch.uint8)
                    assert data.numel() == nbytes, name
                    out.write(memoryview(data.numpy()))
                    del tensor, data
                    release()
    finally:
        for f, _ in handles.values():
            f.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e[3] for e in entries)},
            "weight_map": {e[0]: fname for shard, fname in zip(shards, names) for e in shard},
        }
        Path(out_dir, "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {k: v for k, v in plan.config.items() if k not in ("quantization_config", "torch_dtype")}
    config["dtype"] = _dtype_name(plan.out_dtype)
    Path(out_dir, "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return worst
