"""Checkpoint files: the native-layout cache for original checkpoints, and writing the original layout.

Weights are read and written with safetensors only; pickled ``.bin`` weights are refused.
Conversion goes shard by shard, so a 7B checkpoint never sits in memory twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from famtune.cache import cache_dir
from famtune_internlm2 import convert

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Part of the cache key: bump it when the conversion's output changes.
CONVERTER_VERSION = "1"


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    with open(Path(path) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files, in shard order."""
    root = Path(path)
    index = root / INDEX_NAME
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [root / n for n in names]
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    if list(root.glob("*.bin")):
        raise FileNotFoundError(
            f"{root}: has only pickled .bin weights; famtune never unpickles, "
            "so convert them to safetensors first (or download the safetensors files of the checkpoint)"
        )
    raise FileNotFoundError(f"{root}: no *.safetensors weights found; pass the checkpoint directory")


def cache_root() -> Path:
    return cache_dir()


def cache_key(path: str | os.PathLike) -> str:
    """Changes whenever the source config or any weight file changes (by name, size or mtime)."""
    h = hashlib.sha256(f"famtune-internlm2 native v{CONVERTER_VERSION}\n".encode())
    h.update((Path(path) / "config.json").read_bytes())
    for f in weight_files(path):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def native_cache_dir(path: str | os.PathLike) -> Path:
    """The native-layout copy of the original checkpoint at ``path``, converted on first use."""
    target = cache_root() / convert.FAMILY / cache_key(path)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling directory and rename it into place, so an interrupted or
    # concurrent conversion never leaves a half-written cache entry behind.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        write_native_layout(path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_shards(out_dir: Path, shards: list[tuple[str, dict[str, Any]]]) -> None:
    """Write (file name, tensors) shards, plus an index when there is more than one."""
    from safetensors.torch import save_file

    # Fusing q, k and v into the shard of q can leave a shard empty; it is not written.
    shards = [(name, tensors) for name, tensors in shards if tensors]
    weight_map: dict[str, str] = {}
    total = 0
    for name, tensors in shards:
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    if [name for name, _ in shards] != [SINGLE_NAME]:
        write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def write_native_layout(src: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Convert the original checkpoint at ``src`` into a native ``LlamaForCausalLM`` directory."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    original = read_config(src)
    files = weight_files(src)
    names = [SINGLE_NAME] if len(files) == 1 else [f.name for f in files]
    shards = [(name, convert.to_native_state_dict(original, load_file(str(f)))) for name, f in zip(names, files)]
    _save_shards(out, shards)
    write_json(out / "config.json", convert.to_native_config(original))
    gen = Path(src) / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")


def write_original_layout(native_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          original_config: dict[str, Any] | None) -> None:
    """Convert a native-layout directory (e.g. a merged model) back to InternLM2's original layout."""
    from safetensors import safe_open

    native = read_config(native_dir)
    files = weight_files(native_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handles = {f.name: safe_open(str(f), framework="pt") for f in files}
    where = {key: name for name, h in handles.items() for key in h.keys()}
    shards = []
    for f in files:
        keys = [k for k in handles[f.name].keys() if not k.endswith(("k_proj.weight", "v_proj.weight",
                                                                      "k_proj.bias", "v_proj.bias"))]
        # q, k and v of one layer fuse into one wqkv, wherever the native shards put them.
        for k in list(keys):
            if k.endswith(("q_proj.weight", "q_proj.bias")):
                for sibling in (k.replace("q_proj", "k_proj"), k.replace("q_proj", "v_proj")):
                    if sibling not in where:
                        raise KeyError(f"{native_dir}: {k} has no {sibling}; the native weights are incomplete")
                    keys.append(sibling)
        tensors = {k: handles[where[k]].get_tensor(k) for k in keys}
        name = SINGLE_NAME if len(files) == 1 else f.name
        shards.append((name, convert.to_original_state_dict(native, tensors)))
    _save_shards(out, shards)
    write_json(out / "config.json", convert.to_original_config(native, original_config))
    gen = Path(native_dir) / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
