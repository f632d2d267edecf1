"""Opening a checkpoint: find its files, let the one claiming plugin decide how to load them.

A model source is a local directory, a Hugging Face hub id (``Org/Name``) or a ModelScope id
(``modelscope:Org/Name``). Remote code never runs unless the user passed ``trust_remote_code``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError
from famtune.plugins import Family, get_plugins
from famtune.quantization import bitsandbytes_config, nf4_config, use_nf4_kernel
from famtune.sources import MODELSCOPE_PREFIX  # noqa: F401  (public here since 0.1)


def resolve_source(spec: str) -> str:
    """A local directory holding the checkpoint named by ``spec``, downloading it if needed.

    Asks ``famtune_resolve_model_source``: plugins first, famtune's own resolvers
    (``famtune.sources``: local directory, Hugging Face, ModelScope) last.
    """
    return get_plugins().resolve_model_source(spec)


def read_json(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FamtuneError(f"{path}: not found; a checkpoint directory needs config.json") from None
    except json.JSONDecodeError as exc:
        raise FamtuneError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


@dataclass
class Checkpoint:
    """A resolved checkpoint directory, its config and the family plugin that claimed it."""

    spec: str
    path: str
    config: dict[str, Any]
    family: Family
    trust_remote_code: bool = False
    _top_token_id: int | None = field(default=None, repr=False, compare=False)

    def load_tokenizer(self) -> Any:
        tok = self.family.load_tokenizer(self.path, self.trust_remote_code)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        return tok

    def check_vocabulary(self, model: Any) -> None:
        """Every id the tokenizer can produce must have an embedding row; otherwise the first such
        token fails deep inside the model with an IndexError (or, on CUDA, a device-side assert)."""
        rows = model.get_input_embeddings().num_embeddings
        if self._top_token_id is None:
            tok = self.load_tokenizer()
            try:
                self._top_token_id = max(tok.get_vocab().values())
            except (AttributeError, NotImplementedError, ValueError):
                self._top_token_id = len(tok) - 1
        top = self._top_token_id
        if top >= rows:
            raise FamtuneError(
                f"{self.path}: the tokenizer has ids up to {top} but the model's embedding has only {rows} rows; "
                "the tokenizer files do not belong to these weights (copy the tokenizer the model was trained "
                "with, or resize the embeddings before training)"
            )

    def load_model(
        self,
        quantization: str = "none",
        compute_dtype: str = "auto",
        device: Any = None,
        quantization_config: dict[str, Any] | None = None,
    ) -> Any:
        """The model in eval mode. ``quantization`` is ``"nf4"`` (QLoRA base) or ``"none"``;
        ``quantization_config`` the exact 4-bit settings recorded in an adapter's famtune.json."""
        import torch

        if quantization_config:
            compute_dtype = quantization_config.get("bnb_4bit_compute_dtype", compute_dtype)
        kwargs = model_load_kwargs(quantization, compute_dtype, device, quantization_config)
        kwargs["trust_remote_code"] = self.trust_remote_code
        grad_enabled = torch.is_grad_enabled()
        try:
            model = self.family.load_model(self.path, dict(kwargs))
            if model is None:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
        finally:  # a loader must not change the caller's autograd mode
            torch.set_grad_enabled(grad_enabled)
        model.eval()
        if quantization == "nf4":
            use_nf4_kernel(model)
        return model

    def load_skeleton(self, dtype: Any) -> Any:
        """The model's module tree on the meta device: no weight is read or allocated. It comes
        through the family's loader, which converts an original layout into its cached native copy;
        the result's ``name_or_path`` is the directory whose safetensors hold its weights."""
        kwargs = {
            "dtype": dtype,
            "device_map": {"": "meta"},
            "trust_remote_code": self.trust_remote_code,
            "use_kernels": False,
        }
        model = self.family.load_model(self.path, dict(kwargs))
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
        return model


def open_checkpoint(spec: str, family: str | None = None, trust_remote_code: bool = False) -> Checkpoint:
    path = resolve_source(spec)
    config = read_json(Path(path) / "config.json")
    fam = get_plugins().claim(config, path, family=family)
    return Checkpoint(spec, path, config, fam, trust_remote_code)


def default_device():
    """CUDA when present, else CPU: the one code path runs on both."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if name not in table:
        raise FamtuneError(f"unknown dtype {name!r}; expected auto, bf16, fp16 or fp32")
    return table[name]


def model_load_kwargs(
    quantization: str, compute_dtype: str, device: Any = None, recorded: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a QLoRA (NF4, double quant) or plain base.
    ``recorded`` is the ``quantization_config`` of a famtune.json: the settings training used."""
    dtype = resolve_dtype(compute_dtype)
    dev = device if device is not None else default_device()
    # use_kernels=False: transformers (5.25+) otherwise swaps layers for kernels downloaded from the
    # hub, which is remote code the user did not ask for, and fails on the meta device.
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": dev}, "use_kernels": False}
    if quantization == "nf4":
        settings = dict(recorded) if recorded else nf4_config(str(dtype).removeprefix("torch."))
        kwargs["quantization_config"] = bitsandbytes_config(settings)
    elif quantization != "none":
        raise FamtuneError(f"unknown quantization {quantization!r}; expected nf4 or none")
    return kwargs
