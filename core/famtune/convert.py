"""The conversion toolkit: what every "original layout <-> native transformers layout" plugin needs.

A family whose checkpoints ship in their own remote-code layout keeps only its rename table and
tensor transforms; this module does the rest, the same way for every family:

- ``weight_files`` / ``TensorReader``: a checkpoint's safetensors files (pickled ``.bin`` is
  refused: famtune never unpickles) and lazy access to their tensors by name;
- ``write_shards``: tensors into ``model.safetensors`` or numbered shards plus an index, one output
  shard in memory at a time;
- ``native_copy``: the cached native-layout copy of an original checkpoint, converted on first use
  into ``$FAMTUNE_CACHE/native/<family>/<key>``, written to a temporary sibling and renamed into
  place so an interrupted or concurrent conversion never leaves half an entry;
- ``cache_key``: one scheme for every family (the scheme version, the family, its converter
  version, config.json and each weight file's name, size and mtime);
- ``read_json`` / ``write_json`` / ``copy_generation_config`` / ``mark``: config helpers, and the
  family marker that makes the converted copy claimed by the family that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from famtune.cache import cache_dir
from famtune.errors import FamtuneError
from famtune.family import MARKER_KEY

#: Bump when the cache layout or key scheme changes; a family bumps its own ``converter_version``.
CACHE_SCHEME = 1
#: The config keys that fix a decoder's tensor shapes, under transformers' names (Llama's and most of
#: its descendants'): a converter copies them across and checks them when converting back.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_SHARD_BYTES = 4 << 30
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

__all__ = [
    "MARKER_KEY",
    "TensorReader",
    "cache_key",
    "cached_copy",
    "copy_generation_config",
    "mark",
    "native_copy",
    "read_json",
    "weight_files",
    "write_json",
    "write_shards",
]


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FamtuneError(f"{path}: not found; a model directory needs config.json") from None


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def mark(config: dict[str, Any], family: str) -> dict[str, Any]:
    """``config`` with the family marker: famtune claims the checkpoint as ``family``, whatever its model_type."""
    return {**config, MARKER_KEY: family}


def copy_generation_config(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy generation_config.json if present: data only (sampling values, eos), nothing executable."""
    gen = Path(src) / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, Path(dst) / "generation_config.json")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files, in shard order."""
    root = Path(path)
    index = root / INDEX_NAME
    if index.is_file():
        names = sorted(set(read_json(index)["weight_map"].values()))
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth")) if root.is_dir() else []
    if pickled:
        raise FamtuneError(
            f"{root}: no *.safetensors weights (only pickled {pickled[0]}, ...); famtune loads "
            "safetensors only and never unpickles: download the checkpoint's safetensors files "
            "or convert them first"
        )
    raise FamtuneError(f"{root}: no *.safetensors weights found; pass the checkpoint directory")


class TensorReader:
    """Lazy access to the tensors of a safetensors checkpoint directory (sharded or not)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.handles = {f.name: safe_open(str(f), framework="pt") for f in weight_files(directory)}
        self.weight_map = {k: name for name, h in self.handles.items() for k in h.keys()}
        self._last: tuple[str, Any] | None = None

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def dtype(self, key: str) -> str:
        """The stored dtype, read from the header (no tensor data is loaded)."""
        code = self.handles[self.weight_map[key]].get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(code, code.lower())

    def get(self, key: str) -> Any:
        if key not in self.weight_map:
            raise KeyError(f"no tensor {key!r} in the checkpoint")
        if self._last is None or self._last[0] != key:  # a fused tensor is often read for each of its parts
            self._last = (key, self.handles[self.weight_map[key]].get_tensor(key))
        return self._last[1]


def write_shards(
    tensors: Iterable[tuple[str, Any]], out_dir: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """(name, tensor) pairs into ``model.safetensors``, or numbered shards plus an index past ``max_shard_bytes``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[tuple[Path, list[str]]] = []
    total = 0
    buf: dict[str, Any] = {}
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            path = out / f"part-{len(parts):05d}.tmp"
            save_file(buf, str(path), metadata={"format": "pt"})
            parts.append((path, list(buf)))
        buf, size = {}, 0

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if buf and size + nbytes > max_shard_bytes:
            flush()
        buf[key] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(parts) == 1:
        parts[0][0].rename(out / SINGLE_NAME)
        return
    weight_map = {}
    for i, (path, keys) in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        path.rename(out / name)
        weight_map.update({k: name for k in keys})
    write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def cache_key(src: str | os.PathLike, family: str, converter_version: int | str) -> str:
    """Changes whenever the scheme, the family's converter, the source config or any weight file changes."""
    root = Path(src)
    h = hashlib.sha256(f"famtune native copy v{CACHE_SCHEME}\n{family}\n{converter_version}\n".encode())
    h.update((root / "config.json").read_bytes())
    for f in weight_files(root):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def cached_copy(family: str, key: str) -> Path:
    """Where the native copy with cache key ``key`` lives (whether or not it exists yet)."""
    return cache_dir() / "native" / family / key


def native_copy(
    src: str | os.PathLike, family: str, converter_version: int | str, write: Callable[[Path, Path], None]
) -> Path:
    """The cached native copy of the original checkpoint ``src``; ``write(src, out_dir)`` makes it once."""
    target = cached_copy(family, cache_key(src, family, converter_version))
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling directory and rename it into place: an interrupted run leaves no half
    # entry, and of two concurrent conversions the second finds the first's and drops its own.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        write(Path(src), tmp)
        if not (tmp / "config.json").is_file():
            raise FamtuneError(f"the {family} converter wrote no config.json for {src}")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
