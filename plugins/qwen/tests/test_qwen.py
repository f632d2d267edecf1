"""The plugin's own tests: famtune discovers it, and every family with a tiny model passes famtune's
conformance suite. Run with ``pytest plugins/qwen/tests`` after installing the plugin."""

from __future__ import annotations

pytest_plugins = ["famtune.testing"]


def test_famtune_discovers_the_plugin(famtune_discovery):
    famtune_discovery("qwen", "famtune-qwen", ["qwen1", "qwen2", "qwen2.5", "qwen3"])


def test_conformance(famtune_conformance):
    famtune_conformance("qwen")
