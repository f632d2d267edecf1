"""One definition of a chat format, from which the encoder, the Jinja template and FastChat's view derive.

A family writes its format once as a ``ChatFormat``: the text that goes before and after each
role's content, the family's default system prompt and its special tokens. famtune derives from
that single definition

- ``encode``: ids and labels, built piece by piece with ``ConversationBuilder`` so every label's
  position is known by construction;
- ``jinja``: the ``chat_template`` saved with merged models (``tokenizer.apply_chat_template``);
- ``fastchat_conversation``: a ``fastchat.conversation.Conversation`` for tools that expect one.

so the three cannot drift apart; ``tests/test_chat_format.py`` renders all three and compares ids.

The encoder tokenizes each run of text between two special tokens as one piece, as the tokenizer
does when it reads a rendered string, and splits a run only where supervision starts or stops
(an assistant turn's content). That is why encoder and template agree id for id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from famtune.encoding import ConversationBuilder, EncodedConversation

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as strings: ``{role}_prefix + content + {role}_suffix`` per message.

    ``begin`` comes once before everything (a BOS token, ``""`` for none). ``default_system`` is
    used when a conversation has no system message (``None``: no system block then).
    ``final_assistant_prefix`` replaces ``assistant_prefix`` for an assistant message that ends the
    conversation (Qwen3's empty think block); ``generation_prefix`` is what a generation prompt
    ends with (default: the final assistant prefix). ``assistant_suffix`` (the end-of-turn token) is
    supervised with the reply; ``assistant_trailer`` follows it unsupervised (ChatML's newline).
    ``special_tokens`` are the control tokens the
    strings spell; each becomes one id. ``strip_content`` trims whitespace around every content.
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

    # -- the one rendering every view derives from ------------------------------------------------
    def _last_prefix(self) -> str:
        return self.final_assistant_prefix if self.final_assistant_prefix is not None else self.assistant_prefix

    def _gen_prefix(self) -> str:
        return self.generation_prefix if self.generation_prefix is not None else self._last_prefix()

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[tuple[str, int | None]]:
        """The conversation as (text, assistant turn or None) runs, in order."""
        out: list[tuple[str, int | None]] = [(self.begin, None)]
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if system is not None:
            out.append((self.system_prefix + self._content(system) + self.system_suffix, None))
        turn = 0
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                prefix = self._last_prefix() if i == len(messages) - 1 else self.assistant_prefix
                out += [
                    (prefix, None),
                    (self._content(m["content"]) + self.assistant_suffix, turn),
                    (self.assistant_trailer, None),
                ]
                turn += 1
            else:
                out.append((self.user_prefix + self._content(m["content"]) + self.user_suffix, None))
        if add_generation_prompt:
            out.append((self._gen_prefix(), None))
        return out

    def _content(self, text: str) -> str:
        return text.strip() if self.strip_content else text

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))

    # -- view 1: the encoder ------------------------------------------------------------------
    def encode(
        self, tokenizer: Any, messages: list[dict[str, str]], masking: str, add_generation_prompt: bool
    ) -> EncodedConversation:
        b = ConversationBuilder(tokenizer)
        ids = {t: b.token_id(t) for t in self.special_tokens}
        pattern = re.compile("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")")
        # Text runs are joined until a special token or a change of supervision, then tokenized.
        pending: list[str] = []
        pending_turn: int | None = None

        def flush() -> None:
            if pending:
                text = "".join(pending)
                b.prompt_text(text) if pending_turn is None else b.assistant_text(text, pending_turn)
                pending.clear()

        for text, turn in self.segments(messages, add_generation_prompt):
            for part in pattern.split(text) if self.special_tokens else [text]:
                if not part:
                    continue
                if turn != pending_turn:
                    flush()
                    pending_turn = turn
                if part in ids:
                    flush()
                    b.prompt_ids([ids[part]]) if turn is None else b.assistant_ids([ids[part]], turn)
                else:
                    pending.append(part)
        flush()
        return b.build(masking)

    # -- view 2: the Jinja chat_template ---------------------------------------------------------
    def jinja(self) -> str:
        """The same rendering as ``render``, as a ``chat_template`` for ``apply_chat_template``."""
        q = _jinja_literal
        content = "(message['content'] | trim)" if self.strip_content else "message['content']"
        system_content = "(system | trim)" if self.strip_content else "system"
        default = "none" if self.default_system is None else q(self.default_system)
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = " + default + " -%}{%- set turns = messages -%}{%- endif -%}"
            "{{- " + q(self.begin) + " -}}"
            "{%- if system is not none -%}{{- "
            + q(self.system_prefix)
            + " + "
            + system_content
            + " + "
            + q(self.system_suffix)
            + " -}}{%- endif -%}"
            "{%- for message in turns -%}"
            "{%- if message['role'] != 'assistant' -%}"
            "{{- " + q(self.user_prefix) + " + " + content + " + " + q(self.user_suffix) + " -}}"
            "{%- elif loop.last -%}"
            "{{- "
            + q(self._last_prefix())
            + " + "
            + content
            + " + "
            + q(self.assistant_suffix + self.assistant_trailer)
            + " -}}"
            "{%- else -%}"
            "{{- "
            + q(self.assistant_prefix)
            + " + "
            + content
            + " + "
            + q(self.assistant_suffix + self.assistant_trailer)
            + " -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + q(self._gen_prefix()) + " -}}{%- endif -%}"
        )

    # -- view 3: FastChat ---------------------------------------------------------------------
    def fastchat_conversation(self, system: str | None = None):
        """A ``fastchat.conversation.Conversation`` rendering this format.

        FastChat has one assistant prefix, so its prompt ends with the generation prefix and
        earlier assistant turns use ``assistant_prefix``; the system block (or its absence) is
        rendered here, so FastChat's ``system_template`` only inserts it.
        """
        from fastchat.conversation import Conversation, SeparatorStyle

        system = self.default_system if system is None else system
        block = self.begin + ("" if system is None else self.system_prefix + self._content(system) + self.system_suffix)
        return Conversation(
            name=self.name,
            system_template="{system_message}",
            system_message=block,
            roles=(self.user_prefix, self.assistant_prefix),
            sep_style=SeparatorStyle.NO_COLON_TWO,
            sep=self.user_suffix,
            sep2=self.assistant_suffix + self.assistant_trailer,
            messages=[],
            stop_str=list(self.stop_tokens) or None,
        )

    def stop_ids(self, tokenizer: Any) -> list[int]:
        b = ConversationBuilder(tokenizer)
        return [b.token_id(t) for t in self.stop_tokens]


def _jinja_literal(text: str) -> str:
    # Jinja string literals take Python's escapes; JSON's are a subset of them.
    return json.dumps(text)
