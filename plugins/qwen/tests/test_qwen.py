"""famtune-qwen's own tests, run after installing it: ``pytest plugins/qwen/tests``."""

from __future__ import annotations

pytest_plugins = ["famtune.testing"]


def test_famtune_finds_the_plugin_and_its_families_conform(famtune_discovery, famtune_conformance):
    famtune_discovery("qwen", "famtune-qwen", ["qwen1", "qwen2", "qwen2.5", "qwen3"])
    famtune_conformance("qwen")
