"""Training recipes: a YAML file of keys, overridable from the command line.

Every key has a default here; unknown keys and wrongly typed values are errors that name the
file and the key. The resolved recipe is written beside the adapter so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from famtune.distributed import PRESETS as DISTRIBUTED_PRESETS
from famtune.errors import FamtuneError
from famtune.kernels import HALF_MATMUL_CHOICES
from famtune.validate import canonical_key, check_ranges


@dataclass
class Recipe:
    # what to train
    model: str = ""
    data: str = ""
    output_dir: str = "famtune-out"
    family: str | None = None  # force a family instead of the plugin's claim
    data_format: str = "auto"
    eval_data: str | None = None
    eval_split: float = 0.0  # fraction of `data` held out when `eval_data` is not given
    skip_bad_records: bool = False
    max_length: int = 1024
    masking: str | None = None  # None: the family's default policy
    system: str | None = None  # system prompt for samples that have none (None: the family's default)
    trust_remote_code: bool = False
    # QLoRA / LoRA
    quantization: str = "nf4"  # nf4 (QLoRA) or none (LoRA on the full-precision base)
    compute_dtype: str = "auto"
    # bf16/fp16 4-bit matmuls: auto runs them through fp32 kernels where the device only emulates
    # half precision (same products, fp32 accumulation, 4-5x faster there); native or fp32 force one
    half_matmul: str = "auto"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: Any = "default"  # "default", "all-linear" or a list of module names
    # adapter method (famtune.adapters; docs/users/adapters.md)
    adapter: str = "lora"  # lora, adalora or dora
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    lora_init: str = "default"  # default, pissa, olora, loftq (nf4 only) or gaussian
    loraplus_lr_ratio: float = 0.0  # LoRA+: the B matrices learn this many times faster (0: off)
    adalora_target_r: int = 0  # AdaLoRA's average final rank (0: half of lora_r)
    # optimisation
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0  # >0 overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    packing: Any = "auto"  # auto: pack where the family keeps packed samples apart; true: required; false: off
    seed: int = 42
    nan_policy: str = "stop"  # non-finite loss or gradient norm: stop the run, or skip_step (skip that update)
    # logging, evaluation, checkpoints
    logging_steps: int = 1
    eval_steps: int = 0  # 0: only at the end
    save_steps: int = 0  # 0: only at the end
    evaluation_inputs: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    progress: bool = True
    # several processes (famtune train --nproc N): ddp, or fsdp/zero2/zero3 sharding (docs/users/distributed.md)
    distributed: str = "ddp"
    report_to: list[str] = field(default_factory=list)  # experiment trackers (famtune.tracking)
    # a task scored on the base at step 0 and on the adapter at the end: {data: FILE, task: mcq|qa, ...}
    eval: Any = None

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, default: Any, where: str) -> Any:
    """Check a value against the default's type; strings from the command line are YAML-parsed."""
    if value is None:
        if default is None:  # the keys whose default is null may be set back to null
            return None
        raise FamtuneError(f"{where}: {name} is null; give a value (default {default!r})")
    if default is None:
        if isinstance(value, str) or (name == "eval" and isinstance(value, dict)):  # eval: checked by parse_eval_spec
            return value
        raise FamtuneError(f"{where}: {name} is {value!r} ({type(value).__name__}); expected a string or null")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if name == "lora_targets" and isinstance(value, list):
            return value
        if name == "packing" and isinstance(value, bool):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [value]
    else:
        return value
    raise FamtuneError(f"{where}: {name} is {value!r} ({type(value).__name__}); expected {type(default).__name__}")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs into a dict; values are parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise FamtuneError(f"unexpected argument {arg!r}; recipe overrides look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = "true"  # a bare flag turns a boolean on
            else:
                i += 1
                value = args[i]
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as exc:
            raise FamtuneError(
                f"command line: --{key} {value!r} is not a valid value "
                f"({getattr(exc, 'problem', None) or type(exc).__name__}); quote it"
            ) from None
        i += 1
    return out


def load_recipe(
    path: str | None, overrides: dict[str, Any] | None = None, *, overrides_from: str = "command line"
) -> Recipe:
    """The recipe in ``path`` (or none) with ``overrides`` applied; errors name ``overrides_from``
    as where an override came from."""
    import yaml

    raw: dict[str, Any] = {}
    where = overrides_from
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise FamtuneError(f"{path}: cannot read recipe ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise FamtuneError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line, always
            raise FamtuneError(f"{path}{line}: invalid YAML ({problem})") from None
        if not isinstance(raw, dict):
            raise FamtuneError(f"{path}: a recipe is a mapping of keys to values, got {type(raw).__name__}")
        # relative data/model paths are relative to the recipe file
        base = Path(path).resolve().parent
        for key in ("data", "eval_data", "model", "output_dir"):
            v = raw.get(key)
            if isinstance(v, str) and v and "\0" not in v and not Path(v).is_absolute() and (base / v).exists():
                raw[key] = str(base / v)
        ev = raw.get("eval")
        if isinstance(ev, dict) and isinstance(ev.get("data"), str) and (base / ev["data"]).exists():
            raw["eval"] = {**ev, "data": str(base / ev["data"])}
    defaults = Recipe()
    values: dict[str, Any] = {}
    known = set(Recipe.keys())
    for source, items in ((where, raw), (overrides_from, overrides or {})):
        given: dict[str, str] = {}
        for key, value in items.items():
            if not isinstance(key, str):
                raise FamtuneError(f"{source}: recipe key {key!r} is not a name; keys are words like lora_r")
            name = canonical_key(key, known, source)
            if name in given:
                raise FamtuneError(f"{source}: {given[name]} and {key} both set {name}; keep one")
            given[name] = key
            values[name] = _coerce(name, value, getattr(defaults, name), source)
    recipe = dataclasses.replace(defaults, **values)
    if not recipe.model:
        raise FamtuneError(f"{where}: no model given; set `model:` to a directory, Org/Name or modelscope:Org/Name")
    if not recipe.data:
        raise FamtuneError(f"{where}: no data given; set `data:` to a JSON or JSONL file")
    if recipe.quantization not in ("nf4", "none"):
        raise FamtuneError(f"{where}: quantization is {recipe.quantization!r}; expected nf4 or none")
    if recipe.half_matmul not in HALF_MATMUL_CHOICES:
        raise FamtuneError(f"{where}: half_matmul is {recipe.half_matmul!r}; expected {', '.join(HALF_MATMUL_CHOICES)}")
    if recipe.packing not in ("auto", True, False):
        raise FamtuneError(f"{where}: packing is {recipe.packing!r}; expected auto, true or false")
    if recipe.distributed not in DISTRIBUTED_PRESETS:
        raise FamtuneError(f"{where}: distributed is {recipe.distributed!r}; expected {', '.join(DISTRIBUTED_PRESETS)}")
    from famtune.evaluate.runner import parse_eval_spec

    recipe.eval = parse_eval_spec(recipe.eval, where)
    if not 0 <= recipe.eval_split < 1:
        raise FamtuneError(f"{where}: eval_split is {recipe.eval_split}; expected a fraction in [0, 1)")
    try:
        check_ranges(recipe)
    except FamtuneError as exc:
        raise FamtuneError(f"{where}: {exc}") from None
    from famtune.adapters import validate_adapter_recipe

    validate_adapter_recipe(recipe, where)
    return recipe
