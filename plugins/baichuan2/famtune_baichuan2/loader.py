"""Loading Baichuan2 checkpoints natively: original layouts are converted once into a cache,
which also keeps the un-normalised heads for writing the original layout back.

The source directory is never written to (it may be read-only). The converted copy lives in
``$FAMTUNE_CACHE/baichuan2/<key>`` (default ``~/.cache/famtune``), where the key hashes the
source ``config.json`` and the names, sizes and mtimes of its weight files, so an updated
checkpoint gets a fresh conversion. The model itself is then loaded by
``AutoModelForCausalLM.from_pretrained`` from that copy, so NF4 quantization and device placement
work exactly as for any native checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from famtune.cache import cache_dir
from famtune_baichuan2 import convert

# Bump when the conversion changes, so caches written by an older converter are not reused.
CONVERTER_VERSION = "1"


def cache_root() -> str:
    return str(cache_dir())


def cache_key(path: str) -> str:
    h = hashlib.sha256(f"famtune-baichuan2 converter {CONVERTER_VERSION}\n".encode())
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    for file in convert.weight_files(path) + [os.path.join(path, convert.INDEX)]:
        if os.path.isfile(file):
            st = os.stat(file)
            h.update(f"\n{os.path.basename(file)} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def native_dir(path: str, original: dict[str, Any]) -> str:
    """The cached native-layout copy of the original checkpoint at ``path``, made if missing."""
    key = cache_key(path)
    target = os.path.join(cache_root(), "baichuan2", key)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Convert into a scratch directory and rename it into place, so an interrupted conversion
    # never leaves a half-written cache entry behind.
    scratch = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        convert.write_native(path, scratch, original, head_source=key)
        try:
            os.rename(scratch, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
            # Another process finished the same conversion first; its copy is identical.
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def raw_head_file(native: str) -> str | None:
    """The un-normalised head a native checkpoint was converted from: beside its weights (a
    converted copy) or, for a model saved from one (a merge), in that copy in the cache."""
    beside = os.path.join(native, convert.HEAD_FILE)
    if os.path.isfile(beside):
        return beside
    try:
        with open(os.path.join(native, "config.json"), encoding="utf-8") as f:
            key = json.load(f).get(convert.HEAD_SOURCE_KEY)
    except (OSError, ValueError):
        return None
    if not isinstance(key, str) or os.path.basename(key) != key:
        return None
    cached = os.path.join(cache_root(), "baichuan2", key, convert.HEAD_FILE)
    return cached if os.path.isfile(cached) else None


def write_original_layout(native: str, out_dir: str, original_config: dict[str, Any]) -> bool:
    return convert.write_original(native, out_dir, original_config, raw_head_file(native))


def register_alibi_model() -> None:
    """Makes ``AutoModelForCausalLM`` know famtune's ALiBi model (registered at its import)."""
    from famtune_baichuan2 import modeling_alibi  # noqa: F401


def load_model(path: str, load_kwargs: dict[str, Any]) -> Any:
    """A native model for an original-layout checkpoint, or ``None`` to let the core load ``path``."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if not convert.is_original(config):
        if config.get("model_type") == convert.ALIBI_MODEL_TYPE:
            register_alibi_model()
        return None
    if load_kwargs.get("trust_remote_code"):
        return None  # the user asked for the checkpoint's own code
    target = native_dir(path, config)
    if convert.original_variant(config) == convert.FAMILY_13B:
        register_alibi_model()
    from transformers import AutoModelForCausalLM

    kwargs = {k: v for k, v in load_kwargs.items() if k != "trust_remote_code"}
    return AutoModelForCausalLM.from_pretrained(target, **kwargs)


def linear_module_names(model: Any) -> list[str]:
    """Name suffixes of every Linear (NF4 ``Linear4bit`` included) in the decoder, head excluded."""
    import torch

    head = model.get_output_embeddings()
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    })
