"""A plugin written against the first contract (per-operation hooks) keeps working for one release:
installed from a wheel into a fresh target, it loads with a deprecation warning naming what to
change, and passes `famtune plugins check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plugin_sites import famtune_on, plugin_site

OLD_PLUGIN = Path(__file__).resolve().parent / "fixtures" / "famtune-oldllama"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return plugin_site(OLD_PLUGIN, tmp_path_factory.mktemp("old"), "famtune_oldllama-0.1.0-*.whl")


def test_old_plugin_loads_with_a_deprecation_warning(site):
    res = famtune_on(site, "plugins", "--json")
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
    res = famtune_on(site, "plugins", "check", "oldllama", "--json", "--workdir", tmp_path)
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
