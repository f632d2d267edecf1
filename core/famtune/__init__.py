"""famtune: QLoRA fine-tuning of chat LLMs, with every family-specific decision in a plugin.

The stable Python API is ``famtune.api``, re-exported here (docs/users/python-api.md).
"""

from __future__ import annotations

import pluggy

from famtune import api
from famtune.api import *  # noqa: F403  (exactly the names in famtune.api.__all__)

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@famtune.hookimpl``.
hookimpl = pluggy.HookimplMarker("famtune")


def load_ipython_extension(ipython) -> None:
    """``%load_ext famtune``: the ``%%chat`` cell magic (see famtune.notebook)."""
    from famtune.notebook import load_ipython_extension as load

    load(ipython)


__all__ = ["__version__", "hookimpl", *api.__all__]  # the Python API: docs/users/python-api.md
