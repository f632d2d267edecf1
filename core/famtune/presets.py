"""Sharding presets: the recipe's ``distributed`` key turned into accelerate's plugins."""
from __future__ import annotations

from typing import Any

from famtune.errors import FamtuneError


def accelerate_plugins(preset: str) -> dict[str, Any]:
    if preset == "ddp":
        return {}
    raise FamtuneError(f"distributed: {preset!r} is not available yet")
