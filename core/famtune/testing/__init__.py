"""famtune's conformance suite for family plugins, as an opt-in pytest plugin.

In a plugin's tests::

    pytest_plugins = ["famtune.testing"]

    def test_conformance(famtune_conformance):
        famtune_conformance("acme")  # the plugin's entry-point name; fails listing every problem

``famtune plugins check NAME`` runs the same suite from the command line.
"""

from __future__ import annotations

from famtune.testing.conformance import CONVERSATIONS, CheckResult, Report, check_plugin

__all__ = ["CONVERSATIONS", "CheckResult", "Report", "check_plugin", "assert_conformant"]


def assert_conformant(plugin_name: str, workdir, families: list[str] | None = None) -> Report:
    """Run the suite and raise ``AssertionError`` with the full report unless every check passed."""
    report = check_plugin(plugin_name, workdir, families=families)
    assert report.ok, report.text()
    return report


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
