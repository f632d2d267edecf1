"""famtune: QLoRA fine-tuning of chat LLMs, with every family-specific decision in a plugin.

The stable Python API is ``famtune.api``, re-exported here (docs/users/python-api.md).
"""

from __future__ import annotations

import pluggy

from famtune.api import Model, fine_tune, generate, load_chat, make_recipe, merge_adapter, open_model, tiny_model

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@famtune.hookimpl``.
hookimpl = pluggy.HookimplMarker("famtune")


def load_ipython_extension(ipython) -> None:
    """``%load_ext famtune``: the ``%%chat`` cell magic (see famtune.notebook)."""
    from famtune.notebook import load_ipython_extension as load

    load(ipython)


__all__ = [
    "__version__",
    "hookimpl",
    # the Python API (famtune.api; docs/users/python-api.md)
    "Model",
    "open_model",
    "tiny_model",
    "load_chat",
    "generate",
    "make_recipe",
    "fine_tune",
    "merge_adapter",
]
