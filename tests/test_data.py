"""famtune.data: four dataset formats, JSON and JSONL, read into one normalised shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from famtune.data import FORMATS, Conversation, ReadReport, detect_format, read_conversations
from famtune.errors import FamtuneError

# The same two conversations written in each format. The expected messages are spelled out by hand.
EXPECTED = [
    [
        {"role": "system", "content": "You are a translator."},
        {"role": "user", "content": "Say hello in French."},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "Translate to French:\nGood night"},
        {"role": "assistant", "content": "Bonne nuit."},
    ],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
]
RECORDS = {
    "conversation": [
        {
            "conversation": [
                {"system": "You are a translator.", "input": "Say hello in French.", "output": "Bonjour."},
                {"input": "Translate to French:\nGood night", "output": "Bonne nuit."},
            ]
        },
        {"conversation": [{"input": "2+2?", "output": "4"}]},
    ],
    "messages": [
        {
            "messages": [
                {"role": "system", "content": "You are a translator."},
                {"role": "user", "content": "Say hello in French."},
                {"role": "assistant", "content": "Bonjour."},
                {"role": "user", "content": "Translate to French:\nGood night"},
                {"role": "assistant", "content": "Bonne nuit."},
            ]
        },
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ],
    "alpaca": [
        {
            "system": "You are a translator.",
            "history": [["Say hello in French.", "Bonjour."]],
            "instruction": "Translate to French:",
            "input": "Good night",
            "output": "Bonne nuit.",
        },
        {"instruction": "2+2?", "input": "", "output": "4"},
    ],
    "sharegpt": [
        {
            "system": "You are a translator.",
            "conversations": [
                {"from": "human", "value": "Say hello in French."},
                {"from": "gpt", "value": "Bonjour."},
                {"from": "human", "value": "Translate to French:\nGood night"},
                {"from": "gpt", "value": "Bonne nuit."},
            ],
        },
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ],
}
GOOD = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_json(path: Path, records: list) -> str:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(path)


def read_error(path: str, **kwargs) -> str:
    with pytest.raises(FamtuneError) as info:
        read_conversations(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """Work from tmp_path so paths (and messages) read like a user's: data/train.jsonl."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


# --- every format, both layouts -------------------------------------------------------------------


@pytest.mark.parametrize("writer", [write_jsonl, write_json], ids=["jsonl", "json"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_messages(tmp_path, fmt, writer):
    # A .txt name: the layout is detected from the content, never from the extension.
    path = writer(tmp_path / "train.txt", RECORDS[fmt])
    report = read_conversations(path)
    assert isinstance(report, ReadReport)
    assert report.format == fmt
    assert report.skipped == []
    assert [c.messages for c in report.conversations] == EXPECTED
    assert all(isinstance(c, Conversation) and c.source == path for c in report.conversations)


@pytest.mark.parametrize("fmt", FORMATS)
def test_forced_format_reads_its_own_records(tmp_path, fmt):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS[fmt])
    report = read_conversations(path, fmt=fmt)
    assert report.format == fmt
    assert [c.messages for c in report.conversations] == EXPECTED
    assert [c.line for c in report.conversations] == [1, 2]


def test_detect_format():
    assert detect_format(RECORDS["conversation"][0]) == "conversation"
    assert detect_format(RECORDS["messages"][0]) == "messages"
    assert detect_format(RECORDS["alpaca"][0]) == "alpaca"
    assert detect_format(RECORDS["sharegpt"][0]) == "sharegpt"
    assert detect_format({"instruction": "q"}) == "alpaca"  # broken, but recognisably alpaca
    assert detect_format({"prompt": "q", "response": "a"}) is None
    assert detect_format({"messages": [], "conversations": []}) is None
    assert detect_format({}) is None


def test_forced_format_picks_between_ambiguous_keys(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "from messages"}, {"role": "assistant", "content": "m"}],
        "conversations": [{"from": "human", "value": "from sharegpt"}, {"from": "gpt", "value": "s"}],
    }
    path = write_jsonl(tmp_path / "train.jsonl", [record])
    report = read_conversations(path, fmt="sharegpt")
    assert report.conversations[0].messages == [
        {"role": "user", "content": "from sharegpt"},
        {"role": "assistant", "content": "s"},
    ]
    assert read_error(path) == (
        f"{path}:1: the record has the keys of several formats (messages, sharegpt); "
        "keep one, or choose the format explicitly"
    )


def test_forced_format_rejects_other_records(data_dir):
    write_jsonl(data_dir / "train.jsonl", RECORDS["messages"])
    assert read_error("data/train.jsonl", fmt="alpaca") == (
        "data/train.jsonl:1: the record is in messages format, not the requested alpaca format; "
        'choose the file\'s format or use "auto"'
    )
    (data_dir / "plain.jsonl").write_text('{"text": "hello"}\n')
    assert read_error("data/plain.jsonl", fmt="sharegpt") == (
        'data/plain.jsonl:1: the record has no "conversations" key, expected for the requested sharegpt '
        'format; choose the file\'s format or use "auto"'
    )


def test_unknown_format_name_lists_the_valid_ones():
    with pytest.raises(FamtuneError) as info:
        read_conversations("does-not-matter.jsonl", fmt="csv")
    assert (
        str(info.value) == 'unknown data format "csv"; expected one of auto, conversation, messages, alpaca, sharegpt'
    )


# --- multi-turn normalisation ---------------------------------------------------------------------


def test_multi_turn_sharegpt(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."},
            {"from": "user", "value": "And of Italy?"},
            {"from": "assistant", "value": "Rome."},
            {"from": "human", "value": "Thanks!"},
            {"from": "gpt", "value": "You're welcome."},
        ],
        "id": "extra keys are ignored",
    }
    report = read_conversations(write_jsonl(tmp_path / "sharegpt.jsonl", [record]))
    assert report.format == "sharegpt"
    assert report.conversations[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]


def test_multi_turn_xtuner_conversation(tmp_path):
    records = [
        {
            "conversation": [
                {"system": "Be brief.", "input": "Capital of France?", "output": "Paris."},
                {"input": "And of Italy?", "output": "Rome."},
                {"system": "", "input": "Thanks!", "output": "You're welcome."},
            ]
        },
        # A system on a later turn overrides the earlier one.
        {
            "conversation": [
                {"system": "first", "input": "q1", "output": "a1"},
                {"system": "second", "input": "q2", "output": "a2"},
            ]
        },
        # XTuner's incremental pre-training records have an empty input.
        {"conversation": [{"input": "", "output": "plain text"}]},
    ]
    report = read_conversations(write_json(tmp_path / "xtuner.json", records))
    assert report.format == "conversation"
    assert [c.messages for c in report.conversations] == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        [
            {"role": "system", "content": "second"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"},
        ],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": "plain text"}],
    ]


def test_alpaca_joining_rule(tmp_path):
    records = [
        {"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
        {"instruction": "Summarise.", "input": "", "output": "Short."},
        {"instruction": "Summarise.", "output": "Short.", "input": None, "system": None, "history": None},
        {"instruction": "", "input": "Only input.", "output": "Short."},
        {"instruction": "Summarise.", "output": "Short.", "system": ""},
    ]
    report = read_conversations(write_jsonl(tmp_path / "alpaca.jsonl", records))
    assert [c.messages[0]["content"] for c in report.conversations] == [
        "Summarise.\nA long text.",
        "Summarise.",
        "Summarise.",
        "Only input.",
        "Summarise.",
    ]
    assert all(len(c.messages) == 2 for c in report.conversations)


def test_chinese_and_other_unicode_round_trip(tmp_path):
    # U+2028 is legal raw inside a JSON string; splitting lines on it would break the record.
    question = "请用一句话介绍一下上海。\u2028第二行"
    answer = "上海是中国的经济中心 🏙️，位于长江入海口。"
    records = [
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！有什么可以帮你？"}]},
    ]
    for path in (write_jsonl(tmp_path / "zh.jsonl", records), write_json(tmp_path / "zh.json", records)):
        report = read_conversations(path)
        assert report.conversations[0].messages == [
            {"role": "user", "content": "请用一句话介绍一下上海。\u2028第二行"},
            {"role": "assistant", "content": "上海是中国的经济中心 🏙️，位于长江入海口。"},
        ]
        assert report.conversations[1].messages[1]["content"] == "你好！有什么可以帮你？"
    assert [c.line for c in read_conversations(str(tmp_path / "zh.jsonl")).conversations] == [1, 2]


def test_chinese_values_are_quoted_unescaped_in_errors(data_dir):
    (data_dir / "train.jsonl").write_text('{"messages": [{"role": "用户", "content": "你好"}]}\n', encoding="utf-8")
    assert read_error("data/train.jsonl") == (
        'data/train.jsonl:1: message 1 has role "用户"; expected one of system, user, assistant'
    )


# --- one exact message for each kind of bad record ------------------------------------------------

BAD_RECORDS = [
    # (id, file lines, expected "LINE: problem; advice")
    (
        "invalid-json",
        [GOOD, '{"messages": [{"role": "user" "content": "q"}]}'],
        "2: invalid JSON (Expecting ',' delimiter at column 31); fix the line or pass --skip-bad-records",
    ),
    ("not-an-object", [GOOD, '["q", "a"]'], "2: the record is an array; make each record a JSON object"),
    (
        "no-known-keys",
        ['{"prompt": "q", "response": "a"}'],
        '1: the record has none of the keys "conversation", "messages", "instruction", "conversations" '
        '(it has "prompt", "response"); use one of the formats conversation, messages, alpaca, sharegpt',
    ),
    (
        "mixed-formats",
        [GOOD, '{"instruction": "q", "output": "a"}'],
        "2: the record is in alpaca format, not messages like line 1; use one format per file",
    ),
    (
        "missing-format-key",
        [GOOD, "", '{"text": "q"}'],
        '3: the record has no "messages" key, expected for messages like line 1; use one format per file',
    ),
    (
        "unknown-role",
        [
            GOOD,
            "",
            '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, '
            '{"role": "bot", "content": "a"}]}',
        ],
        '3: message 3 has role "bot"; expected one of system, user, assistant',
    ),
    (
        "role-not-a-string",
        ['{"messages": [{"role": 1, "content": "q"}]}'],
        "1: message 1 has role 1; expected one of system, user, assistant",
    ),
    (
        "missing-role",
        ['{"messages": [{"content": "q"}]}'],
        '1: message 1 has no "role"; add one of system, user, assistant',
    ),
    (
        "missing-content",
        ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}'],
        '1: message 2 has no "content"; add "content" as a string',
    ),
    (
        "content-not-a-string",
        ['{"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}'],
        '1: message 1 "content" is an array; expected a string',
    ),
    (
        "content-null",
        ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}'],
        '1: message 2 "content" is null; expected a string',
    ),
    (
        "messages-not-a-list",
        ['{"messages": {"role": "user", "content": "q"}}'],
        '1: "messages" is an object; expected a list of {"role", "content"} objects',
    ),
    (
        "messages-empty",
        ['{"messages": []}'],
        '1: "messages" is empty; add at least one user message and its assistant reply',
    ),
    (
        "message-not-an-object",
        ['{"messages": ["hello"]}'],
        '1: message 1 is a string; expected an object with "role" and "content"',
    ),
    (
        "system-not-first",
        [
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
            '{"role": "system", "content": "s"}]}'
        ],
        "1: message 3 is a system message after the first message; move it to the start",
    ),
    (
        "two-user-messages",
        [
            '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": "a"}]}'
        ],
        "1: message 2 is a user message where an assistant message was expected; "
        "user and assistant messages must alternate, starting with user",
    ),
    (
        "starts-with-assistant",
        ['{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}'],
        "1: message 2 is an assistant message where a user message was expected; "
        "user and assistant messages must alternate, starting with user",
    ),
    (
        "ends-with-user",
        [
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, '
            '{"role": "user", "content": "q2"}]}'
        ],
        "1: the conversation ends with a user message (message 3); add the assistant reply or remove that message",
    ),
    (
        "only-system",
        ['{"messages": [{"role": "system", "content": "s"}]}'],
        "1: the conversation has no user or assistant messages; add at least one user message and its assistant reply",
    ),
    (
        "empty-assistant",
        ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}'],
        "1: message 2 is an empty assistant reply; write the reply or remove the exchange",
    ),
    (
        "several-formats",
        ['{"messages": [], "conversations": []}'],
        "1: the record has the keys of several formats (messages, sharegpt); keep one, or choose the format explicitly",
    ),
    (
        "sharegpt-unknown-from",
        ['{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}'],
        '1: message 2 has "from" "bot"; expected one of human, gpt, system, user, assistant',
    ),
    (
        "sharegpt-missing-value",
        ['{"conversations": [{"from": "human"}]}'],
        '1: message 1 has no "value"; add "value" as a string',
    ),
    (
        "sharegpt-two-systems",
        [
            '{"system": "s1", "conversations": [{"from": "system", "value": "s2"}, '
            '{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
        ],
        '1: the record has both a "system" field and a system message (message 1); keep only one',
    ),
    (
        "sharegpt-system-not-a-string",
        ['{"system": 7, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'],
        '1: "system" is a number; expected a string',
    ),
    (
        "alpaca-missing-output",
        ['{"instruction": "q", "input": ""}'],
        '1: the record has no "output"; add "output" as a string',
    ),
    (
        "alpaca-empty-output",
        ['{"instruction": "q", "output": ""}'],
        '1: "output" is an empty assistant reply; write the reply or remove the exchange',
    ),
    (
        "alpaca-input-not-a-string",
        ['{"instruction": "q", "input": ["x"], "output": "a"}'],
        '1: "input" is an array; expected a string',
    ),
    (
        "alpaca-history-not-a-pair",
        ['{"instruction": "q", "output": "a", "history": [["q0", "a0", "extra"]]}'],
        '1: "history" item 1 is an array of 3; expected a [question, answer] pair of strings',
    ),
    (
        "alpaca-history-answer-not-a-string",
        ['{"instruction": "q", "output": "a", "history": [["q0", "a0"], ["q1", 5]]}'],
        '1: "history" item 2 answer is a number; expected a string',
    ),
    (
        "alpaca-history-empty-answer",
        ['{"instruction": "q", "output": "a", "history": [["q0", ""]]}'],
        '1: "history" item 1 answer is an empty assistant reply; write the reply or remove the exchange',
    ),
    (
        "xtuner-missing-output",
        ['{"conversation": [{"input": "q1", "output": "a1"}, {"input": "q2"}]}'],
        '1: turn 2 has no "output"; add "output" as a string',
    ),
    (
        "xtuner-turn-not-an-object",
        ['{"conversation": [["q", "a"]]}'],
        '1: turn 1 is an array; expected an object with "input" and "output"',
    ),
    (
        "xtuner-input-not-a-string",
        ['{"conversation": [{"input": 3, "output": "a"}]}'],
        '1: turn 1 "input" is a number; expected a string',
    ),
    (
        "xtuner-empty-output",
        ['{"conversation": [{"input": "q", "output": ""}]}'],
        '1: turn 1 "output" is an empty assistant reply; write the reply or remove the exchange',
    ),
]


@pytest.mark.parametrize("lines, expected", [case[1:] for case in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_message(data_dir, lines, expected):
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_error("data/train.jsonl") == f"data/train.jsonl:{expected}"


@pytest.mark.parametrize("lines, expected", [case[1:] for case in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_is_skipped_and_reported(data_dir, lines, expected):
    # A good sharegpt record after each bad one: the skipped record must not decide the format
    # unless it was read cleanly, so this one survives whatever came before it.
    survivor = '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
    if lines[0] == GOOD:
        survivor = GOOD
    (data_dir / "train.jsonl").write_text("\n".join(lines + [survivor]) + "\n", encoding="utf-8")
    report = read_conversations("data/train.jsonl", skip_bad_records=True)
    line, problem = expected.split(": ", 1)
    assert report.skipped == [(int(line), problem.rsplit("; ", 1)[0])]
    assert report.conversations[-1].line == len(lines) + 1


def test_skip_bad_records_counts_every_skip(data_dir):
    lines = [
        GOOD,
        "{not json",
        "",
        GOOD,
        '{"messages": [{"role": "bot", "content": "q"}]}',
        "[1, 2]",
        GOOD,
    ]
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = read_conversations("data/train.jsonl", skip_bad_records=True)
    assert report.format == "messages"
    assert [c.line for c in report.conversations] == [1, 4, 7]
    assert report.skipped == [
        (2, "invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (5, 'message 1 has role "bot"'),
        (6, "the record is an array"),
    ]
    assert read_error("data/train.jsonl") == (
        "data/train.jsonl:2: invalid JSON (Expecting property name enclosed in double quotes at column 2); "
        "fix the line or pass --skip-bad-records"
    )


def test_format_comes_from_the_first_record_read_cleanly(data_dir):
    lines = [
        '{"instruction": "q"}',
        '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
        '{"instruction": "q", "output": "a"}',
    ]
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = read_conversations("data/train.jsonl", skip_bad_records=True)
    assert report.format == "sharegpt"
    assert [c.line for c in report.conversations] == [2]
    assert report.skipped == [
        (1, 'the record has no "output"'),
        (3, "the record is in alpaca format, not sharegpt like line 2"),
    ]


def test_no_surviving_record_is_an_error(data_dir):
    (data_dir / "train.jsonl").write_text('not json\n{"messages": []}\n', encoding="utf-8")
    assert read_error("data/train.jsonl", skip_bad_records=True) == (
        "data/train.jsonl: no usable conversations: all 2 records are bad (first at line 1: invalid JSON "
        "(Expecting value at column 1)); fix the records or check the file's format"
    )
    (data_dir / "one.jsonl").write_text('\n\n{"messages": []}\n', encoding="utf-8")
    assert read_error("data/one.jsonl", skip_bad_records=True) == (
        'data/one.jsonl: no usable conversations: its only record is bad (first at line 3: "messages" is '
        "empty); fix the records or check the file's format"
    )


# --- JSON arrays: line numbers and broken structure -----------------------------------------------

ARRAY = """[
  {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},

  {
    "messages": [
      {"role": "user", "content": "q2"},
      {"role": "assistant", "content": "a2"}
    ]
  },
  {"messages": [{"role": "user", "content": "q3"}]},
  42
]
"""


def test_json_array_records_know_their_lines(data_dir):
    (data_dir / "train.json").write_text(ARRAY, encoding="utf-8")
    report = read_conversations("data/train.json", skip_bad_records=True)
    assert [c.line for c in report.conversations] == [2, 4]
    assert report.conversations[1].messages == [
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert report.skipped == [
        (10, "the conversation ends with a user message (message 1)"),
        (11, "the record is a number"),
    ]
    assert read_error("data/train.json") == (
        "data/train.json:10: the conversation ends with a user message (message 1); "
        "add the assistant reply or remove that message"
    )


ARRAY_ADVICE = "fix the file (broken JSON inside an array cannot be skipped)"
BROKEN_ARRAYS = [
    (
        "missing-comma-inside-record",
        '[\n  {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},\n'
        '  {\n    "messages": [\n      {"role": "user", "content": "q2"}\n'
        '      {"role": "assistant", "content": "a2"}\n    ]\n  }\n]\n',
        "6: invalid JSON (Expecting ',' delimiter at column 7)",
    ),
    (
        "missing-comma-between-records",
        f"[\n{GOOD}\n{GOOD}\n]\n",
        "3: invalid JSON (Expecting ',' delimiter at column 1)",
    ),
    # The comma follows two spaces of indent and the record.
    ("trailing-comma", f"[\n  {GOOD},\n]\n", f'2: invalid JSON (trailing comma before "]" at column {len(GOOD) + 3})'),
    ("not-closed", f"[\n  {GOOD}\n", '3: invalid JSON (the array is not closed with "]" at column 1)'),
    ("extra-data", f"[\n  {GOOD}\n]\n]\n", '4: invalid JSON (extra data after the closing "]" at column 1)'),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in BROKEN_ARRAYS], ids=[c[0] for c in BROKEN_ARRAYS])
@pytest.mark.parametrize("skip", [False, True])
def test_broken_json_array_reports_the_decode_line(data_dir, text, expected, skip):
    (data_dir / "train.json").write_text(text, encoding="utf-8")
    assert read_error("data/train.json", skip_bad_records=skip) == f"data/train.json:{expected}; {ARRAY_ADVICE}"


def test_empty_json_array(data_dir):
    (data_dir / "train.json").write_text("\n[ ]\n", encoding="utf-8")
    assert read_error("data/train.json") == "data/train.json:2: the JSON array is empty; add at least one record"


def test_single_pretty_printed_object_is_one_record(data_dir):
    (data_dir / "one.json").write_text("\n" + json.dumps(RECORDS["alpaca"][0], indent=2) + "\n", encoding="utf-8")
    report = read_conversations("data/one.json")
    assert report.format == "alpaca"
    assert [c.line for c in report.conversations] == [2]
    assert report.conversations[0].messages == EXPECTED[0]


# --- the file itself ------------------------------------------------------------------------------


def test_crlf_blank_lines_and_byte_order_mark(data_dir):
    text = "\r\n".join([GOOD, "", "   ", GOOD]) + "\r\n"
    (data_dir / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    report = read_conversations("data/train.jsonl")
    assert [c.line for c in report.conversations] == [1, 4]
    assert report.conversations[0].messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_missing_file(data_dir):
    assert read_error("data/missing.jsonl") == "data/missing.jsonl: no such file; check the path"


def test_directory_instead_of_file(data_dir):
    assert read_error("data") == "data: is a directory; pass a .jsonl or .json file"


@pytest.mark.parametrize("content", [b"", b"\n  \r\n\t\n", b"\xef\xbb\xbf"], ids=["empty", "blank", "bom-only"])
def test_empty_file(data_dir, content):
    (data_dir / "train.jsonl").write_bytes(content)
    assert read_error("data/train.jsonl") == (
        "data/train.jsonl: the file is empty; give a JSON array of records or one JSON record per line"
    )


def test_not_utf8(data_dir):
    (data_dir / "train.jsonl").write_bytes(GOOD.encode() + b'\n{"messages": "\xff"}\n')
    assert read_error("data/train.jsonl") == "data/train.jsonl:2: not valid UTF-8 (byte 0xff); save the file as UTF-8"


def test_reader_imports_neither_torch_nor_transformers():
    code = "import sys, famtune.data; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
