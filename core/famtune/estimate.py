"""``famtune estimate``: the peak accelerator memory of a (Q)LoRA run, predicted from the model's config.

Nothing is loaded but the module tree on the meta device. The estimate follows what training does:

- weights: NF4 linear layers at 4 bits plus their double-quantized block scales; every other
  parameter (embeddings, output head, norms, biases) in fp32, because ``prepare_model_for_kbit_training``
  upcasts them (without quantization: the compute dtype);
- LoRA: fp32 adapter matrices, their gradients and AdamW's two fp32 moments;
- activations: with gradient checkpointing, one saved hidden state per decoder layer, plus the
  larger of the loss peak and the backward peak of one recomputed layer. famtune's loss
  (``famtune.loss``) computes the head and the cross-entropy a chunk of rows at a time and keeps
  only the gradient of the hidden states, so the loss peak is one fp32 ``chunk x vocab`` tensor
  (at most ``CHUNK_ELEMENTS`` values) plus a few fp32 ``tokens x hidden`` ones, whatever the
  vocabulary; every token is counted as supervised (the worst case). A model that changes its
  head's output (Gemma-2's logit soft-capping, a logit scale) cannot take that loss (the check is
  ``famtune.loss.head_is_fusable``, the one training makes): its full ``tokens x vocab`` logits, what
  the model computes from them and the cross-entropy's copies and gradients are counted instead;
- parameters: a head tied to the input embeddings is one matrix, counted once.

The per-token counts of one recomputed layer (``_HIDDEN_PER_TOKEN``, ``_INTERMEDIATE_PER_TOKEN``) are
fitted to the measured peaks of famtune's own training step (``measure_cpu_peak``: famtune's loss and
LoRA dropout, NF4, gradient checkpointing) on five standard decoders (RMSNorm, rotary attention, gated MLP) from 0.5 M to 60 M parameters,
where they leave at most 2% error: norm outputs, attention in/out, rotary copies, the MLP's gate, up,
activation and product, and one dropout copy of the input per LoRA-targeted projection.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any

from famtune.errors import FamtuneError

GIB = 1024**3
# One recomputed decoder layer at its backward peak, in tensors of width hidden / intermediate
# per token (before the LoRA dropout copies, which depend on the targets).
_HIDDEN_PER_TOKEN = 6
_INTERMEDIATE_PER_TOKEN = 2.5
_KV_PER_TOKEN = 2
# Loss peak: a chunk's logits (turned into probabilities in place),
# plus the final hidden states, the supervised rows and their gradient (tokens x hidden each).
_CHUNK_COPIES = 1
_HIDDEN_AT_LOSS = 3
# A head famtune cannot fuse (soft-capped or rescaled logits): tokens x vocab tensors alive at the
# loss peak, and still held while backward goes through the layers.
_UNFUSED_LOGIT_COPIES = 4
_UNFUSED_LOGITS_HELD = 1
# Bytes per weight of NF4 with double quantization: 4 bits, one uint8 scale per 64-value block and
# one fp32 scale per 256 blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class MemoryEstimate:
    weights: float
    lora: float
    gradients: float
    optimizer: float
    activations: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.gradients + self.optimizer + self.activations

    def lines(self, budget: float | None = None) -> list[str]:
        d = self.details
        out = [
            f"model: {d['model']} ({d['params'] / 1e9:.2f}B parameters, {d['layers']} layers, hidden {d['hidden']}, "
            f"vocab {d['vocab']}); {d['quantization']} base, compute {d['compute_dtype']}",
            f"run: LoRA r={d['lora_r']} on {d['lora_modules']} modules ({d['lora_params']:,} trainable), "
            f"batch {d['batch']} x {d['seq_len']} tokens, gradient checkpointing {'on' if d['checkpointing'] else 'off'}",
            f"  weights      {_fmt(self.weights)}  ({_fmt(d['quantized_bytes'])} in {d['quantized_count']} NF4 layers, "
            f"{_fmt(d['plain_bytes'])} other parameters in {d['plain_dtype']})"
            if d["quantized_count"]
            else f"  weights      {_fmt(self.weights)}  (all parameters in {d['plain_dtype']})",
            f"  LoRA         {_fmt(self.lora)}  (fp32 adapter matrices)",
            f"  gradients    {_fmt(self.gradients)}  (LoRA only, the base is frozen; "
            + ("not yet allocated at the loss peak)" if not self.gradients else "alive during backward)"),
            f"  optimizer    {_fmt(self.optimizer)}  (AdamW: two fp32 moments per trainable parameter"
            + (f"; AdaLoRA's allocator {_fmt(d['allocator_bytes']).strip()})" if d.get("allocator_bytes") else ")"),
            f"  activations  {_fmt(self.activations)}  ({d['activation_peak']})",
            f"  total        {_fmt(self.total)}  peak tensor memory",
        ]
        if d.get("sharding"):
            out.insert(2, f"per device: {d['sharding']}")
        if d.get("method_note"):
            out.insert(
                2,
                f"adapter: {d['adapter']}"
                + (f", init {d['lora_init']}" if d["lora_init"] != "default" else "")
                + f" ({d['method_note']})",
            )
        if d.get("init_peak"):
            out.append(
                f"  initialisation {_fmt(d['init_peak']).strip()} before training ({d['lora_init']} decomposes "
                "each target weight; lower than the training peak unless the model is nearly all weights)"
            )
        if budget is not None:
            if self.total <= budget:
                out.append(
                    f"fits in {_fmt(budget).strip()}: {_fmt(budget - self.total).strip()} to spare "
                    "(allocator and CUDA context overhead come on top, typically 0.3-1 GiB)"
                )
            elif self.weights + self.lora + self.optimizer > budget:
                out.append(
                    f"does not fit in {_fmt(budget).strip()}: the weights and LoRA state alone take "
                    f"{_fmt(self.weights + self.lora + self.optimizer).strip()}; {d['weight_advice']}"
                )
            else:
                out.append(
                    f"does not fit in {_fmt(budget).strip()}: {_fmt(self.total - budget).strip()} over; the "
                    f"weights leave {_fmt(budget - self.weights - self.lora - self.optimizer).strip()} for "
                    f"{_fmt(self.activations + self.gradients).strip()} of activations; {d['advice']}"
                )
        return out


def _fmt(n: float) -> str:
    return f"{n / GIB:7.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:7.1f} MiB"


def parse_size(text: str) -> float:
    """``8GB``, ``8GiB``, ``7.5G``, ``500MB`` -> bytes (GB and GiB both mean 1024**3: memory is sold in GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])i?B?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise FamtuneError(f"budget {text!r} is not a size; write it like 8GB, 7.5GiB or 500MB")
    return float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2).upper()) + 1)


def _dtype_bytes(dtype: Any) -> int:
    return dtype.itemsize


def estimate_model(
    model: Any,
    nf4_modules: set[str],
    targets: list[str],
    *,
    seq_len: int,
    batch: int,
    checkpointing: bool,
    compute_dtype: Any,
    lora_r: int,
    lora_dropout: float,
    name: str = "",
    adapter: str = "lora",
    lora_init: str = "default",
    fused_head: bool | None = None,
) -> MemoryEstimate:
    """The estimate for a meta-device ``model`` whose ``nf4_modules`` are quantized (empty: none).

    ``fused_head`` says whether training takes famtune's chunked fused loss; None asks
    ``famtune.loss.head_is_fusable``, the check training itself makes (on the frozen model, as
    training has it: this freezes ``model``'s parameters; ask before NF4 layers replace the
    linear ones, which cannot run on the meta device).

    ``adapter`` and ``lora_init`` add each method's own memory (see ``_method_memory``); for
    AdaLoRA ``lora_r`` is the initial rank, which the adapter keeps allocated until training ends.
    """
    import torch

    from famtune.loss import CHUNK_ELEMENTS

    if fused_head is None:
        fused_head = _frozen_head_is_fusable(model)
    quantized = bool(nf4_modules)
    plain_dtype = torch.float32 if quantized else compute_dtype
    modules = dict(model.named_modules())
    nf4_weights = {f"{n}.weight" for n in nf4_modules}
    q_numel = plain_numel = 0
    biggest_linear = 0
    for pname, p in model.named_parameters():
        n = p.numel() if not hasattr(p, "quant_state") else _linear_numel(modules[pname.rsplit(".", 1)[0]])
        if pname in nf4_weights:
            q_numel += n
            biggest_linear = max(biggest_linear, n)
        else:
            plain_numel += n
    lora_in: list[int] = []
    lora_out: list[int] = []
    lora_params = 0
    biggest_target = 0
    for mname, module in modules.items():
        if any(mname == t or mname.endswith("." + t) for t in targets) and hasattr(module, "in_features"):
            lora_params += lora_r * (module.in_features + module.out_features)
            lora_in.append(module.in_features)
            lora_out.append(module.out_features)
            biggest_target = max(biggest_target, module.in_features * module.out_features)
    cfg = model.config
    hidden = model.get_input_embeddings().embedding_dim
    vocab = model.get_output_embeddings().out_features
    layers = _layer_count(model)
    inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_hidden_size", None) or 4 * hidden)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "multi_query_group_num", None) or heads)
    kv = hidden * kv_heads // heads
    act = _dtype_bytes(compute_dtype)
    tokens = seq_len * batch
    per_layer_targets = len(lora_in) / max(layers, 1)
    # Dropout (p > 0) keeps a copy of every LoRA layer's input; q/k/v each take their own copy.
    copies_hidden = sum(1 for i in lora_in if i == hidden) / max(layers, 1) if lora_dropout > 0 else 0
    copies_inter = sum(1 for i in lora_in if i != hidden) / max(layers, 1) if lora_dropout > 0 else 0
    saved_inputs = (layers + 1) * tokens * hidden * 4  # fp32 residual stream: embeddings are upcast
    head_bytes = 4 if quantized else act  # the head stays fp32 under QLoRA; otherwise it computes in act
    if fused_head:
        chunk = min(tokens, max(1, CHUNK_ELEMENTS // vocab))
        logits_held = tokens * hidden * 4  # the loss keeps only d loss / d hidden for backward
        loss_peak = (
            _CHUNK_COPIES * chunk * vocab * 4
            + (2 * chunk * vocab * head_bytes if head_bytes < 4 else 0)
            + _HIDDEN_AT_LOSS * tokens * hidden * 4
        )
    else:
        # The model's own head runs on every supervised row and its logits stay alive for backward:
        # the head's output, what the model makes of it (soft-cap, scale), the cross-entropy's
        # log-softmax and, in backward, their gradients.
        logits_held = _UNFUSED_LOGITS_HELD * tokens * vocab * head_bytes + tokens * hidden * 4
        loss_peak = (
            _UNFUSED_LOGIT_COPIES * tokens * vocab * head_bytes
            + (2 * tokens * vocab * 4 if head_bytes < 4 else 0)  # the cross-entropy's fp32 copies
            + _HIDDEN_AT_LOSS * tokens * hidden * 4
        )
    layer_peak = (
        tokens
        * act
        * (
            (_HIDDEN_PER_TOKEN + copies_hidden) * hidden
            + (_INTERMEDIATE_PER_TOKEN + copies_inter) * inter
            + _KV_PER_TOKEN * kv
        )
    )
    dequantized = biggest_linear * act if quantized else 0  # bitsandbytes dequantizes a weight per matmul
    extra = _method_memory(
        adapter,
        lora_init,
        lora_r=lora_r,
        lora_params=lora_params,
        lora_in=lora_in,
        lora_out=lora_out,
        layers=layers,
        tokens=tokens,
        act=act,
        biggest_target=biggest_target,
    )
    lora_params += extra["params"]
    layer_peak += extra["layer_saved"]
    dequantized += extra["layer_transient"]
    if checkpointing:
        layer_phase = saved_inputs + logits_held + layer_peak + dequantized
        loss_phase = saved_inputs + loss_peak
    else:
        layer_phase = layers * layer_peak + logits_held + dequantized
        loss_phase = layers * layer_peak + loss_peak
    # LoRA gradients appear during backward through the layers, after the loss peak has passed.
    gradients = lora_params * 4 if layer_phase + lora_params * 4 > loss_phase else 0
    activations = loss_phase if not gradients else layer_phase
    peak_where = (
        (
            "loss: one chunk of logits and the hidden-state gradient"
            if fused_head
            else "loss: the full logits and their gradient (the model changes its head's output, so the "
            "chunked fused loss cannot be used)"
        )
        if not gradients
        else "backward through one recomputed decoder layer"
        if checkpointing
        else "backward, all layers saved"
    )
    details = {
        "model": name,
        "params": q_numel + plain_numel,
        "layers": layers,
        "hidden": hidden,
        "vocab": vocab,
        "quantization": "nf4" if quantized else "unquantized",
        "compute_dtype": str(compute_dtype).split(".")[-1],
        "lora_r": lora_r,
        "lora_modules": len(lora_in),
        "lora_params": lora_params,
        "batch": batch,
        "seq_len": seq_len,
        "checkpointing": checkpointing,
        "quantized_count": len(nf4_modules),
        "quantized_bytes": q_numel * NF4_BYTES_PER_WEIGHT,
        "plain_bytes": plain_numel * plain_dtype.itemsize,
        "plain_dtype": str(plain_dtype).split(".")[-1],
        "activation_peak": peak_where,
        "fused_head": fused_head,
        "lora_per_layer": per_layer_targets,
        "adapter": adapter,
        "lora_init": lora_init,
        "method_note": extra["note"],
        "allocator_bytes": extra["state"],
        "init_peak": (
            q_numel * NF4_BYTES_PER_WEIGHT
            + plain_numel * plain_dtype.itemsize
            + lora_params * 4
            + extra["init_transient"]
        )
        if extra["init_transient"]
        else 0,
        "advice": (
            "shorten max_length or the batch (activations grow with batch x max_length"
            + (", and the loss peak with the tokens" if not gradients else "")
            + (")" if checkpointing else "), or turn gradient_checkpointing on")
        ),
        "weight_advice": (
            "choose a smaller model or a larger budget"
            if quantized
            else "set quantization: nf4 to hold the base in 4 bits"
        ),
    }
    return MemoryEstimate(
        weights=q_numel * NF4_BYTES_PER_WEIGHT + plain_numel * plain_dtype.itemsize,
        lora=lora_params * 4,
        gradients=gradients,
        optimizer=lora_params * 8 + extra["state"],
        activations=activations,
        details=details,
    )


def _method_memory(
    adapter: str,
    lora_init: str,
    *,
    lora_r: int,
    lora_params: int,
    lora_in: list[int],
    lora_out: list[int],
    layers: int,
    tokens: int,
    act: int,
    biggest_target: int,
) -> dict[str, Any]:
    """What an adapter method adds to plain LoRA, from what PEFT allocates (modelled, not fitted):

    - DoRA: a magnitude vector per target (``out_features`` trainable values); each forward builds
      the layer's full weight plus ``B @ A`` in fp32 to take its row norms (one layer at a time),
      and keeps the base and LoRA outputs (``tokens x out_features`` each) for the rescaling's backward;
    - AdaLoRA: the singular values E (``r`` per target), and the rank allocator's three fp32
      copies of every adapter value (importance, its moving average and its uncertainty);
    - PiSSA / OLoRA / LoftQ: before training, the largest target weight in fp32 with its
      decomposition (about four copies of it), while the weights are already loaded;
    - rsLoRA, gaussian init and LoRA+ change numbers, not memory.
    """
    out: dict[str, Any] = {
        "params": 0,
        "state": 0,
        "layer_saved": 0,
        "layer_transient": 0,
        "init_transient": 0,
        "note": "",
    }
    if adapter == "dora":
        out["params"] = sum(lora_out)
        out["layer_saved"] = 2 * tokens * act * sum(lora_out) / max(layers, 1)
        out["layer_transient"] = biggest_target * (act + 8)
        out["note"] = "DoRA: magnitude vectors, one full fp32 weight per layer for its norm, two saved outputs"
    elif adapter == "adalora":
        out["params"] = lora_r * len(lora_in)
        out["state"] = (lora_params + out["params"]) * 4 * 3
        out["note"] = "AdaLoRA: singular values and the rank allocator's three fp32 copies of the adapter"
    if lora_init in ("pissa", "olora", "loftq"):
        out["init_transient"] = biggest_target * 4 * 4
        out["note"] = (
            out["note"] + "; " if out["note"] else ""
        ) + f"{lora_init} init: the largest target weight decomposed in fp32 before training"
    return out


def _linear_numel(module: Any) -> int:
    return module.in_features * module.out_features


def _layer_count(model: Any) -> int:
    cfg = model.config
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise FamtuneError(f"the config of {type(model).__name__} names no layer count; famtune estimate cannot size it")


def estimate_recipe(recipe: Any, *, seq_len: int | None = None) -> MemoryEstimate:
    """Open the recipe's model on the meta device and estimate its run."""
    import torch

    from famtune.checkpoint import model_load_kwargs, open_checkpoint, resolve_dtype
    from famtune.merge_stream import nf4_module_names

    ckpt = open_checkpoint(recipe.model, family=recipe.family, trust_remote_code=recipe.trust_remote_code)
    # "auto" means bf16 on an accelerator, which is what the estimate is for.
    compute = torch.bfloat16 if recipe.compute_dtype == "auto" else resolve_dtype(recipe.compute_dtype)
    model = meta_model(ckpt, compute)
    # Asked before the NF4 layers replace the linear ones (they cannot run on the meta device).
    fused_head = _frozen_head_is_fusable(model)
    nf4: set[str] = set()
    if recipe.quantization == "nf4":
        qconf = model_load_kwargs("nf4", str(compute).split(".")[-1], device=torch.device("cpu"))["quantization_config"]
        nf4 = nf4_module_names(model, qconf)
    if isinstance(recipe.lora_targets, str) and recipe.lora_targets in ("default", "all-linear"):
        targets = ckpt.family.lora_target_modules(model, recipe.lora_targets)
    else:
        targets = recipe.lora_targets if isinstance(recipe.lora_targets, list) else [recipe.lora_targets]
    return estimate_model(
        model,
        nf4,
        targets,
        seq_len=seq_len or recipe.max_length,
        batch=recipe.batch_size,
        checkpointing=recipe.gradient_checkpointing,
        compute_dtype=compute,
        lora_r=recipe.lora_r,
        lora_dropout=recipe.lora_dropout,
        name=recipe.model,
        adapter=getattr(recipe, "adapter", "lora"),
        lora_init=getattr(recipe, "lora_init", "default"),
        fused_head=fused_head,
    )


def _frozen_head_is_fusable(model: Any) -> bool:
    from famtune.loss import head_is_fusable

    for p in model.parameters():  # frozen as in training, where the fused loss requires it
        p.requires_grad_(False)
    return head_is_fusable(model)


def meta_model(ckpt: Any, dtype: Any) -> Any:
    """The model's module tree on the meta device, through the family's loader (which converts an
    original layout), or from config.json alone when the directory holds no weights."""
    try:
        return ckpt.load_skeleton(dtype)
    except Exception:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(ckpt.path, trust_remote_code=ckpt.trust_remote_code)
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            # from_config under init_empty_weights leaves a tied head as a second matrix, which
            # would be counted twice (a Gemma-2-2B config came out at 3.20 B parameters, not 2.61 B).
            model.tie_weights()
            return model
        except Exception as exc:
            raise FamtuneError(
                f"{ckpt.path}: cannot build the model from its config ({type(exc).__name__}: "
                f"{str(exc)[:160]}); give a checkpoint directory in the native layout"
            ) from None


class LiveTensorBytes:
    """Counts the bytes of tensor storages alive on the CPU, and their peak, while active.

    Every storage an operation creates is counted until it is freed; storages that existed before
    (the model, the optimizer state) are not. Use as a context manager around a training step.
    """

    def __init__(self, existing: list[Any] = ()) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter._see(out)
                return out

        self._mode = _Mode()
        self.live: dict[int, int] = {id(t.untyped_storage()): 0 for t in existing}
        self.current = 0
        self.peak = 0

    def _see(self, out: Any) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self.live:
                continue
            n = storage.nbytes()
            self.live[key] = n
            self.current += n
            # Storages keep their Python object while alive, so the finalizer runs when memory is freed.
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self) -> LiveTensorBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


def storage_bytes(tensors: list[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr() or id(s)] = s.nbytes()
    return sum(seen.values())


def measure_cpu_peak(
    model_dir: str,
    *,
    seq_len: int,
    batch: int,
    lora_r: int = 16,
    lora_dropout: float = 0.05,
    targets: str | list[str] = "all-linear",
    family: str | None = None,
) -> dict[str, float]:
    """Peak tensor bytes of a real QLoRA training step on the CPU (fp32 compute), set up the way
    ``famtune train`` sets it up; the second step is measured so the optimizer state exists."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from famtune.checkpoint import open_checkpoint
    from famtune.kernels import use_fast_lora_dropout
    from famtune.loss import causal_lm_loss

    ckpt = open_checkpoint(model_dir, family=family)
    model = ckpt.load_model("nf4", "fp32", device=torch.device("cpu"))
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    names = ckpt.family.lora_target_modules(model, targets) if isinstance(targets, str) else targets
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout, target_modules=names, task_type="CAUSAL_LM"
        ),
    )
    use_fast_lora_dropout(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    vocab = model.get_output_embeddings().out_features
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    batch_in = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    def step() -> None:
        causal_lm_loss(model, batch_in, batch * (seq_len - 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    existing = [
        *model.parameters(),
        *model.buffers(),
        *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    ]
    static = storage_bytes(existing)
    with LiveTensorBytes(existing) as live:
        step()
    return {"static": static, "dynamic": live.peak, "total": static + live.peak}


def per_device(est: MemoryEstimate, preset: str, nproc: int) -> MemoryEstimate:
    """The estimate on each of ``nproc`` devices under a ``distributed`` preset.

    Activations follow the per-device batch and do not change. ``ddp`` adds the gradient
    all-reduce buckets (one more copy of the LoRA gradients); ``zero2`` splits the optimizer state
    and gradients over the devices; ``zero3`` and ``fsdp`` split the weights and LoRA matrices too,
    plus the one decoder layer gathered whole while it computes (two with FSDP's prefetch).
    """
    import dataclasses

    from famtune.distributed import PRESETS

    if preset not in PRESETS:
        raise FamtuneError(f"distributed: {preset!r}; expected {', '.join(PRESETS)}")
    if nproc < 1:
        raise FamtuneError(f"--nproc {nproc}: expected at least 1 process")
    if nproc == 1:
        return est
    d = dict(est.details)
    layer = est.weights / max(d["layers"], 1)
    lora_grads = d["lora_params"] * 4
    if preset == "ddp":
        out = dataclasses.replace(est, gradients=est.gradients + lora_grads)
        why = "each device holds the whole model; + LoRA gradient buckets for the all-reduce"
    elif preset == "zero2":
        out = dataclasses.replace(est, gradients=lora_grads / nproc, optimizer=est.optimizer / nproc)
        why = f"optimizer state and gradients split over {nproc} devices"
    else:
        gathered = (2 if preset == "fsdp" else 1) * layer
        out = dataclasses.replace(
            est,
            weights=est.weights / nproc + gathered,
            lora=est.lora / nproc,
            gradients=lora_grads / nproc,
            optimizer=est.optimizer / nproc,
        )
        why = (
            f"weights, LoRA, gradients and optimizer state split over {nproc} devices, "
            f"+ {'two decoder layers' if preset == 'fsdp' else 'one decoder layer'} gathered whole"
        )
    d["sharding"] = f"{preset} on {nproc} processes: {why}"
    out.details = d
    return out
