"""The plugin's own tests: famtune discovers it, and every family with a tiny model passes famtune's
conformance suite. Run with ``pytest plugins/internlm2/tests`` after installing the plugin."""

from __future__ import annotations

pytest_plugins = ["famtune.testing"]


def test_famtune_discovers_the_plugin(famtune_discovery):
    famtune_discovery("internlm2", "famtune-internlm2", ["internlm2"])


def test_conformance(famtune_conformance):
    famtune_conformance("internlm2")
