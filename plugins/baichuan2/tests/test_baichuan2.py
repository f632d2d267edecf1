"""famtune-baichuan2's own tests, run after installing it: ``pytest plugins/baichuan2/tests``."""

from __future__ import annotations

pytest_plugins = ["famtune.testing"]


def test_famtune_finds_the_plugin_and_its_families_conform(famtune_discovery, famtune_conformance):
    famtune_discovery("baichuan2", "famtune-baichuan2", ["baichuan2-7b", "baichuan2-13b"])
    famtune_conformance("baichuan2")
