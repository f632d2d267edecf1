"""``famtune env``: what a bug report needs (versions, plugins, device, bitsandbytes backend) and
warnings about combinations known not to work.

``collect_env`` gathers plain data; ``known_problems`` judges it. They are separate so every rule
can be tested on the data it reads, and ``--json`` prints exactly what the rules saw.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import famtune

LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "huggingface_hub",
    "tokenizers",
    "safetensors",
    "pluggy",
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _requirements() -> dict[str, str]:
    """famtune's own lower bounds, as its installed metadata declares them (extras excluded)."""
    from packaging.requirements import Requirement

    out = {}
    for line in metadata.requires("famtune") or []:
        req = Requirement(line)
        if req.marker is None:
            out[req.name.lower().replace("_", "-")] = str(req.specifier)
    return out


def _device() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    if info["cuda_available"]:
        major, minor = torch.cuda.get_device_capability(0)
        info.update(
            device=f"cuda:0 ({torch.cuda.get_device_name(0)})",
            cuda_devices=torch.cuda.device_count(),
            capability=f"{major}.{minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return info


def _bitsandbytes() -> dict[str, Any]:
    try:
        from bitsandbytes import cextension
    except Exception as exc:  # a broken install must still let `famtune env` report it
        return {"error": f"{type(exc).__name__}: {exc}"}
    lib = getattr(cextension, "lib", None)
    return {"backend": getattr(cextension, "BNB_BACKEND", None), "library": getattr(lib, "_name", None)}


def collect_env() -> dict[str, Any]:
    from famtune.plugins import get_plugins

    plugins = get_plugins()
    return {
        "famtune": famtune.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {lib: _version(lib) for lib in LIBRARIES},
        "requirements": _requirements(),
        "plugins": [
            {"name": n, "distribution": i.distribution, "version": i.version, "families": plugins.families_of(n)}
            for n, i in plugins.infos.items()
        ],
        "broken_plugins": [{"name": b.info.name, "error": b.error} for b in plugins.broken],
        "device": _device(),
        "bitsandbytes": _bitsandbytes(),
    }


def known_problems(env: dict[str, Any]) -> list[str]:
    """Warnings for combinations that are known to fail or to be silently slow."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    out = []
    libs = {k.lower().replace("_", "-"): v for k, v in env["libraries"].items()}
    for name, spec in env.get("requirements", {}).items():
        have = libs.get(name)
        if have is None or not spec:
            continue
        try:
            ok = Version(have) in SpecifierSet(spec)
        except InvalidVersion:
            continue
        if not ok:
            out.append(f"{name} {have} is outside what famtune requires ({spec}); pip install '{name}{spec}'")
    device, bnb = env["device"], env["bitsandbytes"]
    if "error" in bnb:
        out.append(
            f"bitsandbytes does not import ({bnb['error']}); QLoRA (quantization: nf4) cannot run; "
            "reinstall bitsandbytes or use quantization: none"
        )
    elif device.get("cuda_available") and str(bnb.get("backend") or "").upper() == "CPU":
        out.append(
            "CUDA is available but bitsandbytes loaded its CPU library "
            f"({bnb.get('library')}); NF4 layers would not run on the GPU; reinstall bitsandbytes for "
            f"CUDA {device.get('torch_cuda')}"
        )
    if device.get("cuda_available") and device.get("bf16_supported") is False:
        out.append(
            f"this GPU (compute capability {device.get('capability')}) has no bf16; compute_dtype: auto "
            "picks fp16, and an explicit compute_dtype: bf16 runs emulated and slowly"
        )
    if not device.get("cuda_available") and device.get("torch_cuda"):
        out.append(
            f"torch is built for CUDA {device['torch_cuda']} but sees no GPU; training runs on the CPU "
            "(check the driver and CUDA_VISIBLE_DEVICES)"
        )
    for b in env.get("broken_plugins", []):
        out.append(f"plugin {b['name']} is disabled: {b['error']}")
    if not env.get("plugins"):
        out.append(
            "no family plugin is loaded; no model can be trained (pip install famtune-<family>, or check "
            "FAMTUNE_LOAD_PLUGINS)"
        )
    return out


def env_lines(env: dict[str, Any]) -> list[str]:
    lines = [f"famtune {env['famtune']}, Python {env['python']}, {env['platform']}"]
    lines += [f"  {lib:<16} {v or 'not installed'}" for lib, v in env["libraries"].items()]
    lines.append("plugins:")
    lines += [
        f"  {p['name']:<16} {p['distribution']} {p['version']}: {', '.join(p['families'])}" for p in env["plugins"]
    ] or ["  none"]
    device, bnb = env["device"], env["bitsandbytes"]
    lines.append(
        f"device: {device['device']}"
        + (f", torch CUDA {device['torch_cuda']}" if device["torch_cuda"] else ", torch CPU build")
    )
    if "error" in bnb:
        lines.append(f"bitsandbytes: does not import: {bnb['error']}")
    else:
        lines.append(f"bitsandbytes: {bnb['backend']} backend, {bnb['library']}")
    problems = known_problems(env)
    lines += [f"warning: {p}" for p in problems] or ["no known problems"]
    return lines
