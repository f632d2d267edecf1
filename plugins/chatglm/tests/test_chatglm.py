"""famtune-chatglm's own tests, run after installing it: ``pytest plugins/chatglm/tests``."""

from __future__ import annotations

pytest_plugins = ["famtune.testing"]


def test_famtune_finds_the_plugin_and_its_families_conform(famtune_discovery, famtune_conformance):
    famtune_discovery("chatglm", "famtune-chatglm", ["chatglm3", "glm4"])
    famtune_conformance("chatglm")
