"""One definition of a chat format, from which the encoder, the Jinja template and FastChat's view derive.

A family writes its format once as a ``ChatFormat``: the text that goes before and after each
role's content, the family's default system prompt, its special tokens and a few switches for
how its original code tokenizes. famtune derives from that single definition

- ``encode``: ids and labels, built piece by piece with ``ConversationBuilder`` so every label's
  position is known by construction;
- ``jinja``: the ``chat_template`` saved with merged models (``tokenizer.apply_chat_template``);
- ``fastchat_conversation``: a ``fastchat.conversation.Conversation`` for tools that expect one.

so the three cannot drift apart; ``tests/test_chat_format.py`` renders all three for every
registered family and compares ids.

The encoder tokenizes each run of text between two special tokens as one piece, as the tokenizer
does when it reads a rendered string, and splits a run only where supervision starts or stops
(an assistant turn's content) or where the family's original code tokenizes apart
(``content_apart``). That is why encoder and template agree id for id. Where a text view cannot
reproduce the original tokenization for some content (content tokenized apart that starts with
whitespace, control-token text kept as text), ``text_views_exact`` says so, and the test skips
no family: it compares those conversations through the encoder and the reference fixtures only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from famtune.encoding import GENERIC_POLICIES, ConversationBuilder, EncodedConversation

ROLES = ("system", "user", "assistant")

#: Where a token came from: (role, part). Roles are ``system``, ``user``, ``assistant``, plus
#: ``begin`` and ``generation`` (the generation prompt); parts are ``begin``, ``prefix``,
#: ``header``, ``content``, ``suffix``, ``trailer`` and ``final_suffix``. Text tokenized as one
#: piece with a content counts as ``content``.
Part = tuple[str, str]


@dataclass(frozen=True)
class FormatTokens:
    """An encoded conversation with each token's origin, what a format's own masking policy reads.

    ``turns`` are the ``all_assistant`` supervision (assistant turn per token, ``None`` for prompt
    tokens); ``token_id`` maps a special token's text to its id in this tokenizer.
    """

    input_ids: list[int]
    turns: list[int | None]
    parts: list[Part]
    token_id: Callable[[str], int]


#: A family-specific masking policy: the labels of an encoded conversation.
FormatPolicy = Callable[[FormatTokens], list[int]]


@dataclass(frozen=True)
class _Run:
    text: str
    turn: int | None  # the assistant turn it is supervised for, None for prompt text
    role: str
    part: str


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as strings: ``{role}_prefix + content + {role}_suffix`` per message.

    ``begin`` comes once before everything (a BOS token, ``""`` for none). ``default_system`` is
    used when a conversation has no system message (``None``: no system block then).
    ``final_assistant_prefix`` replaces ``assistant_prefix`` for an assistant message that ends the
    conversation (Qwen3's empty think block); ``generation_prefix`` is what a generation prompt
    ends with (default: the final assistant prefix). ``assistant_suffix`` (the end-of-turn token) is
    supervised with the reply; ``assistant_trailer`` follows it unsupervised (ChatML's newline).
    ``special_tokens`` are the control tokens the strings spell; each becomes one id.
    ``strip_content`` trims whitespace around every content.

    How the family's original code tokenizes (each switch off by default):

    - ``assistant_header``: text after the assistant prefix that the model writes itself, so it is
      supervised with the reply (ChatGLM's newline after ``<|assistant|>``).
    - ``final_assistant_suffix``: ends an assistant message that ends the conversation (no
      generation prompt after it) instead of ``assistant_suffix + assistant_trailer``, supervised
      (Baichuan2's and ChatGLM3's ``</s>``, GLM-4's ``<|user|>``).
    - ``turn_ends_with_next_role_token``: no token closes a reply; the control token that opens
      the next message (or the generation prompt) is its end of turn, supervised with it.
    - ``join_assistant_prefix``: the text of the assistant prefix is tokenized together with the
      content and cut where the content starts; a token spanning the cut holds content text and
      goes with the content (InternLM2, whose original reads the rendered string, merges
      ``"assistant\\n"`` with an answer's leading ``"\\n"``).
    - ``content_apart``: each content is tokenized on its own, apart from the text around it
      (Qwen1's ``make_context``, ChatGLM3's ``build_single_message``).
      ``rendered_content_prefix`` is what the text views write before a non-empty content to
      stand for what separate tokenization adds (ChatGLM3's SentencePiece dummy prefix, ``" "``).
    - ``control_tokens_in_content``: ``False`` keeps content that spells a control token as plain
      text (the original tokenizes message text with special tokens disallowed), so a data row
      cannot forge a turn boundary.
    - ``system_anywhere``: a system message may come later than first (rendered as a system block).
    - ``drop_empty_system``: an empty system message writes no block.

    ``policies`` are the family's own masking policies (beyond the generic three), computed from
    each token's origin; ``validate`` checks a conversation first with the family's own rules and
    messages; ``fastchat_stop_ids`` are the stop tokens' ids in the released vocabulary (FastChat
    has no tokenizer to look them up in).
    """

    name: str
    special_tokens: tuple[str, ...]
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    system_prefix: str = ""
    system_suffix: str = ""
    begin: str = ""
    default_system: str | None = None
    final_assistant_prefix: str | None = None
    generation_prefix: str | None = None
    assistant_trailer: str = ""
    strip_content: bool = False
    stop_tokens: tuple[str, ...] = field(default_factory=tuple)
    assistant_header: str = ""
    final_assistant_suffix: str | None = None
    turn_ends_with_next_role_token: bool = False
    join_assistant_prefix: bool = False
    content_apart: bool = False
    rendered_content_prefix: str = ""
    control_tokens_in_content: bool = True
    system_anywhere: bool = False
    drop_empty_system: bool = False
    policies: Mapping[str, FormatPolicy] = field(default_factory=dict, compare=False)
    validate: Callable[[list[dict[str, str]], bool], None] | None = field(default=None, compare=False)
    fastchat_stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.turn_ends_with_next_role_token:
            for prefix in (self.user_prefix, self.assistant_prefix, self.system_prefix, self._gen_prefix()):
                if prefix and not any(prefix.startswith(t) for t in self.special_tokens):
                    raise ValueError(
                        f"chat format {self.name!r}: turn_ends_with_next_role_token needs every prefix to start "
                        f"with a special token; {prefix!r} does not"
                    )

    @property
    def masking_policies(self) -> list[str]:
        """The policies ``encode`` accepts: the generic three, then the format's own."""
        return [*GENERIC_POLICIES, *self.policies]

    # -- the one rendering every view derives from ------------------------------------------------
    def _last_prefix(self) -> str:
        return self.final_assistant_prefix if self.final_assistant_prefix is not None else self.assistant_prefix

    def _gen_prefix(self) -> str:
        return self.generation_prefix if self.generation_prefix is not None else self._last_prefix()

    def _prefix(self, role: str) -> str:
        return {"system": self.system_prefix, "user": self.user_prefix}[role]

    def _suffix(self, role: str) -> str:
        return {"system": self.system_suffix, "user": self.user_suffix}[role]

    def check(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
        """Raise ``ValueError`` naming the message when the conversation cannot be rendered."""
        if self.validate is not None:
            self.validate(messages, add_generation_prompt)
        if not messages:
            raise ValueError("the conversation has no messages; give at least one user message")
        for i, m in enumerate(messages, 1):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ROLES:
                raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} ({role}) has content {m.get('content')!r}; expected a string")
            if role == "system" and i != 1 and not self.system_anywhere:
                raise ValueError(f"message {i} is a system message; only the first message may be one")

    def _runs(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[_Run]:
        """The conversation as runs of text, each with its supervision and origin, in order."""
        out = [_Run(self.begin, None, "begin", "begin")]
        blocks = [(m["role"], m["content"]) for m in messages]
        if not blocks or blocks[0][0] != "system":
            blocks[:0] = [] if self.default_system is None else [("system", self.default_system)]
        blocks = [(r, c) for r, c in blocks if not (r == "system" and not c and self.drop_empty_system)]
        open_turn: int | None = None  # the reply whose end of turn is the next role token
        turn = 0

        def opening(prefix: str, role: str) -> None:
            nonlocal open_turn
            if open_turn is not None and self.turn_ends_with_next_role_token and prefix:
                token = next(t for t in sorted(self.special_tokens, key=len, reverse=True) if prefix.startswith(t))
                out.append(_Run(token, open_turn, role, "prefix"))
                prefix = prefix[len(token) :]
            open_turn = None
            out.append(_Run(prefix, None, role, "prefix"))

        for i, (role, content) in enumerate(blocks):
            content = self._content(content)
            if role != "assistant":
                opening(self._prefix(role), role)
                out += [_Run(content, None, role, "content"), _Run(self._suffix(role), None, role, "suffix")]
                continue
            last = i == len(blocks) - 1
            opening(self._last_prefix() if last else self.assistant_prefix, role)
            out += [_Run(self.assistant_header, turn, role, "header"), _Run(content, turn, role, "content")]
            if last and self.final_assistant_suffix is not None and not add_generation_prompt:
                out.append(_Run(self.final_assistant_suffix, turn, role, "final_suffix"))
            else:
                out += [_Run(self.assistant_suffix, turn, role, "suffix")]
                out += [_Run(self.assistant_trailer, None, role, "trailer")]
                open_turn = turn
            turn += 1
        if add_generation_prompt:
            opening(self._gen_prefix(), "generation")
        return [r for r in out if r.text]

    def _content(self, text: str) -> str:
        return text.strip() if self.strip_content else text

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as the text the Jinja template renders."""
        return "".join(
            self.rendered_content_prefix + r.text if r.part == "content" else r.text
            for r in self._runs(messages, add_generation_prompt)
        )

    def text_views_exact(self, messages: list[dict[str, str]]) -> bool:
        """Whether tokenizing a rendered string (Jinja, FastChat) gives the encoder's ids for these messages.

        Content tokenized apart may merge with the text before it once rendered when it starts with
        whitespace (unless ``rendered_content_prefix`` stands for the split); content kept as text
        that spells a control token is parsed as that token once rendered.
        """
        for m in messages:
            text = self._content(m["content"])
            if self.content_apart and not self.rendered_content_prefix and text[:1].isspace():
                return False
            if not self.control_tokens_in_content and any(t in text for t in self.special_tokens):
                return False
        return True

    # -- view 1: the encoder ------------------------------------------------------------------
    def encode(
        self, tokenizer: Any, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool
    ) -> EncodedConversation:
        if masking not in self.masking_policies:
            raise ValueError(f"unknown masking policy {masking!r}; expected one of {', '.join(self.masking_policies)}")
        self.check(messages, add_generation_prompt)
        b = ConversationBuilder(tokenizer, split_special_tokens=not self.control_tokens_in_content)
        ids = {t: b.token_id(t) for t in self.special_tokens}
        pattern = re.compile("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")")
        origins: list[Part] = []  # the origin of each of the builder's pieces, in order
        chunk: list[_Run] = []  # text runs tokenized as one piece

        def add(piece: list[int], turn: int | None, origin: Part) -> None:
            b.prompt_ids(piece) if turn is None else b.assistant_ids(piece, turn)
            origins.append(origin)

        def flush() -> None:
            if not chunk:
                return
            if len({r.turn for r in chunk}) > 1:  # join_assistant_prefix: cut where the content starts
                head = [r for r in chunk if r.turn is None]
                head_ids, rest = _cut_after(b, "".join(r.text for r in head), "".join(r.text for r in chunk))
                add(head_ids, None, (head[0].role, "prefix"))
                add(rest, chunk[-1].turn, _origin(chunk[len(head) :]))
            else:
                # Added as text: while preparing a data file, the builder tokenizes all of a
                # conversation's text pieces in one call of the tokenizer.
                text, turn = "".join(r.text for r in chunk), chunk[0].turn
                b.prompt_text(text) if turn is None else b.assistant_text(text, turn)
                origins.append(_origin(chunk))
            chunk.clear()

        for run in self._runs(messages, add_generation_prompt):
            as_text = run.part == "content" and not self.control_tokens_in_content
            apart = self.content_apart and run.part == "content"
            if apart:
                flush()
            for piece in [run.text] if as_text or not self.special_tokens else pattern.split(run.text):
                if not piece:
                    continue
                if piece in ids and not as_text:
                    flush()
                    add([ids[piece]], run.turn, (run.role, run.part))
                    continue
                if chunk and chunk[-1].turn != run.turn and not self._joins(chunk[-1], run):
                    flush()
                chunk.append(_Run(piece, run.turn, run.role, run.part))
            if apart:
                flush()
        flush()
        if masking in self.policies:
            enc = b.build("all_assistant")
            turns = list(enc.turns or [])
            parts = [origin for origin, piece in zip(origins, b.pieces) for _ in piece.ids]
            labels = self.policies[masking](FormatTokens(enc.input_ids, turns, parts, b.token_id))
            return EncodedConversation(enc.input_ids, list(labels), turns)
        return b.build(masking)

    def _joins(self, before: _Run, run: _Run) -> bool:
        return (
            self.join_assistant_prefix
            and before.part == "prefix"
            and before.role == "assistant"
            and run.part in ("header", "content")
        )

    # -- view 2: the Jinja chat_template ---------------------------------------------------------
    def jinja(self) -> str:
        """The same rendering as ``render``, as a ``chat_template`` for ``apply_chat_template``."""
        q = _jinja_literal
        content = "(message['content'] | trim)" if self.strip_content else "message['content']"
        system_content = "(system | trim)" if self.strip_content else "system"
        default = "none" if self.default_system is None else q(self.default_system)
        shown = "((" + q(self.rendered_content_prefix) + " + c) if c else '')" if self.rendered_content_prefix else "c"
        system_block = "{{- " + q(self.system_prefix) + " + " + shown + " + " + q(self.system_suffix) + " -}}"
        if self.drop_empty_system:
            system_block = "{%- if c -%}" + system_block + "{%- endif -%}"
        assistant_end = q(self.assistant_suffix + self.assistant_trailer)
        if self.final_assistant_suffix is not None:
            end = (
                "{%- if loop.last and not add_generation_prompt -%}{{- "
                + q(self.final_assistant_suffix)
                + " -}}{%- else -%}{{- "
                + assistant_end
                + " -}}{%- endif -%}"
            )
        else:
            end = "{{- " + assistant_end + " -}}"
        assistant_block = (
            "{%- if loop.last -%}{{- " + q(self._last_prefix()) + " -}}"
            "{%- else -%}{{- " + q(self.assistant_prefix) + " -}}{%- endif -%}"
            "{{- " + q(self.assistant_header) + " + " + shown + " -}}" + end
        )
        user_block = "{{- " + q(self.user_prefix) + " + " + shown + " + " + q(self.user_suffix) + " -}}"
        return "".join(
            [
                "{%- if messages and messages[0]['role'] == 'system' -%}",
                "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
                "{%- else -%}{%- set system = " + default + " -%}{%- set turns = messages -%}{%- endif -%}",
                "{{- " + q(self.begin) + " -}}",
                "{%- if system is not none -%}{%- set c = " + system_content + " -%}" + system_block + "{%- endif -%}",
                "{%- for message in turns -%}{%- set c = " + content + " -%}",
                "{%- if message['role'] == 'assistant' -%}" + assistant_block,
                "{%- elif message['role'] == 'system' -%}" + system_block,
                "{%- else -%}" + user_block + "{%- endif -%}",
                "{%- endfor -%}",
                "{%- if add_generation_prompt -%}{{- " + q(self._gen_prefix()) + " -}}{%- endif -%}",
            ]
        )

    # -- view 3: FastChat ---------------------------------------------------------------------
    def fastchat_conversation(self, system: str | None = None):
        """A ``fastchat.conversation.Conversation`` rendering this format.

        FastChat has one assistant prefix and one separator per role, so its prompt ends with the
        assistant prefix; ``fastchat_exact`` says when its rendering equals ``render``'s. The
        begin text and the system block (or its absence, when the format has no default system
        prompt and none is set) come from ``system_template``, so ``set_system_message`` works.
        """
        from fastchat.conversation import Conversation, SeparatorStyle

        system = self.default_system if system is None else system
        if system is not None and self.drop_empty_system and not self._content(system):
            system = None
        block = self.begin + self.system_prefix + "{system_message}" + self.system_suffix
        return Conversation(
            name=self.name,
            system_template=_SystemTemplate(block, self.begin),
            system_message=None if system is None else self._content(system),
            roles=(self.user_prefix, self.assistant_prefix),
            sep_style=SeparatorStyle.NO_COLON_TWO,
            sep=self.user_suffix,
            sep2=self.assistant_suffix + self.assistant_trailer,
            messages=[],
            stop_str=list(self.stop_tokens) or None,
            stop_token_ids=list(self.fastchat_stop_ids) or None,
        )

    def fastchat_exact(self, add_generation_prompt: bool) -> bool:
        """Whether FastChat renders what ``render`` does for alternating user/assistant turns."""
        if self.assistant_header or self.rendered_content_prefix or self.final_assistant_prefix is not None:
            return False
        return add_generation_prompt or self.final_assistant_suffix is None

    def stop_ids(self, tokenizer: Any) -> list[int]:
        b = ConversationBuilder(tokenizer)
        return [b.token_id(t) for t in self.stop_tokens]


class _SystemTemplate(str):
    """FastChat's ``system_template``: the begin text plus the system block, or the begin text alone.

    FastChat formats its system template on every prompt; a system message of ``None`` means the
    conversation has none, as for a format without a default system prompt. ``Conversation.copy``
    keeps this object, so copies from FastChat's registry behave the same.
    """

    begin: str

    def __new__(cls, text: str, begin: str) -> _SystemTemplate:
        obj = super().__new__(cls, text)
        obj.begin = begin
        return obj

    def format(self, *args: Any, **kwargs: Any) -> str:
        if kwargs.get("system_message") is None:
            return self.begin
        return str.format(self, *args, **kwargs)


def _origin(runs: list[_Run]) -> Part:
    content = [r for r in runs if r.part == "content"]
    r = content[0] if content else runs[0]
    return (r.role, r.part)


def _cut_after(builder: ConversationBuilder, head: str, text: str) -> tuple[list[int], list[int]]:
    """Ids of ``text`` tokenized as one piece, cut where the text after ``head`` starts.

    A token that spans the cut holds content text, so it goes with what follows.
    """
    ids = builder.tokenize(text)
    head_ids = builder.tokenize(head)
    if ids[: len(head_ids)] == head_ids:
        return head_ids, ids[len(head_ids) :]
    try:
        enc = builder.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        cut = sum(1 for _, end in enc["offset_mapping"] if end <= len(head))
    except (NotImplementedError, KeyError, TypeError):
        cut = 0
        while cut < min(len(ids), len(head_ids)) and ids[cut] == head_ids[cut]:
            cut += 1
    return ids[:cut], ids[cut:]


def _jinja_literal(text: str) -> str:
    # Jinja string literals take Python's escapes; JSON's are a subset of them.
    return json.dumps(text)


IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chatml(name: str, *, extra_special_tokens: tuple[str, ...] = (), **options: Any) -> ChatFormat:
    """A ChatML format: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

    The end-of-turn ``<|im_end|>`` is supervised with the reply, the newline after it is not.
    ``extra_special_tokens`` are the family's other control tokens (a BOS it writes as ``begin``,
    ``<|endoftext|>``); ``options`` are any other ``ChatFormat`` fields (``default_system``,
    ``stop_tokens``, ``begin``, ...).
    """
    return ChatFormat(
        name=name,
        special_tokens=(*extra_special_tokens, IM_START, IM_END),
        system_prefix=IM_START + "system\n",
        system_suffix=IM_END + "\n",
        user_prefix=IM_START + "user\n",
        user_suffix=IM_END + "\n",
        assistant_prefix=IM_START + "assistant\n",
        assistant_suffix=IM_END,
        assistant_trailer="\n",
        **options,
    )
