"""The famtune metadata written beside every adapter and merged model (``famtune.json``).

It records which plugin, family and template the adapter was trained with, the base it was
trained against (and how that base was quantized) and the generation settings, so ``merge`` and
``chat`` reproduce the training format without being told.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import famtune
from famtune.errors import FamtuneError

META_FILE = "famtune.json"


def build_metadata(
    *,
    family,
    template_name: str,
    generation,
    base_model: str,
    base_path: str,
    quantization: str,
    compute_dtype: str,
    masking: str,
    max_length: int,
    system: str | None,
) -> dict[str, Any]:
    from famtune.checkpoint import resolve_dtype
    from famtune.quantization import NF4_KERNEL, nf4_config

    resolved = str(resolve_dtype(compute_dtype)).removeprefix("torch.")
    quant: dict[str, Any] = {}
    if quantization == "nf4":
        # the exact settings and kernel path, so a plain transformers + PEFT load reproduces training's base
        quant = {"quantization_config": nf4_config(resolved), "nf4_kernel": NF4_KERNEL}
    return {
        "famtune_version": famtune.__version__,
        "plugin": {"name": family.info.name, "distribution": family.info.distribution, "version": family.info.version},
        "family": family.name,
        "template": template_name,
        "stop_ids": list(generation.stop_ids),
        "generation": dict(generation.sampling),
        "base_model": base_model,
        "base_path": base_path,
        "quantization": quantization,
        "compute_dtype": resolved,
        **quant,
        "masking": masking,
        "max_length": max_length,
        "system": system,
    }


def write_metadata(directory: str | Path, meta: dict[str, Any]) -> None:
    Path(directory, META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_metadata(directory: str | Path, required: bool = True) -> dict[str, Any] | None:
    path = Path(directory, META_FILE)
    if not path.exists():
        if required:
            raise FamtuneError(f"{directory}: no {META_FILE}; is this an adapter written by `famtune train`?")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FamtuneError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); re-run famtune train or fix the file"
        ) from None
