"""A plugin written against the first contract (per-operation hooks) keeps working for one release:
installed from a wheel into a fresh target, it loads with a deprecation warning naming what to
change, and passes `famtune plugins check`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OLD_PLUGIN = Path(__file__).resolve().parent / "fixtures" / "famtune-oldllama"


def _famtune(target: Path, *args: str):
    env = {k: v for k, v in os.environ.items() if k != "FAMTUNE_LOAD_PLUGINS"}
    env["PYTHONPATH"] = str(target)  # entry points are discovered from sys.path
    return subprocess.run(
        [sys.executable, "-m", "famtune.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("old")
    src = root / "src"
    shutil.copytree(OLD_PLUGIN, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "wheels"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = (root / "wheels").glob("famtune_oldllama-0.1.0-*.whl")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(root / "site"),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return root / "site"


def test_old_plugin_loads_with_a_deprecation_warning(site):
    res = _famtune(site, "plugins", "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    [me] = [p for p in listed["plugins"] if p["name"] == "oldllama"]
    assert me["families"] == ["oldllama"] and "famtune_encode_conversation" in me["hooks"]
    assert listed["broken"] == []
    [warning] = [line for line in res.stderr.splitlines() if "oldllama" in line]
    assert warning.startswith(
        "famtune: warning: plugin 'oldllama' (famtune-oldllama 0.1.0) uses famtune's old plugin contract ("
    )
    assert "famtune_register_families" in warning and "docs/authors/migrating.md" in warning


def test_old_plugin_passes_famtune_plugins_check(site, tmp_path):
    res = _famtune(site, "plugins", "check", "oldllama", "--json", "--workdir", tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert (report["plugin"], report["distribution"], report["ok"]) == ("oldllama", "famtune-oldllama", True)
    assert [(r["check"], r["status"]) for r in report["results"]] == [
        ("claim", "pass"),
        ("template", "pass"),
        ("supervision", "pass"),
        ("stop ids", "pass"),
        ("targets", "pass"),
        ("qlora step", "pass"),
        ("merge", "pass"),
        ("packing", "pass"),
    ]
