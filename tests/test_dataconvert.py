"""famtune data convert: real spreadsheets (openpyxl, pandas) into JSONL famtune reads, with every
blank, skipped or non-text cell reported and bad rows named FILE:ROW."""

from __future__ import annotations

import datetime
import json

import pytest

from conftest import famtune_cli
from famtune.data import read_conversations
from famtune.dataconvert import ColumnMap, convert_file
from famtune.errors import FamtuneError


def _xlsx(path, rows):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    for row in rows:
        ws.append(row)
    wb.save(path)
    return path


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_xlsx_to_messages_through_the_cli(tmp_path):
    src = _xlsx(
        tmp_path / "qa.xlsx",
        [
            ["问题", "回答", "备注"],
            ["你是谁？", "我是小助手。", "x"],
            ["1+1等于几？", 2, None],  # a numeric answer cell
            [None, None, None],  # a blank row in the middle
            ["What day?", datetime.datetime(2026, 12, 6), None],
        ],
    )
    out = tmp_path / "out.jsonl"
    res = famtune_cli("data", "convert", src, out, "--system", "你是一个乐于助人的助手。")
    records = _jsonl(out)
    assert records[0] == {
        "messages": [
            {"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "你是谁？"},
            {"role": "assistant", "content": "我是小助手。"},
        ]
    }
    assert records[1]["messages"][2]["content"] == "2"
    assert records[2]["messages"][2]["content"] == "2026-12-06T00:00:00"
    assert len(records) == 3
    assert "wrote 3 conversations" in res.stdout
    assert f"1 blank rows left out ({src}:4)" in res.stdout
    assert f"2 non-text cells written as text (first: {src}:3 column '回答', a int)" in res.stdout
    assert read_conversations(str(out)).format == "messages"


def test_empty_answer_is_a_file_row_error_or_skipped_and_counted(tmp_path):
    src = _xlsx(tmp_path / "qa.xlsx", [["question", "answer"], ["q1", "a1"], ["q2", "  "], ["q3", "a3"]])
    res = famtune_cli("data", "convert", src, tmp_path / "o.jsonl", check=False)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"famtune: error: {src}:3: the answer cell (column 'answer') is empty; fill it in or pass --skip-bad-rows"
    )
    report = convert_file(str(src), str(tmp_path / "o.jsonl"), skip_bad_rows=True)
    assert report.written == 2 and report.skipped == [(3, "the answer cell (column 'answer') is empty")]
    assert any("1 rows skipped" in line for line in report.lines())


def test_duplicate_headers_are_an_error(tmp_path):
    src = _xlsx(tmp_path / "dup.xlsx", [["question", "answer", "Question"], ["q", "a", "q2"]])
    with pytest.raises(FamtuneError, match=r"dup.xlsx:1: columns 1 and 3 are both named 'Question'"):
        convert_file(str(src), str(tmp_path / "o.jsonl"))


def test_missing_column_names_the_columns(tmp_path):
    src = _xlsx(tmp_path / "c.xlsx", [["q", "a"], ["x", "y"]])
    with pytest.raises(FamtuneError, match=r"no question column .*the columns are 'q', 'a'; name it with --question"):
        convert_file(str(src), str(tmp_path / "o.jsonl"))
    report = convert_file(str(src), str(tmp_path / "o.jsonl"), columns=ColumnMap(question="q", answer="a"))
    assert report.written == 1


def test_csv_with_history_and_system_column_to_conversation(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text(
        'instruction,output,system,history\nand then?,then B,be brief,"[[""first?"", ""A""]]"\nsolo,ok,,\n',
        encoding="utf-8",
    )
    out = tmp_path / "d.jsonl"
    convert_file(str(src), str(out), fmt="conversation", columns=ColumnMap(history="history"))
    records = _jsonl(out)
    assert records[0] == {
        "conversation": [
            {"system": "be brief", "input": "first?", "output": "A"},
            {"input": "and then?", "output": "then B"},
        ]
    }
    assert records[1] == {"conversation": [{"input": "solo", "output": "ok"}]}
    assert read_conversations(str(out)).format == "conversation"
    src.write_text("question,answer,history\nq,a,[not json\n", encoding="utf-8")
    with pytest.raises(FamtuneError, match=r"d.csv:2: the history cell \(column 'history'\) is not JSON"):
        convert_file(str(src), str(out), columns=ColumnMap(history="history"))


def test_tsv_and_parquet(tmp_path):
    import pandas as pd

    tsv = tmp_path / "d.tsv"
    tsv.write_text("question\tanswer\nhi\thello\n", encoding="utf-8")
    convert_file(str(tsv), str(tmp_path / "t.jsonl"))
    assert _jsonl(tmp_path / "t.jsonl")[0]["messages"][1]["content"] == "hello"
    pq = tmp_path / "d.parquet"
    pd.DataFrame({"question": ["a", None], "answer": ["b", "c"]}).to_parquet(pq)
    with pytest.raises(FamtuneError, match=r"d.parquet:2: the question cell"):
        convert_file(str(pq), str(tmp_path / "p.jsonl"))


def test_json_of_another_format_is_rewritten(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(
        json.dumps([{"instruction": "say hi", "input": "", "output": "hi", "history": [["q0", "a0"]]}]),
        encoding="utf-8",
    )
    convert_file(str(src), str(tmp_path / "m.jsonl"), fmt="conversation")
    assert _jsonl(tmp_path / "m.jsonl") == [
        {"conversation": [{"input": "q0", "output": "a0"}, {"input": "say hi", "output": "hi"}]}
    ]


def test_unknown_extension(tmp_path):
    src = tmp_path / "x.docx"
    src.write_text("")
    with pytest.raises(FamtuneError, match=r"cannot convert \.docx; expected one of \.xlsx"):
        convert_file(str(src), str(tmp_path / "o.jsonl"))


def test_without_pandas_the_error_says_what_to_install(tmp_path):
    import subprocess
    import sys

    src = _xlsx(tmp_path / "qa.xlsx", [["question", "answer"], ["q", "a"]])
    code = (
        "import sys; sys.modules['pandas'] = None; from famtune.cli import main; "
        f"sys.exit(main(['data', 'convert', {str(src)!r}, {str(tmp_path / 'o.jsonl')!r}]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"famtune: error: {src}: reading .xlsx files needs pandas; install famtune[data] (pip install 'famtune[data]')"
    )
