"""famtune: QLoRA fine-tuning of chat LLMs, with every family-specific decision in a plugin."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@famtune.hookimpl``.
hookimpl = pluggy.HookimplMarker("famtune")


def load_chat(model: str, adapter: str | None = None, **options):
    """A :class:`famtune.session.Chat` on ``model`` (a base or merged directory; with ``adapter``, the
    directory ``famtune train`` wrote): ``.chat(message, stream=False)``, ``.reset()``, ``.history``.

    ``options``: ``system=``, ``greedy=``, ``max_new_tokens=``, ``trust_remote_code=`` and sampling
    settings such as ``temperature=``. In IPython, ``%load_ext famtune`` then ``%%chat`` cells talk
    to the chat loaded last. Heavy libraries load on the first call, not on ``import famtune``.
    """
    from famtune.notebook import remember
    from famtune.session import load_chat as load

    chat = load(model, adapter, **options)
    remember(chat)
    return chat


def load_ipython_extension(ipython) -> None:
    """``%load_ext famtune``: the ``%%chat`` cell magic (see famtune.notebook)."""
    from famtune.notebook import load_ipython_extension as load

    load(ipython)


__all__ = ["__version__", "hookimpl", "load_chat"]
