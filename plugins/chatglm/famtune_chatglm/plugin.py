"""famtune's entry point for the ChatGLM plugin: registration only."""

from __future__ import annotations

import os

import famtune


@famtune.hookimpl
def famtune_register_families(register):
    from famtune_chatglm.family import ChatGLM
    from famtune_chatglm.template import FAMILIES

    for name in FAMILIES:
        register(ChatGLM(name))


@famtune.hookimpl
def famtune_recipe_dirs() -> list[str]:
    # Built-in recipes and their small data sets ship as package data beside this module.
    return [os.path.join(os.path.dirname(__file__), "recipes")]
