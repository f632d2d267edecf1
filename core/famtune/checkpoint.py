"""Opening a checkpoint: find its files, let the one claiming plugin decide how to load them.

A model source is a local directory, a Hugging Face hub id (``Org/Name``) or a ModelScope id
(``modelscope:Org/Name``). Remote code never runs unless the user passed ``trust_remote_code``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError
from famtune.plugins import Family, get_plugins

MODELSCOPE_PREFIX = "modelscope:"


def resolve_source(spec: str) -> str:
    """A local directory holding the checkpoint named by ``spec``, downloading it if needed.

    Asks ``famtune_resolve_model_source`` (plugins first, famtune's own resolvers last).
    """
    return get_plugins().resolve_model_source(spec)


def resolve_builtin_source(spec: str) -> str:
    """famtune's own resolvers: a ModelScope id, a Hugging Face hub id, else an error."""
    if spec.startswith(MODELSCOPE_PREFIX):
        model_id = spec[len(MODELSCOPE_PREFIX):]
        try:
            from modelscope import snapshot_download
        except ImportError as exc:
            raise FamtuneError(f"{spec}: modelscope is not installed ({exc}); pip install modelscope") from exc
        import logging

        for name in ("modelscope", "modelscope_hub"):  # its retry chatter would bury our one-line error
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            return snapshot_download(model_id)
        except Exception as exc:
            raise FamtuneError(
                f"{spec}: could not fetch from ModelScope ({type(exc).__name__}: {str(exc)[:200]}); "
                "check the id and your network, or pass a local directory"
            ) from exc
    if spec.count("/") == 1 and not spec.startswith((".", "/")) and not os.path.exists(spec):
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(spec)
        except Exception as exc:
            raise FamtuneError(
                f"{spec}: not a local directory and the Hugging Face hub could not provide it "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                "check the id and your network, or pass a local directory"
            ) from exc
    raise FamtuneError(f"{spec}: no such model directory; pass a local directory, Org/Name or modelscope:Org/Name")


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

    def load_tokenizer(self) -> Any:
        tok = self.family.load_tokenizer(self.path, self.trust_remote_code)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
        return tok

    def load_model(self, quantization: str = "none", compute_dtype: str = "auto", device: Any = None) -> Any:
        """The model in eval mode. ``quantization`` is ``"nf4"`` (QLoRA base) or ``"none"``."""
        import torch

        kwargs = model_load_kwargs(quantization, compute_dtype, device)
        kwargs["trust_remote_code"] = self.trust_remote_code
        model = self.family.load_model(self.path, dict(kwargs))
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
        model.eval()
        torch.set_grad_enabled(True)
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
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise FamtuneError(f"unknown dtype {name!r}; expected auto, bf16, fp16 or fp32")
    return table[name]


def model_load_kwargs(quantization: str, compute_dtype: str, device: Any = None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a QLoRA (NF4, double quant) or plain base."""
    from transformers import BitsAndBytesConfig

    dtype = resolve_dtype(compute_dtype)
    dev = device if device is not None else default_device()
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": dev}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    elif quantization != "none":
        raise FamtuneError(f"unknown quantization {quantization!r}; expected nf4 or none")
    return kwargs
