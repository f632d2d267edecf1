"""Reading and writing checkpoint directories: the native cache and the original layout.

Weights are read with safetensors only (never unpickled) and streamed tensor by tensor into
shards, so converting a 6B/9B checkpoint needs about one shard of memory, not the whole model.
The source directory is never written to; it may be read-only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from famtune.cache import cache_dir
from famtune.errors import FamtuneError

from famtune_chatglm import convert

#: Bump when the conversion changes, so stale cache entries are not reused.
CONVERTER_VERSION = "1"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_SHARD_BYTES = 5 * 10**9
_DONE = ".famtune-complete"


def cache_root() -> Path:
    return cache_dir()


def _weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in src.glob("*.bin"))
        hint = f" (found {', '.join(bins[:3])})" if bins else ""
        raise FamtuneError(
            f"{src}: no *.safetensors weights{hint}; famtune never unpickles .bin files, "
            "so convert the checkpoint to safetensors first"
        )
    return files


def native_cache_dir(src: str | Path, family: str) -> Path:
    """Where the native copy of ``src`` lives: keyed by its config.json and weight file stats."""
    src = Path(src)
    h = hashlib.sha256(CONVERTER_VERSION.encode())
    h.update((src / "config.json").read_bytes())
    for f in _weight_files(src):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_root() / "chatglm" / f"{family}-{h.hexdigest()[:16]}"


class TensorReader:
    """Tensors of one checkpoint directory by name, opened lazily from their shard."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        index = self.dir / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: self.dir / fname for name, fname in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for f in _weight_files(self.dir):
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        self.files[name] = f
        self._open: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def load(self, name: str):
        from safetensors import safe_open

        f = self.files[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(name)


def write_tensors(tensors: Iterable[tuple[str, Any]], out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Save (name, tensor) pairs as ``model.safetensors``, or as shards plus an index when large."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    size = total = 0
    tmp_names: list[Path] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            path = out_dir / f"shard-{len(tmp_names):05d}.tmp"
            save_file(current, str(path), metadata={"format": "pt"})
            tmp_names.append(path)
            shards.append({name: None for name in current})
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(tmp_names) == 1:
        os.replace(tmp_names[0], out_dir / SINGLE_NAME)
        return
    n = len(tmp_names)
    weight_map = {}
    for i, (path, names) in enumerate(zip(tmp_names, shards), start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(path, out_dir / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_native(src: str | Path, out_dir: str | Path, family: str, config: dict[str, Any]) -> None:
    """Write the native layout of the original checkpoint ``src`` (whose config is ``config``)."""
    src, out_dir = Path(src), Path(out_dir)
    convert.check_supported(config, str(src))
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = TensorReader(src)
    write_tensors(convert.native_tensors(reader.names(), reader.load, config, str(src)), out_dir)
    _write_json(out_dir / "config.json", convert.native_config(config, family))
    gen = src / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out_dir / "generation_config.json")


def ensure_native(src: str | Path, family: str, config: dict[str, Any]) -> Path:
    """The cached native copy of ``src``, converting it on first use.

    The conversion goes to a temporary sibling that is renamed into place when complete, so an
    interrupted run or two concurrent runs never leave a half-written directory behind.
    """
    target = native_cache_dir(src, family)
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write_native(src, tmp, family, config)
        (tmp / _DONE).write_text(str(Path(src).resolve()) + "\n", encoding="utf-8")
        if target.exists() and not (target / _DONE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # a stale entry from an interrupted run
        os.rename(tmp, target)
    except OSError:
        if not (target / _DONE).is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_original(native_dir: str | Path, out_dir: str | Path, original_config: dict[str, Any]) -> None:
    """Write the original layout (its ``config.json`` with ``auto_map``, original tensor names)."""
    native_dir, out_dir = Path(native_dir), Path(out_dir)
    convert.check_supported(original_config, str(native_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = TensorReader(native_dir)
    tensors: Iterator[tuple[str, Any]] = convert.original_tensors(
        reader.names(), reader.load, original_config, str(native_dir)
    )
    write_tensors(tensors, out_dir)
    _write_json(out_dir / "config.json", original_config)
