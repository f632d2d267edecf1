"""famtune's entry point for the InternLM2 plugin: registration only."""
from __future__ import annotations

import famtune


@famtune.hookimpl
def famtune_register_families(register):
    from famtune_internlm2.family import InternLM2

    register(InternLM2())
