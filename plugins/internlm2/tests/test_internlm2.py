"""famtune-internlm2's own tests, run after installing it: ``pytest plugins/internlm2/tests``."""

from __future__ import annotations

pytest_plugins = ["famtune.testing"]


def test_famtune_finds_the_plugin_and_its_families_conform(famtune_discovery, famtune_conformance):
    famtune_discovery("internlm2", "famtune-internlm2", ["internlm2"])
    famtune_conformance("internlm2")
