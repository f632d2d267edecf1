"""InternLM2's original layout <-> transformers' native ``LlamaForCausalLM`` layout.

Config and state-dict functions (the family-specific part), then the two file conversions built
on ``famtune.convert`` (reading, sharding, the cached native copy).

InternLM2 is Llama with other names plus one fused projection: ``attention.wqkv`` holds q, k and
v **grouped per kv head**. Its rows are ``num_key_value_heads`` blocks, each made of the group's
query heads, then its key head, then its value head (``head_dim`` rows each). Splitting it as a
contiguous ``[Q; K; V]`` is a known wrong conversion that only shows when kv heads < heads.
RoPE is Llama's rotate-half on the full head, so q and k need no permutation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from famtune import convert as toolkit

FAMILY = "internlm2"
MODEL_TYPE = "internlm2"
ARCHITECTURE = "InternLM2ForCausalLM"

AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
}

# Renames that need no reshaping: (original suffix, native suffix) inside one decoder layer.
_LAYER_RENAMES = (
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("attention.wo.bias", "self_attn.o_proj.bias"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),  # w1 goes through SiLU: the gate
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)
_TOP_RENAMES = (
    ("model.tok_embeddings.weight", "model.embed_tokens.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_QKV = ("q_proj", "k_proj", "v_proj")


class ConversionError(ValueError):
    """A config or state dict that is not a convertible InternLM2 checkpoint."""


# -- config -----------------------------------------------------------------------------------


def _geometry(config: dict[str, Any]) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim) from either layout's config."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    if heads % kv_heads:
        raise ConversionError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return heads, kv_heads, head_dim


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """Llama ``rope_parameters`` for InternLM2's ``rope_theta`` and ``rope_scaling``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000))}
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        # InternLM2's "dynamic" is the same NTK rule as transformers' "dynamic", and its
        # "linear" the same position interpolation, both relative to max_position_embeddings.
        if kind not in ("dynamic", "linear"):
            raise ConversionError(f"rope_scaling type {kind!r} is not supported; InternLM2 uses dynamic or linear")
        params.update(rope_type=kind, factor=float(scaling["factor"]))
    return params


def to_native_config(original: dict[str, Any]) -> dict[str, Any]:
    """The ``LlamaForCausalLM`` config.json for an original InternLM2 config.json."""
    if original.get("model_type") != MODEL_TYPE:
        raise ConversionError(f"model_type is {original.get('model_type')!r}, not {MODEL_TYPE!r}")
    heads, kv_heads, head_dim = _geometry(original)
    native = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        toolkit.MARKER_KEY: FAMILY,
        "vocab_size": original["vocab_size"],
        "hidden_size": original["hidden_size"],
        "intermediate_size": original["intermediate_size"],
        "num_hidden_layers": original["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": original.get("hidden_act", "silu"),
        "max_position_embeddings": original.get("max_position_embeddings", 2048),
        "initializer_range": original.get("initializer_range", 0.02),
        "rms_norm_eps": original.get("rms_norm_eps", 1e-6),
        "use_cache": original.get("use_cache", True),
        "bos_token_id": original.get("bos_token_id", 1),
        "eos_token_id": original.get("eos_token_id", 2),
        "pad_token_id": original.get("pad_token_id", 0),
        "tie_word_embeddings": original.get("tie_word_embeddings", False),
        "rope_parameters": rope_parameters(original),
        # InternLM2's `bias` covers wqkv and wo only, exactly Llama's attention_bias.
        "attention_bias": bool(original.get("bias", False)),
        "mlp_bias": False,
        "attention_dropout": 0.0,
    }
    dtype = original.get("torch_dtype") or original.get("dtype")
    if dtype:
        native["dtype"] = dtype
    return native


def to_original_config(native: dict[str, Any], original: dict[str, Any] | None = None) -> dict[str, Any]:
    """The original config.json for a native one.

    With ``original`` (the config the model was converted from) that config is kept as it is,
    after checking that the shapes agree; only ``torch_dtype`` follows the native weights.
    """
    heads, kv_heads, head_dim = _geometry(native)
    if original is not None:
        expected = to_native_config(original)
        for key in (*toolkit.SHAPE_KEYS, "num_key_value_heads", "head_dim"):
            if native.get(key, expected[key]) != expected[key]:
                raise ConversionError(
                    f"native config has {key} {native.get(key)} but the original config has {expected[key]}; "
                    "pass the config.json of the checkpoint the model was trained from"
                )
        result = dict(original)
        dtype = native.get("dtype") or native.get("torch_dtype")
        if dtype and "torch_dtype" in result:
            result["torch_dtype"] = dtype
        return result
    rope = native.get("rope_parameters") or {}
    kind = rope.get("rope_type", "default")
    return {
        "architectures": [ARCHITECTURE],
        "auto_map": dict(AUTO_MAP),
        "model_type": MODEL_TYPE,
        "vocab_size": native["vocab_size"],
        "hidden_size": native["hidden_size"],
        "intermediate_size": native["intermediate_size"],
        "num_hidden_layers": native["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": native.get("hidden_act", "silu"),
        "max_position_embeddings": native.get("max_position_embeddings", 2048),
        "initializer_range": native.get("initializer_range", 0.02),
        "rms_norm_eps": native.get("rms_norm_eps", 1e-6),
        "use_cache": native.get("use_cache", True),
        "bos_token_id": native.get("bos_token_id", 1),
        "eos_token_id": native.get("eos_token_id", 2),
        "pad_token_id": native.get("pad_token_id", 0),
        "tie_word_embeddings": native.get("tie_word_embeddings", False),
        "bias": bool(native.get("attention_bias", False)),
        "rope_theta": rope.get("rope_theta", 10000),
        "rope_scaling": None if kind == "default" else {"type": kind, "factor": rope["factor"]},
        "torch_dtype": native.get("dtype") or native.get("torch_dtype") or "bfloat16",
    }


# -- weights ------------------------------------------------------------------------------------


def split_wqkv(wqkv, config: dict[str, Any]):
    """(q, k, v) from a grouped ``wqkv`` weight or bias (rows are dimension 0)."""
    heads, kv_heads, head_dim = _geometry(config)
    groups = heads // kv_heads
    rows = (heads + 2 * kv_heads) * head_dim
    if wqkv.shape[0] != rows:
        raise ConversionError(
            f"wqkv has {wqkv.shape[0]} rows but {heads} heads, {kv_heads} kv heads of dim {head_dim} need {rows}"
        )
    rest = tuple(wqkv.shape[1:])
    blocks = wqkv.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = blocks[:, :groups].reshape(heads * head_dim, *rest).contiguous()
    k = blocks[:, groups].reshape(kv_heads * head_dim, *rest).contiguous()
    v = blocks[:, groups + 1].reshape(kv_heads * head_dim, *rest).contiguous()
    return q, k, v


def fuse_wqkv(q, k, v, config: dict[str, Any]):
    """The grouped ``wqkv`` weight or bias from native q, k and v (inverse of ``split_wqkv``)."""
    import torch

    heads, kv_heads, head_dim = _geometry(config)
    groups = heads // kv_heads
    rest = tuple(q.shape[1:])
    blocks = torch.cat(
        [
            q.reshape(kv_heads, groups, head_dim, *rest),
            k.reshape(kv_heads, 1, head_dim, *rest),
            v.reshape(kv_heads, 1, head_dim, *rest),
        ],
        dim=1,
    )
    return blocks.reshape((heads + 2 * kv_heads) * head_dim, *rest).contiguous()


def to_native_state_dict(config: dict[str, Any], state_dict: dict[str, Any]) -> dict[str, Any]:
    """Native tensors for original ones. Each key converts on its own, so a shard converts alone."""
    native: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        top = dict(_TOP_RENAMES).get(key)
        if top is not None:
            native[top] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ConversionError(f"unexpected weight {key!r}; this is not an InternLM2ForCausalLM checkpoint")
        prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
        if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(_QKV, split_wqkv(tensor, config)):
                native[f"{prefix}self_attn.{name}.{kind}"] = part
            continue
        renamed = dict(_LAYER_RENAMES).get(rest)
        if renamed is None:
            raise ConversionError(f"unexpected weight {key!r}; this is not an InternLM2ForCausalLM checkpoint")
        native[prefix + renamed] = tensor
    return native


def to_original_state_dict(config: dict[str, Any], state_dict: dict[str, Any]) -> dict[str, Any]:
    """Original tensors for native ones. q, k and v of a layer must come together."""
    original: dict[str, Any] = {}
    top = {native: orig for orig, native in _TOP_RENAMES}
    layer = {native: orig for orig, native in _LAYER_RENAMES}
    pending: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        if key in top:
            original[top[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ConversionError(f"unexpected weight {key!r}; this is not a LlamaForCausalLM state dict")
        prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
        parts = rest.split(".")
        if len(parts) == 3 and parts[0] == "self_attn" and parts[1] in _QKV:
            pending.setdefault((prefix, parts[2]), {})[parts[1]] = tensor
            continue
        if rest not in layer:
            raise ConversionError(f"unexpected weight {key!r}; InternLM2 has no such tensor")
        original[prefix + layer[rest]] = tensor
    for (prefix, kind), qkv in pending.items():
        missing = [n for n in _QKV if n not in qkv]
        if missing:
            raise ConversionError(f"{prefix}self_attn is missing {', '.join(missing)}.{kind}; q, k and v fuse together")
        original[f"{prefix}attention.wqkv.{kind}"] = fuse_wqkv(qkv["q_proj"], qkv["k_proj"], qkv["v_proj"], config)
    return original


# -- files ------------------------------------------------------------------------------------------
#: Part of the cache key: bump it when the conversion's output changes.
CONVERTER_VERSION = 1
_KV = ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")


def _shard_keys(reader: toolkit.TensorReader, file: Path) -> list[str]:
    return [k for k, name in reader.weight_map.items() if name == file.name]


def write_native_layout(src: str | Path, out_dir: str | Path) -> None:
    """Convert the original checkpoint at ``src`` into a native ``LlamaForCausalLM`` directory."""
    original = toolkit.read_json(Path(src) / "config.json")
    reader = toolkit.TensorReader(src)

    def tensors():
        for f in toolkit.weight_files(src):  # a fused wqkv never spans two shards, so each converts alone
            yield from to_native_state_dict(original, {k: reader.get(k) for k in _shard_keys(reader, f)}).items()

    toolkit.write_shards(tensors(), out_dir)
    toolkit.write_json(Path(out_dir) / "config.json", to_native_config(original))
    toolkit.copy_generation_config(src, out_dir)


def native_cache_dir(path: str | Path) -> Path:
    """The native-layout copy of the original checkpoint at ``path``, converted on first use."""
    return toolkit.native_copy(path, FAMILY, CONVERTER_VERSION, write_native_layout)


def write_original_layout(native_dir: str | Path, out_dir: str | Path, original_config: dict[str, Any] | None) -> None:
    """Convert a native-layout directory (e.g. a merged model) back to InternLM2's original layout."""
    native = toolkit.read_json(Path(native_dir) / "config.json")
    reader = toolkit.TensorReader(native_dir)

    def tensors():
        for f in toolkit.weight_files(native_dir):
            keys = [k for k in _shard_keys(reader, f) if not k.endswith(_KV)]
            # q, k and v of one layer fuse into one wqkv, wherever the native shards put them.
            for k in list(keys):
                if k.endswith(("q_proj.weight", "q_proj.bias")):
                    for sibling in (k.replace("q_proj", "k_proj"), k.replace("q_proj", "v_proj")):
                        if sibling not in reader.weight_map:
                            raise KeyError(f"{native_dir}: {k} has no {sibling}; the native weights are incomplete")
                        keys.append(sibling)
            yield from to_original_state_dict(native, {k: reader.get(k) for k in keys}).items()

    toolkit.write_shards(tensors(), out_dir)
    toolkit.write_json(Path(out_dir) / "config.json", to_original_config(native, original_config))
    toolkit.copy_generation_config(native_dir, out_dir)
