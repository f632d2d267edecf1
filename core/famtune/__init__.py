"""famtune: QLoRA fine-tuning of chat LLMs, with every family-specific decision in a plugin."""
from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@famtune.hookimpl``.
hookimpl = pluggy.HookimplMarker("famtune")

__all__ = ["__version__", "hookimpl"]
