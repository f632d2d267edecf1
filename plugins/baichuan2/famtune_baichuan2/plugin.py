"""famtune's entry point for the Baichuan2 plugin: registration only."""
from __future__ import annotations

import famtune


@famtune.hookimpl
def famtune_register_families(register):
    from famtune_baichuan2.convert import FAMILIES
    from famtune_baichuan2.family import Baichuan2

    for name in FAMILIES:
        register(Baichuan2(name))
