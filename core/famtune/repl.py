"""The terminal side of ``famtune chat``: line editing, commands, Ctrl-C, saving a conversation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from famtune.chat import ChatSession
from famtune.errors import FamtuneError
from famtune.session import Chat, clean_text

BANNER = "famtune chat: {family}. /help lists the commands, /exit or Ctrl-D quits."
HELP = """\
/help          this list
/reset         start a new conversation
/system TEXT   set the system prompt and start a new conversation (/system alone shows it)
/save FILE     write the conversation to FILE as JSON ({"messages": [...]}, famtune's data format)
/exit          quit (Ctrl-D too)
Ctrl-C stops the reply being written; the turn is dropped."""
HISTORY_LINES = 1000


def run_chat(
    session: ChatSession,
    *,
    prompt: str | None,
    system: str | None,
    greedy: bool,
    max_new_tokens: int,
    input_fn=input,
    output=sys.stdout,
) -> int:
    """Answer ``prompt`` once, or hold a multi-turn conversation read from ``input_fn``. Returns an exit code."""

    def show(piece: str) -> None:
        output.write(piece)
        output.flush()

    chat = Chat(
        session, system=clean_text(system) if system is not None else None, greedy=greedy, max_new_tokens=max_new_tokens
    )

    def answer(text: str) -> None:
        for piece in chat.chat(text, stream=True):
            show(piece)
        show("\n")

    if prompt is not None:
        answer(prompt)
        return 0
    if input_fn is input:
        _read_stdin_leniently()
        _line_editing()
    show(BANNER.format(family=session.family.name) + "\n")
    while True:
        try:
            line = input_fn(">>> ")
        except EOFError:
            show("\n")
            return 0
        except KeyboardInterrupt:
            show("\n(Ctrl-D or /exit quits)\n")
            continue
        if "\ufffd" in line or any("\ud800" <= ch <= "\udfff" for ch in line):
            show("(the line had bytes that are not UTF-8; they are sent as U+FFFD)\n")
            line = clean_text(line)
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(chat, text, show):
                return 0
            continue
        try:
            answer(text)
        except KeyboardInterrupt:  # Ctrl-C cuts a runaway reply short; the turn is dropped
            show("\n(interrupted)\n")
        except FamtuneError as exc:
            show(f"famtune: error: {exc}\n")


def _command(chat: Chat, text: str, show) -> bool:
    """Carry out a /command; True when the conversation should end."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name == "/exit":
        return True
    if name == "/help":
        show(HELP + "\n")
    elif name == "/reset":
        chat.reset()
        show("(new conversation)\n")
    elif name == "/system":
        if arg:
            chat.system = arg
            chat.reset()
            show("(system prompt set; new conversation)\n")
        else:
            show(
                f"(system prompt: {chat.system!r})\n"
                if chat.system is not None
                else "(no system prompt: the family's default)\n"
            )
    elif name == "/save":
        if not arg:
            show("(usage: /save FILE)\n")
            return False
        try:
            Path(arg).expanduser().write_text(
                json.dumps({"messages": chat.messages()}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
            )
        except OSError as exc:
            show(f"famtune: error: cannot write {arg}: {exc.strerror}; pick another path\n")
            return False
        show(f"(saved {len(chat.history)} messages to {arg})\n")
    else:
        show(f"(unknown command {name}; /help lists them)\n")
    return False


def _read_stdin_leniently() -> None:
    """Decode stdin with errors="replace": a stray non-UTF-8 byte becomes U+FFFD (and is reported)
    instead of ending the session."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="replace")
        except (ValueError, OSError):  # not a text stream we may change
            pass


def _line_editing() -> None:
    """readline editing and a history kept between sessions, when stdin is a terminal."""
    if not sys.stdin.isatty():
        return
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return
    import atexit

    from famtune.cache import cache_dir

    path = cache_dir("chat_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(HISTORY_LINES)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)
