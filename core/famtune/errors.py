"""Errors famtune reports to the user as one line."""

from __future__ import annotations

from famtune.types import PluginInfo


class FamtuneError(Exception):
    """A problem the user can fix; the CLI prints it as one line without a traceback."""


class PluginError(FamtuneError):
    """A plugin gave an answer the core cannot use."""

    def __init__(self, info: PluginInfo, hook: str, why: str) -> None:
        self.info = info
        self.hook = hook
        super().__init__(f"{info.describe()}: {hook} {why}")
