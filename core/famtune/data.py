"""Read chat fine-tuning data in four common formats into one normalised shape.

A data file is either a JSON array of records or JSON Lines (one record per line); which one is
decided by the content (a file whose first non-blank character is ``[`` is an array), never by the
extension. A file holding a single, possibly pretty-printed, JSON object is read as one record.

Every record becomes ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``:

``conversation`` (XTuner)
    ``{"conversation": [{"system"?: str, "input": str, "output": str}, ...]}``. Each turn gives a
    user message (``input``) and an assistant message (``output``). A non-empty ``system`` on any
    turn becomes the system message; a later one overrides an earlier one.
``messages`` (OpenAI)
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, kept as is.
``alpaca``
    ``{"instruction": str, "input"?: str, "output": str, "system"?: str, "history"?: [[q, a], ...]}``.
    ``history`` pairs come first as user/assistant exchanges. The last user message is
    ``instruction + "\\n" + input`` when ``input`` is non-empty, else ``instruction`` (and just
    ``input`` if ``instruction`` is empty); the assistant message is ``output``.
``sharegpt``
    ``{"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": str}],
    "system"?: str}``.
    ``human`` means user and ``gpt`` means assistant. A top-level ``system`` and a system entry in
    the list together are an error.

A ``system`` *field* that is missing, null or empty means "no system message"; an explicit system
*message* (``messages``, ``sharegpt`` list) is kept even when empty. Optional fields may be null.
Unknown extra keys are ignored. Content is never stripped or otherwise changed.

Every normalised conversation must have an optional leading system message, then user and
assistant messages alternating, starting with user and ending with a non-empty assistant reply.

The format is detected per file from the first record that reads cleanly; every other record must
have the same format. A bad record raises :class:`DataError`, one line ``FILE:LINE: problem; advice``,
where LINE is the 1-based line on which the record starts. With ``skip_bad_records`` bad records
are left out and listed in :attr:`ReadReport.skipped` instead. Broken JSON inside a JSON array
cannot be skipped, because nothing after it can be located reliably.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from famtune.errors import FamtuneError

FORMATS = ("conversation", "messages", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant")

# The single key that marks each format. Detection looks at nothing else, so a record of the right
# format with one broken field gets that field's error instead of "unknown format".
_FORMAT_KEYS = {
    "conversation": "conversation",
    "messages": "messages",
    "alpaca": "instruction",
    "sharegpt": "conversations",
}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_A_ROLE = {"user": "a user", "assistant": "an assistant"}
_JSON_WHITESPACE = " \t\n\r"
_WHITESPACE_RUN = re.compile(r"[ \t\n\r]*")
_SKIP_ADVICE = "fix the line or pass --skip-bad-records"
_ARRAY_ADVICE = "fix the file (broken JSON inside an array cannot be skipped)"


@dataclass
class Conversation:
    """One normalised conversation and where it came from."""

    messages: list[dict[str, str]]
    source: str
    line: int


@dataclass
class ReadReport:
    """What :func:`read_conversations` read and what it skipped."""

    conversations: list[Conversation]
    skipped: list[tuple[int, str]]
    format: str


class DataError(FamtuneError):
    """A data file problem, printed as ``FILE:LINE: problem; advice`` (``FILE: ...`` without a line)."""

    def __init__(self, source: str, line: int | None, problem: str, advice: str) -> None:
        self.source = source
        self.line = line
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {problem}; {advice}")


class _BadRecord(Exception):
    """One record cannot be used; the reader decides whether to raise or skip."""

    def __init__(self, problem: str, advice: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.advice = advice


def detect_format(record: dict) -> str | None:
    """Name the format of one record, or None when it has the marker of no format or of several."""
    if not isinstance(record, dict):
        return None
    found = _formats_marked(record)
    return found[0] if len(found) == 1 else None


def read_conversations(path: str, fmt: str = "auto", skip_bad_records: bool = False) -> ReadReport:
    """Read every conversation of a JSON array or JSON Lines file.

    ``fmt`` is ``"auto"`` or one of :data:`FORMATS`. Raises :class:`DataError` for a missing,
    unreadable or empty file, for the first bad record (unless ``skip_bad_records``), for broken
    JSON inside an array, and when no record at all could be used.
    """
    if fmt != "auto" and fmt not in _formats():
        raise FamtuneError(f"unknown data format {_quote(fmt)}; expected one of auto, {', '.join(_formats())}")
    source = os.fspath(path)
    text = _read_text(source)

    chosen = None if fmt == "auto" else fmt
    origin = None  # the line that fixed the format, for mismatch messages
    conversations: list[Conversation] = []
    skipped: list[tuple[int, str]] = []
    for line, value in _records(source, text):
        try:
            record_format, messages = _read_record(value, chosen, origin)
        except _BadRecord as bad:
            if not skip_bad_records:
                raise DataError(source, line, bad.problem, bad.advice) from None
            skipped.append((line, bad.problem))
            continue
        if chosen is None:
            chosen, origin = record_format, line
        conversations.append(Conversation(messages=messages, source=source, line=line))

    if not conversations:
        raise no_usable_error(source, skipped)
    assert chosen is not None
    return ReadReport(conversations=conversations, skipped=skipped, format=chosen)


def _read_record(value: Any, chosen: str | None, origin: int | None) -> tuple[str, list[dict[str, str]]]:
    """One decoded record's format and messages; raises ``_BadRecord``."""
    if isinstance(value, _BadRecord):
        raise value
    record = _as_object(value)
    if chosen is None:
        record_format = _detect_or_explain(record)
    else:
        _check_format(record, chosen, origin)
        record_format = chosen
    return record_format, _to_messages(record_format, record)


def no_usable_error(source: str, skipped: list[tuple[int, str]]) -> DataError:
    first_line, first_problem = skipped[0]
    count = f"all {len(skipped)} records are bad" if len(skipped) > 1 else "its only record is bad"
    return DataError(
        source,
        None,
        f"no usable conversations: {count} (first at line {first_line}: {first_problem})",
        "fix the records or check the file's format",
    )


@dataclass
class LinesPlan:
    """A JSON Lines file split for reading in parts (by worker processes): its lines, and the format
    fixed by its first clean record, read here with the bad records before it."""

    source: str
    lines: list[str]
    format: str
    origin: int | None  # the line that fixed the format (None: the format was given)
    start: int  # index into ``lines`` of the first line not read yet
    head: ReadReport  # what the lines before ``start`` gave
    skip_bad_records: bool


@dataclass
class LinesPart:
    """What :func:`read_lines` read from lines ``[a, b)`` of a plan."""

    conversations: list[Conversation]
    skipped: list[tuple[int, str]]
    # The first bad record as (line, problem, advice), unless bad records are skipped: plain
    # values, so a worker process can send it back.
    error: tuple[int, str, str] | None

    def raise_error(self, source: str) -> None:
        if self.error is not None:
            raise DataError(source, *self.error)


def plan_lines(path: str, fmt: str = "auto", skip_bad_records: bool = False) -> LinesPlan | None:
    """Prepare ``path`` for :func:`read_lines` if it is JSON Lines; None for a JSON array or a
    single-record file (read those with :func:`read_conversations`). Raises like
    :func:`read_conversations` for the file and for the records read here."""
    if fmt != "auto" and fmt not in _formats():
        raise FamtuneError(f"unknown data format {_quote(fmt)}; expected one of auto, {', '.join(_formats())}")
    source = os.fspath(path)
    text = _read_text(source)
    start = _WHITESPACE_RUN.match(text).end()
    if text[start] == "[":
        return None
    if text[start] == "{":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError:
            pass
    # Split on "\n" only, as _jsonl_records does (U+2028 and friends may sit raw inside strings).
    lines = text.split("\n")
    del text
    head = ReadReport(conversations=[], skipped=[], format=fmt)
    if fmt != "auto":
        return LinesPlan(source, lines, fmt, None, 0, head, skip_bad_records)
    for index, raw in enumerate(lines):
        part = _read_line_range(source, lines, index, index + 1, None, None, skip_bad_records)
        part.raise_error(source)
        head.skipped += part.skipped
        if part.conversations:
            head.conversations = part.conversations
            head.format = _detect_or_explain(_as_object(json.loads(raw)))
            return LinesPlan(source, lines, head.format, index + 1, index + 1, head, skip_bad_records)
    raise no_usable_error(source, head.skipped)


def read_lines(plan: LinesPlan, a: int, b: int) -> LinesPart:
    """Read lines ``[a, b)`` (0-based indexes into ``plan.lines``) as :func:`read_conversations`
    would; the first bad record is returned, not raised, so a worker can hand it back."""
    return _read_line_range(plan.source, plan.lines, a, b, plan.format, plan.origin, plan.skip_bad_records)


def _read_line_range(
    source: str, lines: list[str], a: int, b: int, chosen: str | None, origin: int | None, skip: bool
) -> LinesPart:
    part = LinesPart([], [], None)
    for number in range(a + 1, b + 1):
        raw = lines[number - 1]
        if not raw.strip(_JSON_WHITESPACE):
            continue
        try:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _BadRecord(f"invalid JSON ({exc.msg} at column {exc.colno})", _SKIP_ADVICE) from None
            _, messages = _read_record(value, chosen, origin)
        except _BadRecord as bad:
            if not skip:
                part.error = (number, bad.problem, bad.advice)
                return part
            part.skipped.append((number, bad.problem))
            continue
        part.conversations.append(Conversation(messages=messages, source=source, line=number))
    return part


# --- reading the file ---------------------------------------------------------------------------

_Record = tuple[int, Any | _BadRecord]


def _read_text(source: str) -> str:
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise DataError(source, None, "no such file", "check the path") from None
    except IsADirectoryError:
        raise DataError(source, None, "is a directory", "pass a .jsonl or .json file") from None
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror})"
        raise DataError(source, None, problem, "check the path and its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = f"not valid UTF-8 (byte 0x{data[exc.start]:02x})"
        raise DataError(source, line, problem, "save the file as UTF-8") from None
    # Editors on Windows often save UTF-8 with a byte-order mark, which json rejects.
    text = text.removeprefix("\ufeff")
    if _WHITESPACE_RUN.match(text).end() == len(text):
        raise DataError(source, None, "the file is empty", "give a JSON array of records or one JSON record per line")
    return text


def _records(source: str, text: str) -> Iterator[_Record]:
    start = _WHITESPACE_RUN.match(text).end()
    if text[start] == "[":
        return _array_records(source, text, start)
    if text[start] == "{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass  # the usual JSON Lines case: the second record is "extra data"
        else:
            return iter([(text.count("\n", 0, start) + 1, whole)])
    return _jsonl_records(text)


def _jsonl_records(text: str) -> Iterator[_Record]:
    # Split on "\n" only: str.splitlines would also split on U+2028 and friends, which JSON allows
    # raw inside strings, and would break those records and every later line number.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip(_JSON_WHITESPACE):
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield number, _BadRecord(f"invalid JSON ({exc.msg} at column {exc.colno})", _SKIP_ADVICE)


def _array_records(source: str, text: str, start: int) -> Iterator[_Record]:
    """Decode the array one element at a time so each record knows the line it starts on."""
    decoder = json.JSONDecoder()
    counted_to, line = 0, 1

    def line_at(pos: int) -> int:
        nonlocal counted_to, line
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    def broken(pos: int, what: str) -> DataError:
        column = pos - text.rfind("\n", 0, pos)
        return DataError(source, line_at(pos), f"invalid JSON ({what} at column {column})", _ARRAY_ADVICE)

    pos = _WHITESPACE_RUN.match(text, start + 1).end()
    if text.startswith("]", pos):
        raise DataError(source, line_at(pos), "the JSON array is empty", "add at least one record")
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(
                source, exc.lineno, f"invalid JSON ({exc.msg} at column {exc.colno})", _ARRAY_ADVICE
            ) from None
        yield line_at(pos), value
        pos = _WHITESPACE_RUN.match(text, end).end()
        if pos == len(text):
            raise broken(pos, 'the array is not closed with "]"')
        if text[pos] == "]":
            after = _WHITESPACE_RUN.match(text, pos + 1).end()
            if after < len(text):
                raise broken(after, 'extra data after the closing "]"')
            return
        if text[pos] != ",":
            raise broken(pos, "Expecting ',' delimiter")
        comma = pos
        pos = _WHITESPACE_RUN.match(text, pos + 1).end()
        if text.startswith("]", pos):
            raise broken(comma, 'trailing comma before "]"')


# --- recognising a record -----------------------------------------------------------------------


def _formats_marked(record: dict) -> list[str]:
    return [name for name, f in _formats().items() if f.marker_key in record]


def _as_object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise _BadRecord(f"the record is {_kind(value)}", "make each record a JSON object")
    return value


def _detect_or_explain(record: dict) -> str:
    found = _formats_marked(record)
    if len(found) == 1:
        return found[0]
    if found:
        raise _BadRecord(
            f"the record has the keys of several formats ({', '.join(found)})",
            "keep one, or choose the format explicitly",
        )
    markers = ", ".join(f'"{f.marker_key}"' for f in _formats().values())
    keys = ", ".join(_quote(key) for key in list(record)[:4]) + (", ..." if len(record) > 4 else "")
    has = f"it has {keys}" if record else "it is empty"
    raise _BadRecord(
        f"the record has none of the keys {markers} ({has})",
        f"use one of the formats {', '.join(_formats())}",
    )


def _check_format(record: dict, chosen: str, origin: int | None) -> None:
    found = _formats_marked(record)
    if chosen in found:
        return
    if origin is None:
        expected, advice = f"the requested {chosen} format", 'choose the file\'s format or use "auto"'
    else:
        expected, advice = f"{chosen} like line {origin}", "use one format per file"
    if found:
        raise _BadRecord(f"the record is in {found[0]} format, not {expected}", advice)
    raise _BadRecord(f'the record has no "{_formats()[chosen].marker_key}" key, expected for {expected}', advice)


# --- normalising each format --------------------------------------------------------------------

# (label for error messages, role, content)
_Item = tuple[str, str, str]


def _from_messages(record: dict) -> list[dict[str, str]]:
    items: list[_Item] = []
    for index, entry in enumerate(_list_field(record, "messages", '{"role", "content"}'), start=1):
        label = f"message {index}"
        _require_object(entry, label, '"role" and "content"')
        if "role" not in entry:
            raise _BadRecord(f'{label} has no "role"', f"add one of {', '.join(ROLES)}")
        role = entry["role"]
        if role not in ROLES:
            raise _BadRecord(f"{label} has role {_quote(role)}", f"expected one of {', '.join(ROLES)}")
        items.append((label, role, _text(entry, "content", label)))
    return _validated(items)


def _from_sharegpt(record: dict) -> list[dict[str, str]]:
    names = ", ".join(_SHAREGPT_ROLES)
    items: list[_Item] = []
    for index, entry in enumerate(_list_field(record, "conversations", '{"from", "value"}'), start=1):
        label = f"message {index}"
        _require_object(entry, label, '"from" and "value"')
        if "from" not in entry:
            raise _BadRecord(f'{label} has no "from"', f"add one of {names}")
        speaker = entry["from"]
        if not isinstance(speaker, str) or speaker not in _SHAREGPT_ROLES:
            raise _BadRecord(f'{label} has "from" {_quote(speaker)}', f"expected one of {names}")
        items.append((label, _SHAREGPT_ROLES[speaker], _text(entry, "value", label)))
    system = _optional_text(record, "system", None)
    if system:
        if items and items[0][1] == "system":
            raise _BadRecord('the record has both a "system" field and a system message (message 1)', "keep only one")
        items.insert(0, ('"system"', "system", system))
    return _validated(items)


def _from_conversation(record: dict) -> list[dict[str, str]]:
    system = ""
    items: list[_Item] = []
    for index, turn in enumerate(_list_field(record, "conversation", '{"input", "output"}'), start=1):
        label = f"turn {index}"
        _require_object(turn, label, '"input" and "output"')
        # XTuner only renders a turn's system text when it is non-empty.
        system = _optional_text(turn, "system", label) or system
        items.append((f'{label} "input"', "user", _text(turn, "input", label)))
        items.append((f'{label} "output"', "assistant", _text(turn, "output", label)))
    if system:
        items.insert(0, ('"system"', "system", system))
    return _validated(items)


def _from_alpaca(record: dict) -> list[dict[str, str]]:
    items: list[_Item] = []
    system = _optional_text(record, "system", None)
    if system:
        items.append(('"system"', "system", system))
    history = record.get("history")
    if history is not None and not isinstance(history, list):
        raise _BadRecord(f'"history" is {_kind(history)}', "expected a list of [question, answer] pairs")
    for index, pair in enumerate(history or [], start=1):
        label = f'"history" item {index}'
        if not (isinstance(pair, list) and len(pair) == 2):
            shape = f"an array of {len(pair)}" if isinstance(pair, list) else _kind(pair)
            raise _BadRecord(f"{label} is {shape}", "expected a [question, answer] pair of strings")
        for part, role, text in (("question", "user", pair[0]), ("answer", "assistant", pair[1])):
            if not isinstance(text, str):
                raise _BadRecord(f"{label} {part} is {_kind(text)}", "expected a string")
            items.append((f"{label} {part}", role, text))
    instruction = _text(record, "instruction", None)
    extra = _optional_text(record, "input", None)
    items.append(('"instruction"', "user", "\n".join(part for part in (instruction, extra) if part)))
    items.append(('"output"', "assistant", _text(record, "output", None)))
    return _validated(items)


_NORMALISERS: dict[str, Callable[[dict], list[dict[str, str]]]] = {
    "conversation": _from_conversation,
    "messages": _from_messages,
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
}


def _formats() -> dict:
    """Every data format by name: the four above (registered by ``famtune.builtins``) and plugins' own."""
    from famtune.plugins import get_plugins

    return get_plugins().data_formats()


def _to_messages(name: str, record: dict) -> list[dict[str, str]]:
    fmt = _formats()[name]
    if name in _NORMALISERS and fmt.to_messages is _NORMALISERS[name]:
        return fmt.to_messages(record)
    # A plugin's format: its errors become this record's error, its output is checked like "messages".
    try:
        messages = fmt.to_messages(record)
    except (ValueError, KeyError, TypeError) as exc:
        raise _BadRecord(f"{name} record: {exc}", f"fix the record to match the {name} format") from None
    return _from_messages({"messages": messages})


def _validated(items: list[_Item]) -> list[dict[str, str]]:
    body = items[1:] if items and items[0][1] == "system" else items
    if not body:
        raise _BadRecord(
            "the conversation has no user or assistant messages",
            "add at least one user message and its assistant reply",
        )
    for position, (label, role, content) in enumerate(body):
        if role == "system":
            raise _BadRecord(f"{label} is a system message after the first message", "move it to the start")
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise _BadRecord(
                f"{label} is {_A_ROLE[role]} message where {_A_ROLE[expected]} message was expected",
                "user and assistant messages must alternate, starting with user",
            )
        if role == "assistant" and content == "":
            raise _BadRecord(f"{label} is an empty assistant reply", "write the reply or remove the exchange")
    last_label, last_role, _ = body[-1]
    if last_role != "assistant":
        raise _BadRecord(
            f"the conversation ends with a user message ({last_label})",
            "add the assistant reply or remove that message",
        )
    return [{"role": role, "content": content} for _, role, content in items]


# --- field helpers ------------------------------------------------------------------------------


def _list_field(record: dict, key: str, entry_shape: str) -> list:
    value = record[key]
    if not isinstance(value, list):
        raise _BadRecord(f'"{key}" is {_kind(value)}', f"expected a list of {entry_shape} objects")
    if not value:
        raise _BadRecord(f'"{key}" is empty', "add at least one user message and its assistant reply")
    return value


def _require_object(entry: Any, label: str, keys: str) -> None:
    if not isinstance(entry, dict):
        raise _BadRecord(f"{label} is {_kind(entry)}", f"expected an object with {keys}")


def _text(obj: dict, key: str, label: str | None) -> str:
    owner = label or "the record"
    if key not in obj:
        raise _BadRecord(f'{owner} has no "{key}"', f'add "{key}" as a string')
    value = obj[key]
    if not isinstance(value, str):
        where = f'{label} "{key}"' if label else f'"{key}"'
        raise _BadRecord(f"{where} is {_kind(value)}", "expected a string")
    return value


def _optional_text(obj: dict, key: str, label: str | None) -> str:
    if obj.get(key) is None:
        return ""
    return _text(obj, key, label)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _quote(value: Any, limit: int = 60) -> str:
    """The user's value as JSON (so it stays on one line), shortened if long."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
