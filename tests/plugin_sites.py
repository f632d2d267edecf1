"""Test helpers: plugins built into wheels and installed into a folder of their own, and the famtune
command run with that folder on its path, as a user who pip-installed them would run it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def build_wheels(wheels: Path, *sources: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
        + [str(s) for s in sources],
        check=True,
        capture_output=True,
    )
    return wheels


def install_wheels(target: Path, *wheels: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target)]
        + [str(w) for w in wheels],
        check=True,
        capture_output=True,
    )
    return target


def plugin_site(source: Path, root: Path, wheel_glob: str) -> Path:
    """``source`` (a plugin's project folder) built from a copy, so the build leaves nothing in
    the source tree, and installed into ``root/site``."""
    src = root / "src"
    shutil.copytree(source, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    [wheel] = build_wheels(root / "wheels", src).glob(wheel_glob)
    return install_wheels(root / "site", wheel)


def plugin_env(target: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment with ``target`` as the place entry points are discovered (sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "FAMTUNE_LOAD_PLUGINS"}
    if target is not None:
        env["PYTHONPATH"] = str(target)
    env.update(extra)
    return env


def famtune_on(target: Path | None, *args: str, python: str = sys.executable, **extra: str):
    return subprocess.run(
        [python, "-m", "famtune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=plugin_env(target, **extra),
        timeout=600,
    )
