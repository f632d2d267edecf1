"""The IPython extension: ``%load_ext famtune``, then ``%%chat`` cells talk to a famtune model.

``%%chat`` sends the cell to the last chat loaded with :func:`famtune.load_chat` (or to the one named
on the magic line, ``%%chat my_chat``) and streams the reply into the cell's output. ``%chat_reset``
starts a new conversation.
"""

from __future__ import annotations

from typing import Any

from famtune.errors import FamtuneError

_last: dict[str, Any] = {}


def remember(chat: Any) -> None:
    """Record ``chat`` as the one ``%%chat`` talks to (``famtune.load_chat`` calls this)."""
    _last["chat"] = chat


def load_ipython_extension(ipython: Any) -> None:
    from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

    @magics_class
    class ChatMagics(Magics):
        def _chat(self, line: str):
            name = line.strip()
            if name:
                chat = self.shell.user_ns.get(name) if self.shell is not None else None
                if chat is None or not hasattr(chat, "chat"):
                    raise FamtuneError(
                        f"%%chat {name}: no chat called {name!r} in this notebook; "
                        f"create one with {name} = famtune.load_chat(MODEL)"
                    )
                return chat
            if "chat" not in _last:
                raise FamtuneError("%%chat: no chat loaded yet; run chat = famtune.load_chat(MODEL) first")
            return _last["chat"]

        @cell_magic
        def chat(self, line: str, cell: str) -> None:
            """Send the cell to the last loaded famtune chat (or the one named) and show the reply."""
            import sys

            try:
                session = self._chat(line)
            except FamtuneError as exc:
                print(f"famtune: error: {exc}", file=sys.stderr)
                return
            for piece in session.chat(cell.strip(), stream=True):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")

        @line_magic
        def chat_reset(self, line: str) -> None:
            """Start a new conversation in the last loaded famtune chat (or the one named)."""
            import sys

            try:
                self._chat(line).reset()
            except FamtuneError as exc:
                print(f"famtune: error: {exc}", file=sys.stderr)

    ipython.register_magics(ChatMagics)
