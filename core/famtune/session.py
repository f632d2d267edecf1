"""The Python chat API: ``famtune.load_chat(...)`` gives a :class:`Chat` that keeps a conversation.

The terminal chat (``famtune chat``) and the IPython ``%%chat`` magic hold their conversations
through this class; the server answers stateless requests with the same
:class:`famtune.chat.ChatSession` generation underneath.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

from famtune.chat import ChatSession, load_chat_model
from famtune.errors import FamtuneError


def load_chat(
    model: str, adapter: str | None = None, *, system: str | None = None, trust_remote_code: bool = False, **sampling
) -> Chat:
    """Load ``model`` (a base or a ``famtune merge`` output; with ``adapter``, the directory
    ``famtune train`` wrote) and return a :class:`Chat` on it.

    ``system`` replaces the system prompt recorded at training (or the family's default);
    ``sampling`` (``temperature=0.3``, ``greedy=True``, ``max_new_tokens=128`` ...) sets this chat's
    generation defaults.
    """
    return Chat(load_chat_model(model, adapter, trust_remote_code=trust_remote_code), system=system, **sampling)


class Chat:
    """A conversation with a loaded model.

    ``chat(message)`` answers with the whole history as context and appends both turns;
    ``chat(message, stream=True)`` returns an iterator of text pieces instead (the turn is recorded
    when the iterator is exhausted); ``reset()`` forgets the history. When the conversation no
    longer fits the model's context, the oldest turns are left out of the prompt (with a warning).
    """

    def __init__(
        self,
        session: ChatSession,
        *,
        system: str | None = None,
        greedy: bool = False,
        max_new_tokens: int = 256,
        warn: Callable[[str], Any] | None = None,
        **sampling: Any,
    ) -> None:
        self.session = session
        self.system = system if system is not None else session.system
        self.greedy = greedy
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.history: list[dict[str, str]] = []
        self.warn = warn or (lambda text: print(f"famtune: warning: {text}", file=sys.stderr))
        #: turns left out of the last prompt because the context was full
        self.dropped_turns = 0

    def __repr__(self) -> str:
        return f"<famtune.Chat {self.session.family.name}, {len(self.history)} messages>"

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        self.history = []

    def messages(self, message: str | None = None) -> list[dict[str, str]]:
        """The messages a reply to ``message`` would be generated from: system prompt, history, message."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        tail = [{"role": "user", "content": message}] if message is not None else []
        return head + self.history + tail

    def chat(self, message: str, *, stream: bool = False, **overrides: Any) -> str | Iterator[str]:
        """The model's reply to ``message``; with ``stream=True`` an iterator of its pieces."""
        pieces = self._turn(clean_text(message), overrides)
        if stream:
            return pieces
        return "".join(pieces)

    def _turn(self, message: str, overrides: dict[str, Any]) -> Iterator[str]:
        import queue
        import threading

        greedy = overrides.pop("greedy", self.greedy)
        max_new_tokens = overrides.pop("max_new_tokens", self.max_new_tokens)
        settings = self.session.settings(greedy=greedy, **{**self.sampling, **overrides})
        ids, max_new_tokens = self._fit(message, max_new_tokens)
        # The generation runs in this thread when the caller consumes the iterator; pieces pass
        # through a queue so a consumer that stops early (or Ctrl-C) cancels the generation.
        cancel = threading.Event()
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["gen"] = self.session.generate(
                    ids, settings, max_new_tokens=max_new_tokens, on_text=pieces.put, cancel=cancel
                )
            except BaseException as exc:  # handed to the consumer
                result["error"] = exc
            finally:
                pieces.put(None)

        worker = threading.Thread(target=work, name="famtune-chat", daemon=True)
        worker.start()
        try:
            while True:
                piece = pieces.get()
                if piece is None:
                    break
                yield piece
        finally:
            cancel.set()
            worker.join()
        if "error" in result:
            raise result["error"]
        gen = result["gen"]
        if gen.finish_reason != "cancelled":
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": gen.text}]

    def _fit(self, message: str, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids for ``message`` that leave room for the reply in the context, leaving out the
        oldest turns (a user message with its answer) while they do not."""
        limit = self.session.context_length
        ids = self.session.prompt_ids(self.messages(message))
        dropped = 0
        if limit is not None:
            while len(ids) + max_new_tokens > limit and len(self.history) >= 2:
                self.history = self.history[2:]
                dropped += 1
                ids = self.session.prompt_ids(self.messages(message))
            if len(ids) >= limit:
                raise FamtuneError(
                    f"the message is {len(ids)} tokens with the system prompt, and the model's "
                    f"context is {limit}; shorten it"
                )
            if len(ids) + max_new_tokens > limit:
                self.warn(
                    f"the prompt is {len(ids)} tokens of the model's {limit}; the reply is cut to "
                    f"{limit - len(ids)} tokens"
                )
                max_new_tokens = limit - len(ids)
        if dropped:
            self.warn(
                f"the conversation is longer than the model's context ({limit} tokens); "
                f"left out the oldest {dropped} turn{'s' if dropped > 1 else ''}"
            )
        self.dropped_turns = dropped
        return ids, max_new_tokens


def clean_text(text: str) -> str:
    """``text`` with undecodable bytes (kept by Python as lone surrogates) shown as U+FFFD, so
    tokenizers never see them."""
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
