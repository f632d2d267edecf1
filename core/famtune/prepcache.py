"""A disk cache of encoded data files, so a second run with the same inputs skips tokenisation.

An entry is keyed by everything that decides the encoding: the data file's bytes, the tokenizer
(its serialized model, vocabulary and special tokens), the plugin's name and version, the family,
the masking policy, the system override, max_length, the data format and ``skip_bad_records``.
Entries are ``.npz`` files of plain integer arrays plus one JSON string, read with
``allow_pickle=False``: a cache file can never run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from famtune.cache import cache_dir

#: Bump when the layout of a cache entry or the meaning of its counts changes.
CACHE_FORMAT = 1


def cache_root() -> Path:
    return cache_dir("samples")


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of what decides the tokenizer's ids: its serialized model where one exists, else its
    vocabulary, plus its class, added tokens and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    sp_model = getattr(tokenizer, "sp_model", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
        h.update(sp_model.serialized_model_proto())
    else:
        # tiktoken-style BPE ranks equal the ids, so the vocabulary fixes the merges too.
        h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    added = {int(i): str(t) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    h.update(json.dumps(sorted(added.items()), ensure_ascii=False).encode())
    specials = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    h.update(json.dumps(specials, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def cache_key(
    path: str,
    tokenizer_hash: str,
    family: Any,
    *,
    masking: str,
    system: str | None,
    max_length: int,
    data_format: str,
    skip_bad_records: bool,
) -> str:
    parts = {
        "cache_format": CACHE_FORMAT,
        "data": file_digest(path),
        "tokenizer": tokenizer_hash,
        "plugin": family.info.name,
        "plugin_version": family.info.version,
        "distribution": family.info.distribution,
        "family": family.name,
        "masking": masking,
        "system": system,
        "max_length": int(max_length),
        "data_format": data_format,
        "skip_bad_records": bool(skip_bad_records),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class EncodedFile:
    """One data file, encoded: samples as flat arrays plus every count the report needs."""

    format: str
    records: int
    skipped_bad: list[tuple[int, str]] = field(default_factory=list)
    truncated: int = 0
    dropped_lines: list[int] = field(default_factory=list)
    ids: Any = None  # int32, all kept samples back to back
    labels: Any = None  # int32, same length as ids
    offsets: Any = None  # int64, len(samples) + 1
    lines: Any = None  # int64, the source line of each kept sample


def entry_path(key: str) -> Path:
    return cache_root() / f"{key}.npz"


def load(key: str) -> EncodedFile | None:
    import numpy as np

    path = entry_path(key)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("cache_format") != CACHE_FORMAT:
                return None
            return EncodedFile(
                format=meta["format"],
                records=meta["records"],
                skipped_bad=[(int(a), str(b)) for a, b in meta["skipped_bad"]],
                truncated=meta["truncated"],
                dropped_lines=[int(x) for x in meta["dropped_lines"]],
                ids=z["ids"],
                labels=z["labels"],
                offsets=z["offsets"],
                lines=z["lines"],
            )
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is rebuilt, never trusted


def save(key: str, enc: EncodedFile) -> Path | None:
    """Write the entry atomically; a cache that cannot be written only costs speed next time."""
    import numpy as np

    path = entry_path(key)
    meta = {
        "cache_format": CACHE_FORMAT,
        "format": enc.format,
        "records": enc.records,
        "skipped_bad": [list(x) for x in enc.skipped_bad],
        "truncated": enc.truncated,
        "dropped_lines": list(enc.dropped_lines),
    }
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                ids=enc.ids,
                labels=enc.labels,
                offsets=enc.offsets,
                lines=enc.lines,
                meta=np.array(json.dumps(meta, ensure_ascii=False)),
            )
        os.replace(tmp, path)
        return path
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
