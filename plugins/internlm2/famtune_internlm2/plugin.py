"""famtune's entry point for the InternLM2 plugin: registration only."""

from __future__ import annotations

import os

import famtune


@famtune.hookimpl
def famtune_register_families(register):
    from famtune_internlm2.family import InternLM2

    register(InternLM2())


@famtune.hookimpl
def famtune_recipe_dirs() -> list[str]:
    # Built-in recipes and their small data sets ship as package data beside this module.
    return [os.path.join(os.path.dirname(__file__), "recipes")]
