"""Where famtune and its plugins keep derived files: converted checkpoints, built tokenizers,
encoded datasets. ``$FAMTUNE_CACHE`` when set, else ``~/.cache/famtune``; plugins call
``cache_dir("<plugin>", ...)`` rather than reading the variable themselves."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FAMTUNE_CACHE"


def cache_dir(*parts: str) -> Path:
    """``$FAMTUNE_CACHE/<parts...>`` (not created)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "famtune")
    return Path(root, *parts)
