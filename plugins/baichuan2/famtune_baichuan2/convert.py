"""Baichuan2's original layout <-> famtune's native layout (config and weights, both ways).

Original (``BaichuanForCausalLM``, remote code): q/k/v fused in ``self_attn.W_pack`` (rows: all of
q, then k, then v) and ``lm_head`` a NormHead whose rows the model L2-normalises at run time; the
released files hold them un-normalised. 7B uses RoPE (it has ``max_position_embeddings``), 13B
uses ALiBi (it has only ``model_max_length``).

Native: 7B is transformers' ``LlamaForCausalLM``; 13B is famtune's ALiBi model
(``modeling_alibi``). Both use Llama's module names, ``W_pack`` split into ``q_proj``/``k_proj``/
``v_proj``, and ``lm_head`` a plain Linear holding the normalised rows.

The head's row norms do not survive normalisation, so the un-normalised head is kept next to the
native weights in ``HEAD_FILE`` (and a model saved from the converted one, e.g. a merge, names that
copy in its config, ``HEAD_SOURCE_KEY``). Writing the original layout uses it whenever the native
head still equals its normalisation bit for bit (an unmodified head: LoRA never targets it), which
makes original -> native -> original exact; otherwise the normalised rows are written, which is a
valid NormHead checkpoint too (the model normalises them again at run time).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from famtune.convert import (
    MARKER_KEY,
    SHAPE_KEYS,
    TensorReader,
    cache_key,
    cached_copy,
    copy_generation_config,
    native_copy,
    read_json,
    weight_files,
    write_json,
    write_shards,
)
from famtune.errors import FamtuneError

FAMILY_7B = "baichuan2-7b"
FAMILY_13B = "baichuan2-13b"
FAMILIES = (FAMILY_7B, FAMILY_13B)
ALIBI_MODEL_TYPE = "famtune_baichuan2_alibi"
ORIGINAL_MODEL_TYPE = "baichuan"
ORIGINAL_CLASS = "BaichuanForCausalLM"
# Baichuan (v1) shares model_type "baichuan" and the class name but has a 64000-token vocabulary,
# no NormHead and another chat format: it is not this family.
BAICHUAN1_VOCAB = 64000
HEAD_FILE = os.path.join("famtune_baichuan2", "lm_head_unnormalised.safetensors")
# Native config key naming the converted copy whose HEAD_FILE holds this model's raw head; it
# survives save_pretrained, so a merged model can still find the head it was converted from.
HEAD_SOURCE_KEY = "famtune_baichuan2_head_source"
HEAD = "lm_head.weight"
SAFETENSORS_METADATA = {"format": "pt"}

_W_PACK = re.compile(r"^(model\.layers\.\d+\.self_attn\.)W_pack\.weight$")
_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)([qkv])_proj\.weight$")


# -- configs ------------------------------------------------------------------------------------
def is_original(config: dict[str, Any]) -> bool:
    """An original-layout Baichuan2 ``config.json`` (remote-code ``BaichuanForCausalLM``)."""
    if config.get("model_type") != ORIGINAL_MODEL_TYPE or config.get("vocab_size") == BAICHUAN1_VOCAB:
        return False
    auto = str((config.get("auto_map") or {}).get("AutoModelForCausalLM", ""))
    return ORIGINAL_CLASS in (config.get("architectures") or []) or auto.endswith("." + ORIGINAL_CLASS)


def original_variant(config: dict[str, Any]) -> str:
    # The 13B code has no rotary embedding and therefore no max_position_embeddings.
    return FAMILY_7B if "max_position_embeddings" in config else FAMILY_13B


def native_config(original: dict[str, Any]) -> dict[str, Any]:
    """The native ``config.json`` for an original Baichuan2 config."""
    family = original_variant(original)
    common = {
        key: original[key]
        for key in (
            *SHAPE_KEYS,
            "hidden_act",
            "rms_norm_eps",
            "initializer_range",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "use_cache",
        )
        if key in original
    }
    common["tie_word_embeddings"] = False
    dtype = original.get("torch_dtype", original.get("dtype"))
    if dtype is not None:
        common["dtype"] = dtype
    if family == FAMILY_7B:
        native = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "num_key_value_heads": original["num_attention_heads"],
            "max_position_embeddings": original["max_position_embeddings"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attention_bias": False,
            "mlp_bias": False,
        }
    else:
        native = {
            "architectures": ["BaichuanAlibiForCausalLM"],
            "model_type": ALIBI_MODEL_TYPE,
            **common,
            "model_max_length": original.get("model_max_length", 4096),
        }
    native[MARKER_KEY] = family
    return native


# -- tensors ------------------------------------------------------------------------------------
def normalise_head(weight):
    """NormHead's row L2-normalisation, computed in float32 like the original's fp32 forward."""
    import torch

    return torch.nn.functional.normalize(weight.float(), dim=-1).to(weight.dtype)


def to_native(name: str, tensor) -> list[tuple[str, Any]]:
    """Native tensors for one original tensor."""
    m = _W_PACK.match(name)
    if m:
        q, k, v = tensor.chunk(3, dim=0)
        return [(f"{m.group(1)}{p}_proj.weight", t.contiguous()) for p, t in zip("qkv", (q, k, v))]
    if name == HEAD:
        return [(name, normalise_head(tensor))]
    return [(name, tensor)]


class ToOriginal:
    """Maps native tensors back to original names; q/k/v may arrive in different shards."""

    def __init__(self, raw_head=None) -> None:
        self.raw_head = raw_head
        self.pending: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, tensor) -> list[tuple[str, Any]]:
        import torch

        m = _QKV.match(name)
        if m:
            parts = self.pending.setdefault(m.group(1), {})
            parts[m.group(2)] = tensor
            if len(parts) < 3:
                return []
            del self.pending[m.group(1)]
            return [(f"{m.group(1)}W_pack.weight", torch.cat([parts["q"], parts["k"], parts["v"]], dim=0))]
        if (
            name == HEAD
            and self.raw_head is not None
            and self.raw_head.dtype == tensor.dtype
            and torch.equal(normalise_head(self.raw_head), tensor)
        ):
            return [(name, self.raw_head)]
        return [(name, tensor)]

    def check_done(self, where: str) -> None:
        if self.pending:
            prefix, parts = next(iter(self.pending.items()))
            raise FamtuneError(
                f"{where}: {prefix}q/k/v_proj incomplete (found only {sorted(parts)}); "
                "the native checkpoint is damaged, re-run the merge"
            )


# -- files (famtune.convert reads, shards and caches) -------------------------------------------------
#: Part of the cache key: bump it when the conversion changes.
CONVERTER_VERSION = 1
#: The cache namespace of both families' native copies.
CACHE_NAME = "baichuan2"


def _read_tensor(files: list[Path], wanted: str):
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if wanted in f.keys():
                return f.get_tensor(wanted)
    return None


def _mapped(src: str | Path, mapper) -> Iterator[tuple[str, Any]]:
    reader = TensorReader(src)
    for name in reader.keys():
        yield from mapper(name, reader.get(name))


def write_native(
    original_dir: str | Path, out_dir: str | Path, original: dict[str, Any], head_source: str | None = None
) -> None:
    """Writes the native layout of the original checkpoint in ``original_dir`` to ``out_dir``;
    ``head_source`` names that copy for a later ``write_original`` (see ``HEAD_SOURCE_KEY``)."""
    from safetensors.torch import save_file

    raw_head = _read_tensor(weight_files(original_dir), HEAD)
    if raw_head is None:
        raise FamtuneError(f"{original_dir}: no {HEAD} in the weights; pass a complete Baichuan2 checkpoint")
    os.makedirs(os.path.join(out_dir, os.path.dirname(HEAD_FILE)), exist_ok=True)
    save_file({HEAD: raw_head.contiguous()}, os.path.join(out_dir, HEAD_FILE), metadata=SAFETENSORS_METADATA)
    write_shards(_mapped(original_dir, to_native), out_dir)
    config = native_config(original)
    if head_source is not None:
        config[HEAD_SOURCE_KEY] = head_source
    write_json(os.path.join(out_dir, "config.json"), config)
    copy_generation_config(original_dir, out_dir)


def write_original(
    native_dir: str | Path, out_dir: str | Path, original_config: dict[str, Any], head_file: str | None = None
) -> bool:
    """Writes the original layout (``original_config`` and original names) of a native checkpoint;
    ``head_file`` holds the un-normalised head it was converted from, if known."""
    from safetensors.torch import load_file

    raw_head = load_file(head_file)[HEAD] if head_file and os.path.isfile(head_file) else None
    mapper = ToOriginal(raw_head)
    write_shards(_mapped(native_dir, mapper), out_dir)
    mapper.check_done(str(native_dir))
    write_json(os.path.join(out_dir, "config.json"), original_config)
    copy_generation_config(native_dir, out_dir)
    return True


def native_dir(path: str, original: dict[str, Any]) -> str:
    """The cached native-layout copy of the original checkpoint at ``path``, made if missing."""
    key = cache_key(path, CACHE_NAME, CONVERTER_VERSION)
    return str(
        native_copy(
            path, CACHE_NAME, CONVERTER_VERSION, lambda src, out: write_native(src, out, original, head_source=key)
        )
    )


def raw_head_file(native: str) -> str | None:
    """The un-normalised head a native checkpoint was converted from: beside its weights (a
    converted copy) or, for a model saved from one (a merge), in that copy in the cache."""
    beside = os.path.join(native, HEAD_FILE)
    if os.path.isfile(beside):
        return beside
    try:
        key = read_json(os.path.join(native, "config.json")).get(HEAD_SOURCE_KEY)
    except (OSError, ValueError, FamtuneError):
        return None
    if not isinstance(key, str) or os.path.basename(key) != key:
        return None
    cached = cached_copy(CACHE_NAME, key) / HEAD_FILE
    return str(cached) if cached.is_file() else None


def write_original_layout(native: str, out_dir: str, original_config: dict[str, Any]) -> bool:
    return write_original(native, out_dir, original_config, raw_head_file(native))
