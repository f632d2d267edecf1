"""Shared fixtures: tiny checkpoints built at test time through the installed family plugins."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def famtune_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 900):
    """Run the famtune command as a user would, in a subprocess."""
    res = subprocess.run([sys.executable, "-m", "famtune.cli", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"famtune {' '.join(map(str, args))} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def build_tiny(family: str, out_dir: Path) -> Path:
    from famtune.demo import demo_corpus
    from famtune.plugins import get_plugins

    fam = get_plugins().claim({}, "", family=family)
    assert fam.tiny_checkpoint(str(out_dir), demo_corpus())
    return out_dir


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory) -> Path:
    return build_tiny("qwen2.5", tmp_path_factory.mktemp("tiny-qwen25"))
