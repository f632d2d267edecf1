"""Values that plugins hand to the core."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GenerationDefaults:
    """A family's generation settings: stop ids and sampling defaults.

    ``sampling`` holds ``transformers.GenerationConfig`` keyword arguments such as
    ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``.
    """

    stop_ids: list[int]
    sampling: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stop_ids": list(self.stop_ids), "sampling": dict(self.sampling)}


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin comes from, for listings and error messages."""

    name: str
    distribution: str
    version: str

    def describe(self) -> str:
        return f"plugin {self.name!r} ({self.distribution} {self.version})"
