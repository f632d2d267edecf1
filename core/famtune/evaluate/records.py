"""Reading evaluation files: multiple-choice (MCQ) and open-QA records, with ``FILE:LINE`` errors.

Files are JSON Lines or a JSON array, read by the same reader as training data, so a broken line
gets the same one-line ``FILE:LINE: problem; advice`` error.

Multiple choice, two layouts (detected per record):

- MedQA: ``{"question": str, "options": {"A": str, ...}, "answer_idx": "C", "answer": str}``;
  ``answer`` (the option text) must match ``options[answer_idx]`` when given.
- generic: ``{"question": str, "options": {"A": str, ...} | [str, ...], "answer": "C"}``;
  a list of options is lettered A, B, C, ... in order.

Open QA: ``{"question": str, "answer": str}``, or Alpaca's ``{"instruction", "input", "output"}``.
Any record may carry a ``system`` prompt.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from famtune.data import DataError, _BadRecord, _kind, _quote, _read_text, _records

TASKS = ("mcq", "qa")
_ADVICE = "fix the record (the layouts are in docs/users/eval.md)"


@dataclass(frozen=True)
class MCQItem:
    question: str
    options: dict[str, str]  # letter -> option text, in display order
    answer: str  # the correct letter
    line: int
    system: str | None = None


@dataclass(frozen=True)
class QAItem:
    question: str
    answer: str
    line: int
    system: str | None = None


def read_eval_file(path: str, task: str) -> list[Any]:
    """Every record of ``path`` as ``task`` items; the first bad record stops with ``FILE:LINE``."""
    if task not in TASKS:
        raise DataError(path, None, f"unknown eval task {task!r}", f"use one of {', '.join(TASKS)}")
    parse = _mcq if task == "mcq" else _qa
    items = []
    for line, record in _records(path, _read_text(path)):
        try:
            if isinstance(record, _BadRecord):
                raise record
            items.append(parse(record, line))
        except _BadRecord as bad:
            raise DataError(
                path, line, bad.problem, _ADVICE if bad.advice.startswith("fix the line") else bad.advice
            ) from None
    return items


def _field(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        what = "missing" if key not in record else f"{_kind(value)} {_quote(value)}"
        raise _BadRecord(f'"{key}" is {what}; expected a non-empty string', _ADVICE)
    return value


def _system(record: dict) -> str | None:
    value = record.get("system")
    if value is not None and not isinstance(value, str):
        raise _BadRecord(f'"system" is {_kind(value)}; expected a string', _ADVICE)
    return value or None


def _object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise _BadRecord(f"the record is {_kind(record)}; expected a JSON object", _ADVICE)
    return record


def _mcq(record: Any, line: int) -> MCQItem:
    record = _object(record)
    question = _field(record, "question")
    raw = record.get("options")
    if isinstance(raw, list):
        if len(raw) > 26:
            raise _BadRecord(f'"options" has {len(raw)} entries; at most 26 (A-Z)', _ADVICE)
        raw = dict(zip(string.ascii_uppercase, raw))
    if not isinstance(raw, dict) or len(raw) < 2:
        raise _BadRecord(
            f'"options" is {_kind(raw)} {_quote(raw)}; expected at least two options, '
            '{"A": "...", "B": "..."} or a list',
            _ADVICE,
        )
    options: dict[str, str] = {}
    for key, text in raw.items():
        letter = key.strip().upper()
        if len(letter) != 1 or letter not in string.ascii_uppercase:
            raise _BadRecord(f"option key {_quote(key)} is not a letter A-Z", _ADVICE)
        if not isinstance(text, str) or not text.strip():
            raise _BadRecord(f"option {letter} is {_kind(text)} {_quote(text)}; expected a non-empty string", _ADVICE)
        options[letter] = text
    if "answer_idx" in record:  # MedQA: the letter in answer_idx, the option's text in answer
        letter = _field(record, "answer_idx").strip().upper()
        text = record.get("answer")
        if text is not None and letter in options and isinstance(text, str) and text.strip() != options[letter].strip():
            raise _BadRecord(f'"answer" {_quote(text)} is not option {letter} {_quote(options[letter])}', _ADVICE)
    else:
        letter = _field(record, "answer").strip().upper()
    if letter not in options:
        raise _BadRecord(f"the answer {_quote(letter)} is not one of the options {', '.join(options)}", _ADVICE)
    return MCQItem(question, options, letter, line, _system(record))


def _qa(record: Any, line: int) -> QAItem:
    record = _object(record)
    if "instruction" in record:
        inst, extra = _field(record, "instruction"), record.get("input") or ""
        if not isinstance(extra, str):
            raise _BadRecord(f'"input" is {_kind(extra)}; expected a string', _ADVICE)
        return QAItem(inst + ("\n" + extra if extra else ""), _field(record, "output"), line, _system(record))
    return QAItem(_field(record, "question"), _field(record, "answer"), line, _system(record))
