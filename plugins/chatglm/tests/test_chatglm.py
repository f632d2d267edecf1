"""The plugin's own tests: famtune discovers it, and every family with a tiny model passes famtune's
conformance suite. Run with ``pytest plugins/chatglm/tests`` after installing the plugin."""

from __future__ import annotations

pytest_plugins = ["famtune.testing"]


def test_famtune_discovers_the_plugin(famtune_discovery):
    famtune_discovery("chatglm", "famtune-chatglm", ["chatglm3", "glm4"])


def test_conformance(famtune_conformance):
    famtune_conformance("chatglm")
