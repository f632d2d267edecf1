"""Qwen1 (``QWenLMHeadModel``, remote code) <-> native ``Qwen2ForCausalLM``, both ways.

Qwen1 is Qwen2 with other names: a fused ``c_attn`` ([q; k; v] rows, with bias) that Qwen2 keeps
as three biased projections, and an MLP ``c_proj(w1(x) * silu(w2(x)))`` where **w2 is the gate**
and w1 the up projection. The original ``intermediate_size`` counts both branches (22016 for
7B), Qwen2's counts one. Nothing else changes, so the native class reproduces the original
logits within ``seq_length``; beyond it the original switches on its own dynamic NTK and logn
attention, which no native class has.

This module holds the rename table and the tensor plans; ``famtune.convert`` reads and writes the
safetensors shards (one output shard in memory at a time) and keeps the cached native copy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from famtune.convert import (
    MARKER_KEY,
    MAX_SHARD_BYTES,
    TensorReader,
    copy_generation_config,
    native_copy,
    read_json,
    write_json,
    write_shards,
)
from famtune.errors import FamtuneError

FAMILY = "qwen1"
ORIGINAL_ARCH = "QWenLMHeadModel"
NATIVE_ARCH = "Qwen2ForCausalLM"
# Bump when the conversion changes, so stale cache entries are not reused.
CONVERTER_VERSION = 1

log = logging.getLogger(__name__)

# Per-layer names that map one to one (original suffix, native suffix).
_LAYER_RENAMES = [
    ("ln_1.weight", "input_layernorm.weight"),
    ("ln_2.weight", "post_attention_layernorm.weight"),
    ("attn.c_proj.weight", "self_attn.o_proj.weight"),
    ("mlp.w2.weight", "mlp.gate_proj.weight"),
    ("mlp.w1.weight", "mlp.up_proj.weight"),
    ("mlp.c_proj.weight", "mlp.down_proj.weight"),
]
_TOP_RENAMES = [
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.ln_f.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]
_QKV = ("q_proj", "k_proj", "v_proj")
_ORIG_LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_NATIVE_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def is_original(config: dict[str, Any]) -> bool:
    """True for a config.json in the original remote-code layout (not one famtune converted)."""
    if config.get("model_type") != "qwen":
        return False
    archs = list(config.get("architectures") or [])
    targets = [str(v) for v in (config.get("auto_map") or {}).values()]
    return ORIGINAL_ARCH in archs or any(t.endswith("." + ORIGINAL_ARCH) for t in targets)


# -- config -------------------------------------------------------------------------------------


def _require(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise FamtuneError(f"Qwen1 config.json has no {key!r}; this is not a Qwen-7B-style checkpoint")
    return config[key]


def native_config(config: dict[str, Any], dtype: str | None = None) -> dict[str, Any]:
    """The ``Qwen2Config`` dict for an original Qwen1 ``config.json``, with famtune's family marker."""
    hidden, heads = _require(config, "hidden_size"), _require(config, "num_attention_heads")
    inter = _require(config, "intermediate_size")
    kv_channels = config.get("kv_channels", hidden // heads)
    checks = [
        (config.get("rotary_pct", 1.0) == 1.0, "rotary_pct", config.get("rotary_pct"), "1.0"),
        (
            kv_channels * heads == hidden,
            "kv_channels",
            kv_channels,
            f"hidden_size/num_attention_heads={hidden // heads}",
        ),
        (config.get("no_bias", True) is True, "no_bias", config.get("no_bias"), "true"),
        (
            config.get("scale_attn_weights", True) is True,
            "scale_attn_weights",
            config.get("scale_attn_weights"),
            "true",
        ),
        (
            not config.get("tie_word_embeddings", False),
            "tie_word_embeddings",
            config.get("tie_word_embeddings"),
            "false",
        ),
        (inter % 2 == 0, "intermediate_size", inter, "an even number (it counts w1 and w2)"),
    ]
    for ok, key, value, want in checks:
        if not ok:
            raise FamtuneError(
                f"Qwen1 config.json has {key}={value!r}; famtune maps Qwen1 onto Qwen2 only with {want}, "
                "as in every released Qwen1 checkpoint"
            )
    out: dict[str, Any] = {
        "architectures": [NATIVE_ARCH],
        "model_type": "qwen2",
        MARKER_KEY: FAMILY,
        "vocab_size": _require(config, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": inter // 2,
        "num_hidden_layers": _require(config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        # Beyond seq_length the original rescales (dynamic NTK, logn attention): not reproduced.
        "max_position_embeddings": config.get("seq_length") or config.get("max_position_embeddings"),
        "initializer_range": config.get("initializer_range", 0.02),
        "rms_norm_eps": _require(config, "layer_norm_epsilon"),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.get("rotary_emb_base", 10000))},
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    if dtype:
        out["dtype"] = dtype
    return out


def restore_original_config(native: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """``original`` (the checkpoint's config.json) checked against ``native`` and resized to its vocabulary."""
    want = native_config(original)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        if native.get(key, want[key]) != want[key]:
            raise FamtuneError(
                f"the native model has {key}={native.get(key)!r} but the original config.json implies {want[key]!r}; "
                "pass the config.json of the checkpoint this model was trained from"
            )
    out = dict(original)
    if native.get("vocab_size") is not None:
        out["vocab_size"] = native["vocab_size"]  # embeddings may have been resized
    return out


# -- tensor names ---------------------------------------------------------------------------------
# A plan is a list of (output key, input keys, op): op "copy", ("split", j) takes block j of
# three along dim 0, "cat" concatenates the inputs along dim 0.

Plan = list[tuple[str, tuple[str, ...], Any]]


def native_plan(keys: list[str]) -> Plan:
    top = dict(_TOP_RENAMES)
    layer = dict(_LAYER_RENAMES)
    plan: Plan = []
    for key in keys:
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rotary_emb_base; some exports carry the buffer
        if key in top:
            plan.append((top[key], (key,), "copy"))
            continue
        m = _ORIG_LAYER.match(key)
        suffix = m.group(2) if m else None
        if suffix in layer:
            plan.append((f"model.layers.{m.group(1)}.{layer[suffix]}", (key,), "copy"))
        elif suffix in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = suffix.rsplit(".", 1)[1]
            for j, proj in enumerate(_QKV):
                plan.append((f"model.layers.{m.group(1)}.self_attn.{proj}.{kind}", (key,), ("split", j)))
        else:
            raise FamtuneError(
                f"unexpected tensor {key!r} in a Qwen1 checkpoint; famtune knows the Qwen-7B layout only"
            )
    return plan


def original_plan(keys: list[str]) -> Plan:
    top = {n: o for o, n in _TOP_RENAMES}
    layer = {n: o for o, n in _LAYER_RENAMES}
    present = set(keys)
    plan: Plan = []
    for key in keys:
        if key in top:
            plan.append((top[key], (key,), "copy"))
            continue
        m = _NATIVE_LAYER.match(key)
        suffix = m.group(2) if m else None
        if suffix in layer:
            plan.append((f"transformer.h.{m.group(1)}.{layer[suffix]}", (key,), "copy"))
        elif suffix in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            kind = suffix.rsplit(".", 1)[1]
            parts = tuple(f"model.layers.{m.group(1)}.self_attn.{p}.{kind}" for p in _QKV)
            missing = [p for p in parts if p not in present]
            if missing:
                raise FamtuneError(f"native Qwen1 weights lack {missing[0]!r}; the model directory is incomplete")
            plan.append((f"transformer.h.{m.group(1)}.attn.c_attn.{kind}", parts, "cat"))
        elif suffix in {f"self_attn.{p}.{k}" for p in _QKV[1:] for k in ("weight", "bias")}:
            continue  # folded into c_attn with q_proj
        else:
            raise FamtuneError(
                f"unexpected tensor {key!r} in native Qwen1 weights; merge LoRA adapters before writing the original layout"
            )
    return plan


def expected_original_keys(config: dict[str, Any]) -> set[str]:
    keys = {o for o, _ in _TOP_RENAMES}
    for i in range(config["num_hidden_layers"]):
        keys |= {f"transformer.h.{i}.{o}" for o, _ in _LAYER_RENAMES}
        keys |= {f"transformer.h.{i}.attn.c_attn.weight", f"transformer.h.{i}.attn.c_attn.bias"}
    return keys


def _check_complete(have: set[str], want: set[str], where: str) -> None:
    # from_pretrained would silently re-initialise a missing tensor: refuse instead.
    missing = sorted(want - have)
    if missing:
        raise FamtuneError(f"{where} lacks {len(missing)} tensor(s), e.g. {missing[0]!r}; the checkpoint is incomplete")


def _apply(plan: Plan, get: Callable[[str], Any]) -> Iterator[tuple[str, Any]]:
    import torch

    for out_key, in_keys, op in plan:
        if op == "copy":
            yield out_key, get(in_keys[0])
        elif op == "cat":
            yield out_key, torch.cat([get(k) for k in in_keys], dim=0)
        else:
            t = get(in_keys[0])
            if t.shape[0] % 3:
                raise FamtuneError(f"{in_keys[0]!r} has {t.shape[0]} rows, not a multiple of 3 (q, k, v)")
            # clone: safetensors refuses to save views that share one storage
            yield out_key, t.chunk(3, dim=0)[op[1]].clone()


def to_native(config: dict[str, Any], state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Original Qwen1 (config, state dict) -> native Qwen2 (config, state dict)."""
    _check_complete(set(state_dict), expected_original_keys(config), "the Qwen1 state dict")
    emb = state_dict["transformer.wte.weight"]
    cfg = native_config(config, dtype=str(emb.dtype).removeprefix("torch."))
    return cfg, dict(_apply(native_plan(list(state_dict)), state_dict.__getitem__))


def to_original(
    native_config: dict[str, Any], native_state_dict: dict[str, Any], original_config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Native Qwen2 (config, state dict) -> original Qwen1 (config, state dict)."""
    cfg = restore_original_config(native_config, original_config)
    sd = dict(_apply(original_plan(list(native_state_dict)), native_state_dict.__getitem__))
    _check_complete(set(sd), expected_original_keys(cfg), "the native Qwen1 state dict")
    return cfg, sd


# -- files (famtune.convert does the reading, sharding and caching) ---------------------------------


def _write_native(src: Path, dst: Path) -> None:
    config = read_json(src / "config.json")
    reader = TensorReader(src)
    _check_complete(set(reader.keys()), expected_original_keys(config), str(src))
    write_shards(_apply(native_plan(reader.keys()), reader.get), dst)
    write_json(dst / "config.json", native_config(config, dtype=reader.dtype("transformer.wte.weight")))
    copy_generation_config(src, dst)


def write_original_layout(
    native_dir: str, out_dir: str, original_config: dict[str, Any], max_shard_bytes: int = MAX_SHARD_BYTES
) -> bool:
    """Write ``native_dir`` (a native Qwen2 model of a Qwen1 checkpoint) in the original layout.

    Only config.json and the weights are written; the remote-code ``*.py`` and tokenizer files
    belong to the source checkpoint.
    """
    src, dst = Path(native_dir), Path(out_dir)
    cfg = restore_original_config(read_json(src / "config.json"), original_config)
    reader = TensorReader(src)
    plan = original_plan(reader.keys())
    _check_complete({k for k, _, _ in plan}, expected_original_keys(cfg), str(src))
    write_shards(_apply(plan, reader.get), dst, max_shard_bytes)
    write_json(dst / "config.json", cfg)
    copy_generation_config(src, dst)
    return True


def native_dir_for(path: str | Path) -> Path:
    """The cached native layout of the original checkpoint at ``path``, converted on first use."""
    return native_copy(path, FAMILY, CONVERTER_VERSION, _write_native)


def load_model(path: str, load_kwargs: dict[str, Any]) -> Any:
    """The original Qwen1 checkpoint at ``path`` as a native ``Qwen2ForCausalLM`` (no remote code)."""
    from transformers import AutoModelForCausalLM

    config = read_json(Path(path) / "config.json")
    if config.get("use_dynamic_ntk") or config.get("use_logn_attn"):
        log.warning(
            "%s: Qwen1 runs as native Qwen2 here; it matches the original up to seq_length=%s tokens only "
            "(use_dynamic_ntk/use_logn_attn are not reproduced beyond it)",
            path,
            config.get("seq_length"),
        )
    kwargs = dict(load_kwargs)
    kwargs["trust_remote_code"] = False  # the converted directory is native; nothing to trust
    return AutoModelForCausalLM.from_pretrained(str(native_dir_for(path)), **kwargs)
