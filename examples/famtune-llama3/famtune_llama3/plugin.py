"""famtune's entry point for the Llama-3 plugin: registration only."""
from __future__ import annotations

import famtune


@famtune.hookimpl
def famtune_register_families(register):
    from famtune_llama3.family import Llama3

    register(Llama3())
