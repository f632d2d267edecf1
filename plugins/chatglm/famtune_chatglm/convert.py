"""ChatGLM3 / GLM-4 original layout <-> transformers ``GlmForCausalLM``: config and tensors.

The remote-code block is exactly ``GlmDecoderLayer`` (checked to 0.0 logit difference on the
ChatGLM3 reference checkpoint):

* ``query_key_value`` rows are a contiguous ``[Q; K; V]`` with ``multi_query_group_num`` kv heads;
* ``dense_h_to_4h`` is ``[gate; up]``, the order ``GlmMLP`` chunks ``gate_up_proj`` in;
* RoPE rotates the first half of each head in adjacent pairs, with base ``10000 * rope_ratio``
  (``RotaryEmbedding.forward_impl``: ``base = base * self.rope_ratio``). transformers' own GLM
  converter drops ``rope_ratio`` (``getattr`` on a dict), which would give GLM-4 a base of 1e4
  instead of 5e6; here it is carried over.

The name and tensor maps are this family's part; the file work at the end is famtune.convert's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from famtune.convert import (
    MARKER_KEY,
    TensorReader,
    copy_generation_config,
    native_copy,
    write_json,
    write_shards,
)
from famtune.errors import FamtuneError

NATIVE_MODEL_TYPE = "glm"

if TYPE_CHECKING:
    import torch

Load = Callable[[str], "torch.Tensor"]

INV_FREQ = "transformer.rotary_pos_emb.inv_freq"
_ORIG_LAYER = "transformer.encoder.layers."
_NATIVE_LAYER = "model.layers."
_QKV = "self_attention.query_key_value."

_GLOBAL_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL_NAMES.items()}
_LAYER_BACK = {v: k for k, v in _LAYER_NAMES.items()}

# Settings under which the remote-code block equals GlmDecoderLayer. Every released ChatGLM2/3
# and GLM-4 config has these values; anything else is a different network.
_REQUIRED = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "add_bias_linear": False,
}


def check_supported(config: dict[str, Any], where: str) -> None:
    for key, want in _REQUIRED.items():
        if key in config and bool(config[key]) != want:
            raise FamtuneError(
                f"{where}: config.json has {key}={config[key]!r}; only {key}={want} maps onto GlmForCausalLM, "
                "so this checkpoint cannot be loaded natively"
            )
    if config.get("quantization_bit"):
        raise FamtuneError(
            f"{where}: config.json has quantization_bit={config['quantization_bit']!r}; load the unquantized "
            "checkpoint (famtune quantizes to NF4 itself)"
        )
    if config.get("pre_seq_len"):
        raise FamtuneError(
            f"{where}: config.json has pre_seq_len={config['pre_seq_len']!r} (a P-tuning prefix encoder); "
            "use the base checkpoint without the prefix encoder"
        )


def head_dim(config: dict[str, Any]) -> int:
    return config.get("kv_channels") or config["hidden_size"] // config["num_attention_heads"]


def kv_heads(config: dict[str, Any]) -> int:
    if config.get("multi_query_attention"):
        return config.get("multi_query_group_num", 1)
    return config["num_attention_heads"]


def qkv_sizes(config: dict[str, Any]) -> list[int]:
    d = head_dim(config)
    kv = kv_heads(config) * d
    return [config["num_attention_heads"] * d, kv, kv]


def rope_theta(config: dict[str, Any]) -> float:
    return 10000.0 * float(config.get("rope_ratio", 1))


def native_config(config: dict[str, Any], family: str) -> dict[str, Any]:
    """The ``config.json`` of the native ``GlmForCausalLM`` for an original ``config``."""
    vocab = config["padded_vocab_size"]
    pad = config.get("pad_token_id")
    native = {
        "architectures": ["GlmForCausalLM"],
        "model_type": NATIVE_MODEL_TYPE,
        MARKER_KEY: family,
        "vocab_size": vocab,
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["ffn_hidden_size"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": kv_heads(config),
        "head_dim": head_dim(config),
        "hidden_act": "silu",
        "attention_dropout": config.get("attention_dropout", 0.0),
        "attention_bias": bool(config.get("add_qkv_bias", False)),
        # GlmConfig's default eps is 1.5625e-7 (GLM-4); ChatGLM3 uses 1e-5, so always set it.
        "rms_norm_eps": config.get("layernorm_epsilon", 1e-5),
        # The original rotary dim is kv_channels // 2 in every release: a factor of 0.5.
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta(config), "partial_rotary_factor": 0.5},
        "max_position_embeddings": config.get("seq_length", 2048),
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": config.get("eos_token_id"),
        # nn.Embedding rejects a padding_idx outside the table (only toy vocabularies hit this).
        "pad_token_id": pad if isinstance(pad, int) and 0 <= pad < vocab else None,
    }
    if config.get("torch_dtype"):
        native["dtype"] = config["torch_dtype"]
    return native


def _split_layer(name: str, prefix: str) -> tuple[str, str] | None:
    if not name.startswith(prefix):
        return None
    index, _, rest = name[len(prefix) :].partition(".")
    return index, rest


def native_tensors(names: Iterable[str], load: Load, config: dict[str, Any], where: str) -> Iterator[tuple[str, Any]]:
    """Native (name, tensor) pairs for the original tensors ``names``, one source tensor at a time."""
    import torch

    sizes = qkv_sizes(config)
    for name in names:
        if name == INV_FREQ:
            continue  # GlmRotaryEmbedding recomputes the same buffer
        if name in _GLOBAL_NAMES:
            yield _GLOBAL_NAMES[name], load(name)
            continue
        parts = _split_layer(name, _ORIG_LAYER)
        if parts is None:
            raise FamtuneError(f"{where}: unexpected tensor {name!r}; it has no place in GlmForCausalLM")
        index, rest = parts
        base = f"{_NATIVE_LAYER}{index}."
        if rest.startswith(_QKV):
            kind = rest[len(_QKV) :]
            fused = load(name)
            if fused.shape[0] != sum(sizes):
                raise FamtuneError(
                    f"{where}: {name} has {fused.shape[0]} rows but config.json implies {sum(sizes)} (q/k/v {sizes})"
                )
            # clone: safetensors refuses to save views that share one storage
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), torch.split(fused, sizes, dim=0)):
                yield f"{base}self_attn.{proj}.{kind}", part.clone()
        elif rest in _LAYER_NAMES:
            yield base + _LAYER_NAMES[rest], load(name)
        else:
            raise FamtuneError(f"{where}: unexpected tensor {name!r}; it has no place in GlmForCausalLM")


def original_inv_freq(config: dict[str, Any]):
    """The ``rotary_pos_emb.inv_freq`` buffer exactly as the remote code builds it (base 1e4, in
    ``torch_dtype``; ``rope_ratio`` is applied later, in ``forward_impl``)."""
    import torch

    dtype = getattr(torch, str(config.get("torch_dtype") or "float32"))
    dim = head_dim(config) // 2
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=dtype) / dim))


def original_tensors(names: Iterable[str], load: Load, config: dict[str, Any], where: str) -> Iterator[tuple[str, Any]]:
    """Original (name, tensor) pairs for the native tensors ``names``; ``config`` is the original
    ``config.json``. q/k/v are fused back in the original row order."""
    import torch

    names = list(names)
    present = set(names)
    for name in names:
        if name in _GLOBAL_BACK:
            yield _GLOBAL_BACK[name], load(name)
            continue
        parts = _split_layer(name, _NATIVE_LAYER)
        if parts is None:
            raise FamtuneError(f"{where}: unexpected tensor {name!r}; it has no place in the original ChatGLM layout")
        index, rest = parts
        base = f"{_ORIG_LAYER}{index}."
        proj, _, kind = rest.rpartition(".")
        if proj in ("self_attn.k_proj", "self_attn.v_proj"):
            continue  # fused together with q_proj
        if proj == "self_attn.q_proj":
            pieces = [f"{_NATIVE_LAYER}{index}.self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj")]
            missing = [p for p in pieces if p not in present]
            if missing:
                raise FamtuneError(f"{where}: {missing[0]} is missing; cannot rebuild {base}{_QKV}{kind}")
            yield f"{base}{_QKV}{kind}", torch.cat([load(p) for p in pieces], dim=0)
        elif rest in _LAYER_BACK:
            yield base + _LAYER_BACK[rest], load(name)
        else:
            raise FamtuneError(f"{where}: unexpected tensor {name!r}; it has no place in the original ChatGLM layout")
    yield INV_FREQ, original_inv_freq(config)


# -- files (famtune.convert reads, shards and caches) -------------------------------------------------
#: Part of the cache key: bump it when the conversion changes.
CONVERTER_VERSION = 1


def write_native(src: str | Path, out_dir: str | Path, family: str, config: dict[str, Any]) -> None:
    """Write the native layout of the original checkpoint ``src`` (whose config is ``config``)."""
    check_supported(config, str(src))
    reader = TensorReader(src)
    write_shards(native_tensors(reader.keys(), reader.get, config, str(src)), out_dir)
    write_json(Path(out_dir) / "config.json", native_config(config, family))
    copy_generation_config(src, out_dir)


def native_cache_dir(src: str | Path, family: str, config: dict[str, Any]) -> Path:
    """The cached native copy of ``src``, converted on first use."""
    return native_copy(src, family, CONVERTER_VERSION, lambda s, out: write_native(s, out, family, config))


def write_original(native_dir: str | Path, out_dir: str | Path, original_config: dict[str, Any]) -> None:
    """Write the original layout (its ``config.json`` with ``auto_map``, original tensor names)."""
    check_supported(original_config, str(native_dir))
    reader = TensorReader(native_dir)
    write_shards(original_tensors(reader.keys(), reader.get, original_config, str(native_dir)), out_dir)
    write_json(Path(out_dir) / "config.json", original_config)
    copy_generation_config(native_dir, out_dir)
