"""famtune's conformance suite for family plugins, as an opt-in pytest plugin.

In a plugin's tests::

    pytest_plugins = ["famtune.testing"]

    def test_famtune_discovers_the_plugin(famtune_discovery):
        famtune_discovery("acme", "famtune-acme", ["acme-7b"])  # entry point, distribution, families

    def test_conformance(famtune_conformance):
        famtune_conformance("acme")  # the plugin's entry-point name; fails listing every problem

``famtune plugins check NAME`` runs the same suite from the command line.
"""

from __future__ import annotations

from famtune.testing.conformance import CONVERSATIONS, CheckResult, Report, check_plugin

__all__ = ["CONVERSATIONS", "CheckResult", "Report", "check_plugin", "assert_conformant", "assert_discovered"]


def assert_conformant(plugin_name: str, workdir, families: list[str] | None = None) -> Report:
    """Run the suite and raise ``AssertionError`` with the full report unless every check passed."""
    report = check_plugin(plugin_name, workdir, families=families)
    assert report.ok, report.text()
    return report


def assert_discovered(plugin_name: str, distribution: str, families: list[str]) -> dict:
    """``famtune plugins --json``, run in a fresh process as a user would, lists the plugin under its
    entry-point name, from ``distribution``, with exactly ``families`` and the registrar hook."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "famtune.cli", "plugins", "--json"], capture_output=True, text=True, check=True
    )
    listed = [p for p in json.loads(out.stdout)["plugins"] if p["name"] == plugin_name]
    assert len(listed) == 1, f"famtune lists {len(listed)} plugins named {plugin_name!r}"
    me = listed[0]
    assert (me["distribution"], me["families"]) == (distribution, families), me
    assert "famtune_register_families" in me["hooks"], me
    return me


try:
    import pytest
except ImportError:  # the CLI's `famtune plugins check` needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def famtune_conformance(tmp_path):
        """``famtune_conformance(plugin_name, families=None)``: run the suite, fail on any failed check."""

        def run(plugin_name: str, families: list[str] | None = None) -> Report:
            return assert_conformant(plugin_name, tmp_path / "conformance", families=families)

        return run

    @pytest.fixture
    def famtune_discovery():
        """``famtune_discovery(plugin_name, distribution, families)``: famtune finds the installed plugin."""
        return assert_discovered
