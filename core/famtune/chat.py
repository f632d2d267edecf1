"""``famtune chat``: talk to a base, merged or base+adapter model in the format it was trained with.

Prompts come from the family plugin's ``encode`` (the same ids training used), generation stops
on every one of the family's stop ids, and the stop token itself is never shown.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from famtune.metadata import read_metadata

BANNER = "famtune chat: {family}. /reset starts a new conversation, /exit or Ctrl-D quits."


@dataclass
class ChatSession:
    """A loaded model with the family's prompt format, stop ids and sampling defaults."""

    model: Any
    tokenizer: Any
    family: Any  # famtune.plugins.Family
    stop_ids: list[int]
    sampling: dict[str, Any] = field(default_factory=dict)
    system: str | None = None  # None: the family's default system prompt
    pad_id: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        # The session owns every generation setting: a checkpoint's own generation_config (other eos,
        # sampling values) would otherwise leak into greedy runs or stop on the wrong token.
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        inner.generation_config = GenerationConfig(eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        enc = self.family.encode(self.tokenizer, messages, masking="all_assistant", add_generation_prompt=True)
        return list(enc.input_ids)

    def reply(self, messages: list[dict], *, stream: Callable[[str], Any] | None = None, greedy: bool = False,
              max_new_tokens: int = 256, **sampling_overrides) -> str:
        """The assistant's answer to ``messages`` (ending on a user turn), without the stop token."""
        import torch

        ids = self.prompt_ids(messages)
        settings: dict[str, Any] = {"do_sample": False} if greedy else {**self.sampling, **sampling_overrides}
        settings["max_new_tokens"] = max_new_tokens
        streamer = _PieceStreamer(self.tokenizer, self.stop_ids, stream)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      streamer=streamer, **settings)
        return self.decode(out[0, len(ids):].tolist())

    def decode(self, new_ids: list[int]) -> str:
        return self.tokenizer.decode(_until_stop(new_ids, self.stop_ids), skip_special_tokens=False)


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


class _PieceStreamer:
    """Feeds decoded text to a callback as tokens arrive, in the generating thread (``generate``
    calls ``put`` with the prompt, then with each new token, then ``end``).

    Text is decoded from all tokens so far and only the new suffix is emitted, because a byte-level
    token can end inside a multi-byte character (decoded as U+FFFD until the next token completes it).
    """

    def __init__(self, tokenizer: Any, stop_ids: list[int], callback: Callable[[str], Any] | None) -> None:
        self.tokenizer, self.stop_ids, self.callback = tokenizer, set(stop_ids), callback
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            if self.stopped or t in self.stop_ids:
                self.stopped = True
                return
            self.ids.append(t)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.callback is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            self.callback(text[self.shown:])
            self.shown = len(text)


def load_chat_model(model: str, adapter: str | None = None, *, trust_remote_code: bool = False) -> ChatSession:
    """A session on ``model`` (a base or merged checkpoint), with ``adapter`` attached if given."""
    from famtune.checkpoint import open_checkpoint, resolve_source

    path = resolve_source(model)
    meta = read_metadata(adapter) if adapter else read_metadata(path, required=False)
    ckpt = open_checkpoint(path, family=meta["family"] if meta else None, trust_remote_code=trust_remote_code)
    if adapter:
        # The adapter learned a correction to the base as training loaded it (NF4 for QLoRA).
        quantization = meta.get("quantization", "none")
        loaded = ckpt.load_model(quantization=quantization, compute_dtype=meta.get("compute_dtype", "auto"),
                                 quantization_config=meta.get("quantization_config"))
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter)
        loaded.eval()
    else:
        loaded = ckpt.load_model(quantization="none", compute_dtype="auto")
    ckpt.check_vocabulary(loaded)
    tokenizer = ckpt.load_tokenizer()
    if meta and meta.get("stop_ids"):
        stop_ids, sampling = list(meta["stop_ids"]), dict(meta.get("generation") or {})
    else:
        defaults = ckpt.family.generation_defaults(tokenizer)
        stop_ids, sampling = list(defaults.stop_ids), dict(defaults.sampling)
    system = meta.get("system") if meta else None
    return ChatSession(loaded, tokenizer, ckpt.family, stop_ids, sampling, system)


def run_chat(session: ChatSession, *, prompt: str | None, system: str | None, greedy: bool, max_new_tokens: int,
             input_fn=input, output=sys.stdout) -> int:
    """Answer ``prompt`` once, or hold a multi-turn conversation read from ``input_fn``. Returns an exit code."""
    system = system if system is not None else session.system
    head = [{"role": "system", "content": system}] if system is not None else []

    def show(piece: str) -> None:
        output.write(piece)
        output.flush()

    def answer(history: list[dict[str, str]]) -> str:
        text = session.reply(head + history, stream=show, greedy=greedy, max_new_tokens=max_new_tokens)
        show("\n")
        return text

    if prompt is not None:
        answer([{"role": "user", "content": prompt}])
        return 0
    show(BANNER.format(family=session.family.name) + "\n")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input_fn(">>> ")
        except (EOFError, KeyboardInterrupt):
            show("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = []
            show("(new conversation)\n")
            continue
        history.append({"role": "user", "content": text})
        try:
            history.append({"role": "assistant", "content": answer(history)})
        except KeyboardInterrupt:  # Ctrl-C cuts a runaway reply short; the turn is dropped
            history.pop()
            show("\n(interrupted)\n")
