"""The plugin's own tests: famtune discovers it, and every family with a tiny model passes famtune's
conformance suite. Run with ``pytest plugins/baichuan2/tests`` after installing the plugin."""

from __future__ import annotations

pytest_plugins = ["famtune.testing"]


def test_famtune_discovers_the_plugin(famtune_discovery):
    famtune_discovery("baichuan2", "famtune-baichuan2", ["baichuan2-7b", "baichuan2-13b"])


def test_conformance(famtune_conformance):
    famtune_conformance("baichuan2")
