"""The plugin's own tests: famtune discovers it, and every family with a tiny model passes famtune's
conformance suite. Run with ``pytest plugins/chatglm/tests`` after installing the plugin."""

from __future__ import annotations

import json
import subprocess
import sys

pytest_plugins = ["famtune.testing"]


def test_famtune_discovers_the_plugin():
    out = subprocess.run(
        [sys.executable, "-m", "famtune.cli", "plugins", "--json"], capture_output=True, text=True, check=True
    )
    [me] = [p for p in json.loads(out.stdout)["plugins"] if p["name"] == "chatglm"]
    assert me["distribution"] == "famtune-chatglm" and me["families"] == ["chatglm3", "glm4"]
    assert me["hooks"] == ["famtune_recipe_dirs", "famtune_register_families"]


def test_conformance(famtune_conformance):
    famtune_conformance("chatglm")
