"""famtune's entry point for the Qwen plugin: registration only."""
from __future__ import annotations

import famtune


@famtune.hookimpl
def famtune_register_families(register):
    from famtune_qwen.family import families

    for family in families():
        register(family)
