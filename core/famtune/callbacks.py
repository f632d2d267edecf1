"""Training callbacks from plugins (``famtune_training_callbacks``): trackers, notifications.

A callback implements any of ``on_train_begin(info)``, ``on_log(step, metrics)`` and
``on_train_end(summary)``. A callback that raises stops the run with an error naming it: a
tracker that silently stopped recording would be worse.
"""

from __future__ import annotations

from typing import Any

from famtune.errors import FamtuneError


class Callbacks:
    """Every plugin's callbacks for one run, called in the order plugins returned them."""

    def __init__(self, recipe: Any) -> None:
        from famtune.plugins import get_plugins

        self.callbacks = get_plugins().training_callbacks(recipe)

    def _call(self, method: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as exc:
                raise FamtuneError(
                    f"training callback {type(cb).__name__}.{method} raised {type(exc).__name__}: {exc}"
                ) from exc

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self._call("on_train_begin", info)

    def on_log(self, step: int, metrics: dict[str, Any]) -> None:
        self._call("on_log", step, metrics)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        self._call("on_train_end", summary)
