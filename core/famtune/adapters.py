"""Adapter methods beyond plain LoRA, each through PEFT's own implementation.

The recipe chooses the adapter (``adapter: lora | adalora | dora``), rank-stabilised scaling
(``rslora``), the initialisation (``lora_init: default | pissa | olora | loftq | gaussian``) and
LoRA+ (``loraplus_lr_ratio``). ``AdapterRun`` builds the PEFT model and optimizer for one training
run and does what a method needs around the training loop:

- **AdaLoRA**: the schedule (``tinit``, ``tfinal``, ``deltaT``, ``total_step``) is derived from the
  run's real optimizer-step count; ``update_and_allocate`` runs after every optimizer step with
  the 0-based index of that step; the rank allocator's importance averages and the current rank
  pattern are saved with every checkpoint (with the adapter weights unpruned, so pruned triplets
  can still come back) and restored on ``--resume``. The final adapter is pruned to the final
  rank pattern, which its ``adapter_config.json`` records, so PEFT reloads it. famtune's loss
  never hands labels to the model, so the orthogonal regulariser, which PEFT adds to a model
  output's ``loss``, gets a zero loss to add to and is read back from there.
- **PiSSA / OLoRA** move the principal part of each target weight into the adapter and train the
  residual base. On an NF4 base famtune dequantizes each target weight, lets PEFT initialise it
  and re-quantizes the residual (QPiSSA; PEFT does this itself for OLoRA). The adapter famtune
  writes is PEFT's conversion to a plain LoRA delta against the unmodified base
  (``path_initial_model_for_weight_conversion``, rank 2r), so merge and chat need no residual base.
- **LoftQ** needs an NF4 base: PEFT's ``replace_lora_weights_loftq`` sets A and B so that
  NF4(W) + BA approximates W, reading W from the base's safetensors.
- **LoRA+**: PEFT's ``create_loraplus_optimizer`` puts the B matrices in groups with
  ``ratio x learning_rate``; the group split is saved with every checkpoint and checked on resume.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError

ADAPTERS = ("lora", "adalora", "dora")
LORA_INITS = ("default", "pissa", "olora", "loftq", "gaussian")
# Inits that rewrite the base weights; the saved adapter is converted back to a plain LoRA delta.
BASE_REWRITING_INITS = ("pissa", "olora")
STATE_FILE = "adapter_state.json"
ALLOCATOR_FILE = "adalora_allocator.safetensors"
INITIAL_ADAPTER = "initial-adapter"  # under OUTPUT/checkpoints: the adapter before training
ADAPTER_NAME = "default"


def validate_adapter_recipe(recipe: Any, where: str = "recipe") -> None:
    """One-line errors for adapter keys that are unknown or that PEFT cannot combine."""
    r = recipe
    if r.adapter not in ADAPTERS:
        raise FamtuneError(f"{where}: adapter is {r.adapter!r}; expected one of {', '.join(ADAPTERS)}")
    if r.lora_init not in LORA_INITS:
        raise FamtuneError(f"{where}: lora_init is {r.lora_init!r}; expected one of {', '.join(LORA_INITS)}")
    if r.loraplus_lr_ratio < 0 or 0 < r.loraplus_lr_ratio < 1:
        raise FamtuneError(
            f"{where}: loraplus_lr_ratio is {r.loraplus_lr_ratio}; expected 0 (off) or a ratio >= 1 "
            "(the LoRA+ paper uses 16)"
        )
    if r.lora_r < 1:
        raise FamtuneError(f"{where}: lora_r is {r.lora_r}; expected a rank >= 1")
    if r.adapter == "adalora":
        if r.rslora:
            raise FamtuneError(
                f"{where}: rslora: true does not apply to adapter: adalora (AdaLoRA scales by its "
                "own rank count); set rslora: false"
            )
        if r.lora_init != "default":
            raise FamtuneError(
                f"{where}: lora_init: {r.lora_init} does not apply to adapter: adalora (AdaLoRA "
                "initialises its own SVD triplets); set lora_init: default"
            )
        if not 0 < adalora_target_r(r) <= r.lora_r:
            raise FamtuneError(
                f"{where}: adalora_target_r is {r.adalora_target_r}; expected 1..lora_r "
                f"({r.lora_r}), the average rank AdaLoRA prunes down to (0: half of lora_r)"
            )
    elif r.adalora_target_r:
        raise FamtuneError(
            f"{where}: adalora_target_r is set but adapter is {r.adapter}; "
            "set adapter: adalora or remove adalora_target_r"
        )
    if r.adapter == "dora" and r.lora_init in ("pissa", "olora", "loftq"):
        raise FamtuneError(
            f"{where}: lora_init: {r.lora_init} cannot be combined with adapter: dora (PEFT "
            "converts and LoftQ-initialises plain LoRA only); use adapter: lora or lora_init: default"
        )
    if r.lora_init == "loftq" and r.quantization != "nf4":
        raise FamtuneError(
            f"{where}: lora_init: loftq initialises LoRA to cancel the NF4 quantization error and "
            "needs quantization: nf4; use lora_init: pissa or default on a full-precision base"
        )


def adalora_target_r(recipe: Any) -> int:
    return recipe.adalora_target_r or max(1, recipe.lora_r // 2)


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """AdaLoRA's phases from the run's optimizer-step count: 10% warm-up at full rank, the budget
    shrinking (cubically, as in the paper) over the next 70% in about ten reallocations, and the
    last 20% (at least one step, where the final pattern is fixed) at the final ranks."""
    if total_steps < 2:
        raise FamtuneError(
            f"adapter: adalora needs at least 2 optimizer steps to allocate ranks; this run has "
            f"{total_steps}; raise max_steps or epochs, or use adapter: lora"
        )
    tinit = total_steps // 10
    tfinal = max(1, total_steps // 5)
    deltaT = max(1, (total_steps - tinit - tfinal) // 10)
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": deltaT, "total_step": total_steps}


def describe(recipe: Any) -> str:
    r = recipe
    if r.adapter == "adalora":
        head = f"adalora r={r.lora_r}->{adalora_target_r(r)} alpha={r.lora_alpha}"
    else:
        head = f"{r.adapter} r={r.lora_r} alpha={r.lora_alpha}"
    extras = (
        (["rsLoRA"] if r.rslora else [])
        + ([f"init {r.lora_init}"] if r.lora_init != "default" else [])
        + ([f"LoRA+ x{r.loraplus_lr_ratio:g}"] if r.loraplus_lr_ratio else [])
    )
    return head + (f" ({', '.join(extras)})" if extras else "")


def adapter_settings(recipe: Any) -> dict[str, Any]:
    """What ``famtune.json`` records about the adapter method (merge, chat and compare read it)."""
    r = recipe
    out = {
        "method": r.adapter,
        "r": r.lora_r,
        "alpha": r.lora_alpha,
        "rslora": r.rslora,
        "init": r.lora_init,
        "loraplus_lr_ratio": r.loraplus_lr_ratio,
    }
    if r.adapter == "adalora":
        out["target_r"] = adalora_target_r(r)
    if r.lora_init in BASE_REWRITING_INITS:
        out["converted_to_lora"] = True  # the saved adapter is a plain LoRA delta against the original base
    return out


def peft_config(recipe: Any, targets: list[str], total_steps: int, quantized: bool) -> Any:
    from peft import AdaLoraConfig, LoraConfig

    r = recipe
    common: dict[str, Any] = dict(
        lora_alpha=r.lora_alpha, lora_dropout=r.lora_dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    if r.adapter == "adalora":
        phases = adalora_schedule(total_steps)
        return AdaLoraConfig(
            init_r=r.lora_r,
            target_r=adalora_target_r(r),
            tinit=phases["tinit"],
            tfinal=phases["tfinal"],
            deltaT=phases["deltaT"],
            total_step=phases["total_step"],
            **common,
        )
    init: Any = True
    if r.lora_init == "gaussian" or r.lora_init == "olora":
        init = r.lora_init
    elif r.lora_init == "pissa" and not quantized:
        init = "pissa"  # exact SVD: deterministic, so --resume rebuilds the same residual base
    # pissa on NF4 and loftq start from PEFT's default init and are initialised after wrapping
    return LoraConfig(r=r.lora_r, use_rslora=r.rslora, use_dora=r.adapter == "dora", init_lora_weights=init, **common)


def _pissa_on_4bit(layer: Any) -> None:
    """PiSSA on an NF4 layer: dequantize, let PEFT split off the principal part, re-quantize the residual."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    base = layer.get_base_layer()
    packed = base.weight
    dense = dequantize_module_weight(base).to(torch.float32)
    base.weight = torch.nn.Parameter(dense, requires_grad=False)
    layer.pissa_init(ADAPTER_NAME, "pissa")
    residual = base.weight.data.to(getattr(base, "compute_dtype", None) or torch.float32)
    base.weight = packed.__class__(
        residual,
        requires_grad=False,
        blocksize=packed.blocksize,
        compress_statistics=packed.compress_statistics,
        quant_type=packed.quant_type,
        quant_storage=packed.quant_storage,
        module=base,
    ).to(packed.device)


class AdapterRun:
    """The adapter of one training run: built from the recipe, its optimizer, its per-step work and
    its state in checkpoints."""

    def __init__(self, recipe: Any, total_steps: int, out: Path, log=print) -> None:
        validate_adapter_recipe(recipe)
        self.recipe, self.total_steps, self.out, self.log = recipe, total_steps, Path(out), log
        self.groups: list[dict[str, Any]] = []
        self._regulariser: Any = None

    @property
    def initial_dir(self) -> Path:
        return self.out / "checkpoints" / INITIAL_ADAPTER

    # -- building --------------------------------------------------------------------------------
    def attach(self, model: Any, targets: list[str], quantized: bool, is_main: bool = True) -> Any:
        """``model`` wrapped in the recipe's PEFT adapter, initialised as the recipe asks."""
        from peft import get_peft_model

        r = self.recipe
        config = peft_config(r, targets, self.total_steps, quantized)
        native_dir = str(getattr(model, "name_or_path", "") or "")
        try:
            model = get_peft_model(model, config)
        except (TypeError, ValueError) as exc:
            raise FamtuneError(
                f"recipe adapter: PEFT cannot build {describe(r)} on this model ({str(exc).splitlines()[0][:200]})"
            ) from None
        if r.lora_init == "pissa" and quantized:
            from peft.tuners.lora import LoraLayer

            for module in model.modules():
                if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
                    _pissa_on_4bit(module)
            model.peft_config[ADAPTER_NAME].init_lora_weights = "pissa"
        elif r.lora_init == "loftq":
            import torch
            from peft import replace_lora_weights_loftq

            if not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())):
                # peft 0.21.2 moves W to a hard-coded "cuda" (or "xpu") in both of its LoftQ entry
                # points: peft/utils/loftq_utils.py lines 70-72 (loftq_init, behind LoraConfig's
                # init_lora_weights="loftq") and 112-115 (_loftq_init_new, behind
                # replace_lora_weights_loftq); its CPU quantizer was removed in PEFT 0.20.
                raise FamtuneError(
                    "lora_init: loftq runs PEFT's LoftQ, which computes on a CUDA or XPU device and "
                    "none is present; use lora_init: default or pissa on this machine"
                )
            if not list(Path(native_dir).glob("*.safetensors")):
                raise FamtuneError(
                    f"lora_init: loftq reads the original weights from safetensors, and {native_dir} "
                    "has none; convert the base to safetensors or use lora_init: default"
                )
            replace_lora_weights_loftq(model, model_path=native_dir)
        if r.lora_init in BASE_REWRITING_INITS and is_main:
            self._save_initial(model)
        if r.adapter == "adalora":
            self._capture_orthogonal_regulariser(model)
        return model

    def _save_initial(self, model: Any) -> None:
        # PEFT's conversion on save needs the adapter as it was before training, marked as a plain
        # init so that loading it does not rewrite the base a second time.
        cfg = model.peft_config[ADAPTER_NAME]
        init, cfg.init_lora_weights = cfg.init_lora_weights, True
        try:
            model.save_pretrained(str(self.initial_dir))
        finally:
            cfg.init_lora_weights = init

    def _capture_orthogonal_regulariser(self, model: Any) -> None:
        import torch

        inner = model.base_model.model
        plain_forward = inner.forward

        def forward_with_loss_slot(*args, **kwargs):
            out = plain_forward(*args, **kwargs)
            if inner.training and torch.is_grad_enabled() and getattr(out, "loss", None) is None:
                out["loss"] = torch.zeros((), device=next(inner.parameters()).device)
            return out

        inner.forward = forward_with_loss_slot  # AdaLoraModel.forward calls inner.forward directly

        def keep(module, args, output):
            loss = getattr(output, "loss", None)
            self._regulariser = loss if torch.is_tensor(loss) and loss.requires_grad else None

        model.base_model.register_forward_hook(keep)

    def take_regulariser(self) -> Any:
        """The orthogonal regulariser AdaLoRA added in the last training forward (None otherwise)."""
        reg, self._regulariser = self._regulariser, None
        return reg

    def optimizer(self, model: Any) -> Any:
        import torch

        r = self.recipe
        if r.loraplus_lr_ratio:
            from peft.optimizers import create_loraplus_optimizer

            opt = create_loraplus_optimizer(
                model,
                torch.optim.AdamW,
                lr=r.learning_rate,
                loraplus_lr_ratio=r.loraplus_lr_ratio,
                loraplus_weight_decay=r.weight_decay,
            )
            names = {id(p): n for n, p in model.named_parameters()}
            labels = ("A", "embedding", "B", "B_no_decay")
            self.groups = [
                {
                    "group": labels[i] if len(opt.param_groups) == len(labels) else str(i),
                    "lr": g["lr"],
                    "params": [names[id(p)] for p in g["params"]],
                }
                for i, g in enumerate(opt.param_groups)
            ]
            sizes = ", ".join(
                f"{g['group']}: {len(g['params'])} at lr {g['lr']:.3g}" for g in self.groups if g["params"]
            )
            self.log(f"LoRA+: optimizer groups {sizes}")
            return opt
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.groups = [{"group": "all", "lr": r.learning_rate, "params": [n for n, _ in trainable]}]
        return torch.optim.AdamW([p for _, p in trainable], lr=r.learning_rate, weight_decay=r.weight_decay)

    # -- during training ---------------------------------------------------------------------------
    def after_optimizer_step(self, model: Any, step_index: int) -> None:
        """Per-step work after ``optimizer.step()`` and before the gradients are cleared;
        ``step_index`` is the 0-based index of the optimizer step just taken."""
        if self.recipe.adapter == "adalora":
            model.base_model.update_and_allocate(step_index)

    def rank_pattern(self, model: Any) -> dict[str, list[bool]] | None:
        if self.recipe.adapter != "adalora":
            return None
        return model.peft_config[ADAPTER_NAME].rank_pattern

    @contextlib.contextmanager
    def saving_checkpoint(self, model: Any):
        """A checkpoint keeps AdaLoRA's triplets unpruned (PEFT would cut them to the current
        pattern), since a pruned triplet can return before the final allocation."""
        cfg = model.peft_config[ADAPTER_NAME]
        pattern = getattr(cfg, "rank_pattern", None)
        if self.recipe.adapter == "adalora":
            cfg.rank_pattern = None
        try:
            yield
        finally:
            if self.recipe.adapter == "adalora":
                cfg.rank_pattern = pattern

    def save_state(self, ckpt_dir: Path, model: Any) -> None:
        """Write the adapter's own resumable state into a checkpoint directory."""
        state: dict[str, Any] = {"adapter": adapter_settings(self.recipe), "optimizer_groups": self.groups}
        if self.recipe.adapter == "adalora":
            from safetensors.torch import save_file

            cfg = model.peft_config[ADAPTER_NAME]
            allocator = model.base_model.rankallocator
            state["adalora"] = {
                "schedule": {k: getattr(cfg, k) for k in ("tinit", "tfinal", "deltaT", "total_step")},
                "rank_pattern": _plain_pattern(cfg.rank_pattern),
            }
            tensors = {
                f"{kind}/{name}": t.detach().contiguous().cpu()
                for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
                for name, t in getattr(allocator, kind).items()
            }
            save_file(tensors, str(Path(ckpt_dir, ALLOCATOR_FILE)))
        Path(ckpt_dir, STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")

    def check_resume(self, ckpt_dir: Path) -> None:
        """Before the optimizer state is loaded: the checkpoint was written by the same adapter method."""
        path = Path(ckpt_dir, STATE_FILE)
        needs_state = self.recipe.adapter == "adalora" or bool(self.recipe.loraplus_lr_ratio)
        if needs_state and not path.exists():
            raise FamtuneError(
                f"{ckpt_dir}: no {STATE_FILE}, which {describe(self.recipe)} needs to resume (a checkpoint "
                "of a plain LoRA run, or one whose save was cut short); resume from another checkpoint "
                "with --resume PATH or start a new output_dir"
            )
        saved: dict[str, Any] = (
            json.loads(path.read_text(encoding="utf-8"))
            if path.exists()
            else {"adapter": {"method": "lora", "init": "default", "rslora": False, "loraplus_lr_ratio": 0.0}}
        )
        now = adapter_settings(self.recipe)
        changed = [
            k
            for k in ("method", "r", "rslora", "init", "loraplus_lr_ratio", "target_r")
            if k in saved["adapter"] and saved["adapter"].get(k) != now.get(k)
        ]
        if changed:
            was = ", ".join(f"{k} {saved['adapter'].get(k)!r}" for k in changed)
            raise FamtuneError(
                f"{ckpt_dir}: this checkpoint was trained with {was}; the recipe now says "
                + ", ".join(f"{k} {now.get(k)!r}" for k in changed)
                + "; resume with the recipe it was trained with, or start a new output_dir"
            )
        if "optimizer_groups" in saved:
            split = [(g["group"], g["params"]) for g in saved["optimizer_groups"]]
            if split != [(g["group"], g["params"]) for g in self.groups]:
                raise FamtuneError(
                    f"{ckpt_dir}: the optimizer's parameter groups differ from the checkpoint's "
                    "(different targets or LoRA+ setting); resume with the recipe it was trained with"
                )
        if self.recipe.adapter == "adalora":
            want = adalora_schedule(self.total_steps)
            if saved.get("adalora", {}).get("schedule") != want:
                raise FamtuneError(
                    f"{ckpt_dir}: AdaLoRA's schedule was {saved.get('adalora', {}).get('schedule')} "
                    f"but this run's step count gives {want}; resume with the same max_steps, epochs, "
                    "batch_size and data"
                )

    def restore(self, ckpt_dir: Path, model: Any) -> None:
        """After the adapter weights are loaded: AdaLoRA's allocator state and current rank pattern."""
        if self.recipe.adapter != "adalora":
            return
        from safetensors.torch import load_file

        saved = json.loads(Path(ckpt_dir, STATE_FILE).read_text(encoding="utf-8"))["adalora"]
        model.peft_config[ADAPTER_NAME].rank_pattern = saved["rank_pattern"]
        allocator = model.base_model.rankallocator
        allocator.reset_ipt()
        device = next(p for p in model.parameters() if p.requires_grad).device
        for key, tensor in load_file(str(Path(ckpt_dir, ALLOCATOR_FILE))).items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = tensor.to(device)

    # -- the final adapter -------------------------------------------------------------------------
    def save_final(self, model: Any, out: Path) -> None:
        if self.recipe.lora_init in BASE_REWRITING_INITS:
            model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(self.initial_dir))
        else:
            model.save_pretrained(str(out))  # AdaLoRA: pruned to the final rank pattern, which the config records


# Names ``famtune compare --adapters`` accepts, joined with "+" (e.g. dora+rslora), as recipe keys.
METHOD_KEYS: dict[str, dict[str, Any]] = {
    "lora": {"adapter": "lora"},
    "dora": {"adapter": "dora"},
    "adalora": {"adapter": "adalora"},
    "rslora": {"rslora": True},
    "loraplus": {"loraplus_lr_ratio": 16.0},
    **{init: {"lora_init": init} for init in LORA_INITS if init != "default"},
}


def method_overrides(name: str) -> dict[str, Any]:
    """Recipe keys of a method name such as ``dora`` or ``lora+pissa+loraplus``."""
    keys: dict[str, Any] = {}
    for part in name.strip().lower().split("+"):
        if part not in METHOD_KEYS:
            raise FamtuneError(
                f"adapter method {name!r}: {part!r} is not one of {', '.join(METHOD_KEYS)} "
                "(join several with +, e.g. dora+rslora)"
            )
        keys.update(METHOD_KEYS[part])
    return keys


def _plain_pattern(pattern: dict[str, Any] | None) -> dict[str, list[bool]] | None:
    if pattern is None:
        return None
    return {k: [bool(x) for x in v] for k, v in pattern.items()}


def rank_distribution(pattern: dict[str, list[bool]] | None) -> dict[str, int]:
    """Module -> kept rank, from an AdaLoRA rank pattern."""
    return {k: int(sum(v)) for k, v in (pattern or {}).items()}


def method_of(meta: dict[str, Any] | None, adapter_config: dict[str, Any] | None = None) -> str:
    """A short name of an adapter's method for reports: from famtune.json, else from adapter_config.json."""
    if meta and isinstance(meta.get("adapter"), dict):
        a: dict[str, Any] = meta["adapter"]
        extras = (
            (["rslora"] if a.get("rslora") else [])
            + ([a["init"]] if a.get("init") not in (None, "default") else [])
            + (["lora+"] if a.get("loraplus_lr_ratio") else [])
        )
        return "+".join([a.get("method", "lora"), *extras])
    if adapter_config:
        if adapter_config.get("peft_type") == "ADALORA":
            return "adalora"
        return "dora" if adapter_config.get("use_dora") else "lora"
    return "lora"


def mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else math.nan
