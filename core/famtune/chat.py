"""Generation for ``famtune chat``, ``famtune serve`` and ``famtune.load_chat``: a loaded model in the
format it was trained with.

Prompts come from the family plugin's ``encode`` (the same ids training used), generation stops
on every one of the family's stop ids, and the stop token itself is never shown. One
:class:`ChatSession` is one servable model: a base, a merged model, or one adapter of a base
whose weights several sessions share.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from famtune.errors import FamtuneError
from famtune.metadata import read_metadata

# Config keys that hold a model's context length across architectures (first present wins).
CONTEXT_KEYS = ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length", "model_max_length")


@dataclass
class Generation:
    """One finished generation: the text shown, the ids generated (stop token included) and why it ended."""

    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    finish_reason: str  # "stop" (stop id or stop string), "length" (max_new_tokens) or "cancelled"


@dataclass
class ChatSession:
    """A loaded model with the family's prompt format, stop ids and sampling defaults.

    ``adapter`` names the peft adapter this session answers with when ``model`` is a PeftModel
    holding several; ``None`` on a PeftModel answers with the base (adapters disabled).
    """

    model: Any
    tokenizer: Any
    family: Any  # famtune.plugins.Family
    stop_ids: list[int]
    sampling: dict[str, Any] = field(default_factory=dict)
    system: str | None = None  # None: the family's default system prompt
    adapter: str | None = None
    pad_id: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        # The session owns every generation setting: a checkpoint's own generation_config (other eos,
        # sampling values) would otherwise leak into greedy runs or stop on the wrong token.
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        inner.generation_config = GenerationConfig(eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id)

    @property
    def context_length(self) -> int | None:
        """Tokens the model attends to (prompt plus reply), from its config; None when it does not say."""
        config = self.model.config
        for key in CONTEXT_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and 0 < value < 10**7:
                return value
        return None

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        enc = self.family.encode(self.tokenizer, messages, masking="all_assistant", add_generation_prompt=True)
        return list(enc.input_ids)

    def settings(self, *, greedy: bool = False, **overrides) -> dict[str, Any]:
        """``generate`` keyword arguments: the family's sampling defaults, then ``overrides``."""
        if greedy:
            return {"do_sample": False}
        return {**self.sampling, **{k: v for k, v in overrides.items() if v is not None}}

    def reply(
        self,
        messages: list[dict],
        *,
        stream: Callable[[str], Any] | None = None,
        greedy: bool = False,
        max_new_tokens: int = 256,
        **sampling_overrides,
    ) -> str:
        """The assistant's answer to ``messages`` (ending on a user turn), without the stop token."""
        return self.generate(
            self.prompt_ids(messages),
            self.settings(greedy=greedy, **sampling_overrides),
            max_new_tokens=max_new_tokens,
            on_text=stream,
        ).text

    def generate(
        self,
        ids: list[int],
        settings: dict[str, Any],
        *,
        max_new_tokens: int,
        on_text: Callable[[str], Any] | None = None,
        stop: list[str] | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Continue ``ids``; ``on_text`` gets each new piece of text as it is generated. Ends on a stop
        id, on one of the ``stop`` strings (not shown), after ``max_new_tokens``, or when ``cancel`` is set."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        text = TextTail(self.tokenizer, self.stop_ids, on_text, stop or [])

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                halt = text.stopped or (cancel is not None and cancel.is_set())
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

        if cancel is not None and cancel.is_set():
            return Generation("", list(ids), [], "cancelled")
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        with torch.no_grad(), self.active():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=text,
                stopping_criteria=StoppingCriteriaList([Halt()]),
                max_new_tokens=max_new_tokens,
                eos_token_id=list(self.stop_ids),
                pad_token_id=self.pad_id,
                **settings,
            )
        new_ids = out[0, len(ids) :].tolist()
        if text.stopped:
            reason = "stop"
        elif cancel is not None and cancel.is_set():
            reason = "cancelled"
        else:
            reason = "length"
        return Generation(text.final(), list(ids), new_ids, reason)

    def token_logprobs(self, ids: list[int], top: int = 0) -> tuple[list[float | None], list[dict[int, float]]]:
        """Log-probability of each of ``ids`` given the ones before it (None for the first), and the
        ``top`` most likely ids at each position, from one forward pass."""
        import torch

        device = next(self.model.parameters()).device
        with torch.no_grad(), self.active():
            logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        chosen: list[float | None] = [None]
        tops: list[dict[int, float]] = [{}]
        for i in range(1, len(ids)):
            chosen.append(float(logp[i - 1, ids[i]]))
            if top:
                values, idx = logp[i - 1].topk(top)
                tops.append({int(j): float(v) for j, v in zip(idx.tolist(), values.tolist())})
            else:
                tops.append({})
        return chosen, tops

    def active(self):
        """A context in which ``model`` answers as this session (its adapter, or the bare base)."""
        model = self.model
        if not hasattr(model, "disable_adapter"):  # not a PeftModel
            return nullcontext()
        if self.adapter is None:
            return model.disable_adapter()
        return _with_adapter(model, self.adapter)


@contextmanager
def _with_adapter(model: Any, name: str):
    model.set_adapter(name)
    yield


class TextTail:
    """Turns the ids ``generate`` streams into text, in the generating thread (``generate`` calls
    ``put`` with the prompt, then with each new token, then ``end``).

    Text is decoded from all tokens so far and only the new suffix is passed on, because a byte-level
    token can end inside a multi-byte character (decoded as U+FFFD until the next token completes it).
    A tail that could be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(
        self, tokenizer: Any, stop_ids: list[int], callback: Callable[[str], Any] | None, stop_strings: list[str]
    ) -> None:
        self.tokenizer, self.stop_ids, self.callback = tokenizer, set(stop_ids), callback
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        if self.stopped:
            return
        for t in value.reshape(-1).tolist():
            if t in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(t)
        self._update(final=self.stopped)

    def end(self) -> None:
        self._update(final=True)

    def final(self) -> str:
        return self.text

    def _update(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        self.text = text
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):
                return
            safe -= _held_back(text, self.stop_strings)
        if safe > self.shown:
            if self.callback is not None:
                self.callback(text[self.shown : safe])
            self.shown = safe


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that begins some stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


def profile(meta: dict | None, family: Any, tokenizer: Any) -> tuple[list[int], dict[str, Any], str | None]:
    """Stop ids, sampling defaults and system prompt: from ``famtune.json`` when present, else the family's."""
    if meta and meta.get("stop_ids"):
        return list(meta["stop_ids"]), dict(meta.get("generation") or {}), meta.get("system")
    defaults = family.generation_defaults(tokenizer)
    return list(defaults.stop_ids), dict(defaults.sampling), meta.get("system") if meta else None


def load_base(model: str, adapter_metas: list[dict], *, trust_remote_code: bool = False):
    """The checkpoint ``model`` opened and loaded the way the adapters in ``adapter_metas`` were
    trained against it (NF4 for QLoRA), or in its own precision when there are none."""
    from famtune.checkpoint import open_checkpoint, resolve_source

    path = resolve_source(model)
    own = read_metadata(path, required=False)
    families = {m["family"] for m in adapter_metas}
    if len(families) > 1:
        raise FamtuneError(
            f"the adapters were trained on different families ({', '.join(sorted(families))}); "
            "serve one base and its own adapters per process"
        )
    family = next(iter(families)) if families else (own["family"] if own else None)
    ckpt = open_checkpoint(path, family=family, trust_remote_code=trust_remote_code)
    loads = {
        json.dumps(
            [m.get("quantization", "none"), m.get("compute_dtype", "auto"), m.get("quantization_config")],
            sort_keys=True,
        )
        for m in adapter_metas
    }
    if len(loads) > 1:
        raise FamtuneError(
            f"the adapters were trained against differently loaded bases ({sorted(loads)}); "
            "serve them from separate processes"
        )
    # The adapter learned a correction to the base as training loaded it (NF4 for QLoRA).
    quantization, compute_dtype, quantization_config = (
        json.loads(next(iter(loads))) if loads else ("none", "auto", None)
    )
    loaded = ckpt.load_model(
        quantization=quantization, compute_dtype=compute_dtype, quantization_config=quantization_config
    )
    ckpt.check_vocabulary(loaded)
    loaded.eval()
    return ckpt, own, loaded


def load_chat_model(model: str, adapter: str | None = None, *, trust_remote_code: bool = False) -> ChatSession:
    """A session on ``model`` (a base or merged checkpoint), with ``adapter`` attached if given."""
    meta = read_metadata(adapter) if adapter else None
    ckpt, own, loaded = load_base(model, [meta] if meta else [], trust_remote_code=trust_remote_code)
    name = None
    if adapter:
        from peft import PeftModel

        name = "default"
        loaded = PeftModel.from_pretrained(loaded, adapter, adapter_name=name)
        loaded.eval()
    tokenizer = ckpt.load_tokenizer()
    stop_ids, sampling, system = profile(meta if adapter else own, ckpt.family, tokenizer)
    return ChatSession(loaded, tokenizer, ckpt.family, stop_ids, sampling, system, adapter=name)


def run_chat(session: ChatSession, **kwargs) -> int:
    """The terminal conversation (see :func:`famtune.repl.run_chat`)."""
    from famtune.repl import run_chat as run

    return run(session, **kwargs)
