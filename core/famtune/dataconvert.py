"""``famtune data convert``: spreadsheets and other chat data files into famtune JSONL.

Tables (.xlsx, .csv, .tsv, .parquet) are read through pandas (the ``famtune[data]`` extra), every
cell as it is stored (``dtype=object``), so nothing is guessed or rounded on the way. Columns are
found by header name. A row becomes one conversation: optional system prompt, optional earlier
turns (a JSON list of ``[question, answer]`` pairs), then the question and its answer.

Nothing is dropped silently: an empty question or answer is a ``FILE:ROW`` error (or, with
``skip_bad_rows``, skipped and listed); fully blank rows, which spreadsheets often carry at their
end, are counted; cells that are not text (numbers, dates) are written as text and counted.
JSON/JSONL input in any format famtune reads is re-written in the chosen output format.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from famtune.errors import FamtuneError

TABLE_SUFFIXES = (".xlsx", ".csv", ".tsv", ".parquet")
JSON_SUFFIXES = (".json", ".jsonl")
OUTPUT_FORMATS = ("messages", "conversation")
# Header names tried, in order, when --question / --answer are not given (case-insensitive).
QUESTION_COLUMNS = ("question", "input", "instruction", "prompt", "query", "问题", "输入")
ANSWER_COLUMNS = ("answer", "output", "response", "回答", "答案", "输出")
SYSTEM_COLUMNS = ("system", "system_prompt", "系统提示")
INSTALL_HINT = "install famtune[data] (pip install 'famtune[data]')"


@dataclass
class ColumnMap:
    question: str | None = None
    answer: str | None = None
    system: str | None = None  # a column name, or else a literal system prompt for every row
    history: str | None = None


@dataclass
class ConvertReport:
    source: str
    output: str
    fmt: str
    written: int = 0
    blank_rows: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    non_text_cells: list[tuple[int, str, str]] = field(default_factory=list)  # row, column, type
    columns: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"wrote {self.written} conversations ({self.fmt} format) to {self.output}"]
        if self.columns:
            out.append("columns: " + ", ".join(f"{k} <- {v!r}" for k, v in self.columns.items()))
        if self.blank_rows:
            out.append(f"{len(self.blank_rows)} blank rows left out ({self.source}:{_rows(self.blank_rows)})")
        if self.non_text_cells:
            first = self.non_text_cells[0]
            out.append(
                f"{len(self.non_text_cells)} non-text cells written as text "
                f"(first: {self.source}:{first[0]} column {first[1]!r}, a {first[2]})"
            )
        for row, why in self.skipped:
            out.append(f"skipped {self.source}:{row}: {why}")
        if self.skipped:
            out.append(f"{len(self.skipped)} rows skipped")
        return out


def _rows(rows: list[int], limit: int = 8) -> str:
    shown = ",".join(map(str, rows[:limit]))
    return shown + (f",... ({len(rows) - limit} more)" if len(rows) > limit else "")


def convert_file(
    src: str, dst: str, fmt: str = "messages", columns: ColumnMap | None = None, skip_bad_rows: bool = False
) -> ConvertReport:
    """Convert ``src`` into JSONL at ``dst`` in ``fmt``; the result is read back by famtune's data reader."""
    from famtune.data import read_conversations

    if fmt not in OUTPUT_FORMATS:
        raise FamtuneError(f"output format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    columns = columns or ColumnMap()
    suffix = Path(src).suffix.lower()
    if not Path(src).is_file():
        raise FamtuneError(f"{src}: no such file")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise FamtuneError(f"{dst}: the output would overwrite the input; choose another output file")
    report = ConvertReport(source=src, output=dst, fmt=fmt)
    if suffix in JSON_SUFFIXES:
        if any((columns.question, columns.answer, columns.history)):
            raise FamtuneError(
                f"{src}: --question/--answer/--history name spreadsheet columns; a JSON file "
                "carries its own conversations"
            )
        read = read_conversations(src, "auto", skip_bad_records=skip_bad_rows)
        report.skipped = list(read.skipped)
        conversations = []
        for conv in read.conversations:
            msgs = conv.messages
            if columns.system is not None and not (msgs and msgs[0]["role"] == "system"):
                msgs = [{"role": "system", "content": columns.system}, *msgs]
            conversations.append(msgs)
    elif suffix in TABLE_SUFFIXES:
        header, rows = read_table(src)
        conversations = _table_conversations(src, header, rows, columns, skip_bad_rows, report)
    else:
        raise FamtuneError(
            f"{src}: cannot convert {suffix or 'a file without extension'}; "
            f"expected one of {', '.join(TABLE_SUFFIXES + JSON_SUFFIXES)}"
        )
    if not conversations:
        raise FamtuneError(f"{src}: no conversation to write (every row was blank or skipped)")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        for msgs in conversations:
            f.write(json.dumps(to_record(msgs, fmt), ensure_ascii=False) + "\n")
    report.written = len(conversations)
    read_conversations(dst, fmt)  # what was written must be what famtune reads
    return report


def to_record(messages: list[dict[str, str]], fmt: str) -> dict[str, Any]:
    """One normalised conversation as a record of ``fmt``."""
    if fmt == "messages":
        return {"messages": messages}
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    turns = []
    for user, assistant in zip(rest[0::2], rest[1::2]):
        turns.append({"input": user["content"], "output": assistant["content"]})
    if system:
        turns[0] = {"system": system, **turns[0]}
    return {"conversation": turns}


def read_table(src: str) -> tuple[list[str], list[list[Any]]]:
    """Header names (as written, duplicates checked) and the data rows of a table file."""
    try:
        import pandas as pd
    except ImportError:
        raise FamtuneError(f"{src}: reading {Path(src).suffix} files needs pandas; {INSTALL_HINT}") from None
    suffix = Path(src).suffix.lower()
    try:
        # header=None: the header row is read as data, so duplicate names reach us unmangled.
        if suffix == ".xlsx":
            try:
                import openpyxl  # noqa: F401
            except ImportError:
                raise FamtuneError(f"{src}: reading .xlsx needs openpyxl; {INSTALL_HINT}") from None
            frame = pd.read_excel(src, header=None, dtype=object, engine="openpyxl")
        elif suffix in (".csv", ".tsv"):
            frame = pd.read_csv(
                src,
                header=None,
                dtype=object,
                keep_default_na=False,
                sep="\t" if suffix == ".tsv" else ",",
                encoding="utf-8-sig",
            )
        else:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise FamtuneError(f"{src}: reading .parquet needs pyarrow; {INSTALL_HINT}") from None
            frame = pd.read_parquet(src)
            header = [str(c) for c in frame.columns]
            return _checked_header(src, header), frame.astype(object).values.tolist()
    except FamtuneError:
        raise
    except Exception as exc:  # pandas/openpyxl raise many types for a damaged file
        raise FamtuneError(
            f"{src}: cannot read ({type(exc).__name__}: {str(exc)[:200]}); "
            "check that the file is not damaged and has the right extension"
        ) from None
    values = frame.values.tolist()
    if not values:
        raise FamtuneError(f"{src}: the file is empty; the first row must name the columns")
    header = ["" if _is_blank(v) else str(v).strip() for v in values[0]]
    return _checked_header(src, header), values[1:]


def _checked_header(src: str, header: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    for i, name in enumerate(header, 1):
        if not name:
            continue
        key = name.lower()
        if key in seen:
            raise FamtuneError(
                f"{src}:1: columns {seen[key]} and {i} are both named {name!r}; "
                "rename one so each column has its own header"
            )
        seen[key] = i
    return header


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        import pandas as pd

        if value is pd.NaT or value is pd.NA:
            return True
    except ImportError:
        pass
    return isinstance(value, str) and not value.strip()


def _find(
    header: list[str], wanted: str | None, candidates: tuple[str, ...], role: str, src: str, option: str
) -> int | None:
    lower = [h.lower() for h in header]
    if wanted is not None:
        if wanted.lower() in lower:
            return lower.index(wanted.lower())
        raise FamtuneError(
            f"{src}:1: no column named {wanted!r} for the {role}; the columns are "
            f"{', '.join(repr(h) for h in header if h)}"
        )
    for name in candidates:
        if name in lower:
            return lower.index(name)
    if option:
        raise FamtuneError(
            f"{src}:1: no {role} column (looked for {', '.join(candidates)}); the columns are "
            f"{', '.join(repr(h) for h in header if h)}; name it with {option} COLUMN"
        )
    return None


def _text(value: Any, row: int, column: str, report: ConvertReport) -> str:
    if isinstance(value, str):
        return value
    report.non_text_cells.append((row, column, type(value).__name__))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 42.0 from a numeric column means 42
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _table_conversations(
    src: str, header: list[str], rows: list[list[Any]], columns: ColumnMap, skip_bad_rows: bool, report: ConvertReport
) -> list[list[dict[str, str]]]:
    q_col = _find(header, columns.question, QUESTION_COLUMNS, "question", src, "--question")
    a_col = _find(header, columns.answer, ANSWER_COLUMNS, "answer", src, "--answer")
    h_col = _find(header, columns.history, (), "history", src, "") if columns.history else None
    lower = [h.lower() for h in header]
    if columns.system is not None and columns.system.lower() in lower:
        s_col, s_text = lower.index(columns.system.lower()), None
    elif columns.system is not None:
        s_col, s_text = None, columns.system  # not a column: the same system prompt for every row
    else:
        s_col, s_text = _find(header, None, SYSTEM_COLUMNS, "system", src, ""), None
    assert q_col is not None and a_col is not None  # _find raises when a required column is missing
    report.columns = {"question": header[q_col], "answer": header[a_col]}
    if s_col is not None:
        report.columns["system"] = header[s_col]
    if h_col is not None:
        report.columns["history"] = header[h_col]
    # The header is spreadsheet row 1, so data row i is row i + 2 (parquet has no header row: i + 1).
    first = 1 if src.lower().endswith(".parquet") else 2
    out = []
    for i, values in enumerate(rows):
        row = i + first
        if all(_is_blank(v) for v in values):
            report.blank_rows.append(row)
            continue
        try:
            out.append(_row_messages(values, row, header, q_col, a_col, s_col, s_text, h_col, report))
        except _BadRow as bad:
            if not skip_bad_rows:
                raise FamtuneError(f"{src}:{row}: {bad}; fill it in or pass --skip-bad-rows") from None
            report.skipped.append((row, str(bad)))
    return out


class _BadRow(Exception):
    pass


def _row_messages(values, row, header, q_col, a_col, s_col, s_text, h_col, report) -> list[dict[str, str]]:
    def cell(col: int, role: str, required: bool) -> str | None:
        value = values[col] if col < len(values) else None
        if _is_blank(value):
            if required:
                raise _BadRow(f"the {role} cell (column {header[col]!r}) is empty")
            return None
        return _text(value, row, header[col], report)

    question, answer = cell(q_col, "question", True), cell(a_col, "answer", True)
    messages = []
    system = cell(s_col, "system", False) if s_col is not None else s_text
    if system:
        messages.append({"role": "system", "content": system})
    if h_col is not None:
        raw = cell(h_col, "history", False)
        for q, a in _history(raw, header[h_col]) if raw else []:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def _history(raw: str, column: str) -> list[tuple[str, str]]:
    try:
        pairs = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _BadRow(f"the history cell (column {column!r}) is not JSON ({exc.msg})") from None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and x for x in p) for p in pairs
    ):
        raise _BadRow(
            f"the history cell (column {column!r}) is not a JSON list of [question, answer] pairs of non-empty text"
        )
    return [(q, a) for q, a in pairs]
