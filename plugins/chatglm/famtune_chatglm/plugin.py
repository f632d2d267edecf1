"""famtune's entry point for the ChatGLM plugin: registration only."""
from __future__ import annotations

import famtune


@famtune.hookimpl
def famtune_register_families(register):
    from famtune_chatglm.family import ChatGLM
    from famtune_chatglm.template import FAMILIES

    for name in FAMILIES:
        register(ChatGLM(name))
