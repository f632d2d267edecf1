"""Data preparation reads JSON Lines in the worker processes and tokenizes text pieces in batches:
the same samples, counts, skipped records and errors as reading the file first, one process."""

from __future__ import annotations

import json

import pytest

from famtune.checkpoint import open_checkpoint
from famtune.data import DataError, plan_lines, read_conversations
from famtune.encoding import TokenCache
from famtune.samples import encode_conversations, read_and_encode


@pytest.fixture(scope="module")
def tiny(tiny_qwen25):
    ckpt = open_checkpoint(str(tiny_qwen25))
    return ckpt.family, ckpt.load_tokenizer()


def _rows(n: int, bad: dict[int, str]) -> list[str]:
    rows = []
    for i in range(n):
        msgs = [
            {"role": "user", "content": f"question {i} " + "word " * (i % 7)},
            {"role": "assistant", "content": f"answer {i} " + "reply " * (i % 11)},
        ]
        rows.append(bad.get(i, json.dumps({"messages": msgs})))
    return rows


BAD = {
    0: '{"messages": [{"role": "bot", "content": "x"}]}',  # before the record that fixes the format
    150: "{broken",
    151: "",  # a blank line: not a record
    240: '{"instruction": "other format", "output": "y"}',
}


def test_workers_read_the_lines_as_the_reader_does(tiny, tmp_path):
    family, tok = tiny
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(_rows(300, BAD)) + "\n", encoding="utf-8")
    read = read_conversations(str(path), skip_bad_records=True)
    want = encode_conversations(read.conversations, family, tok, "all_assistant", None, 64, processes=1)
    plan = plan_lines(str(path), skip_bad_records=True)
    assert plan is not None and plan.format == read.format == "messages" and plan.origin == 2
    got = read_and_encode(plan.head.conversations, family, tok, "all_assistant", None, 64, processes=2, plan=plan)
    for a, b in zip(want[:4], got[:4]):
        assert a.tolist() == b.tolist()
    assert want[4] == got[4] and want[5] == got[5]
    assert got[6] + len(plan.head.conversations) - 1 == len(read.conversations)
    assert plan.head.skipped + got[7] == read.skipped
    assert [line for line, _ in read.skipped] == [1, 151, 241]


@pytest.mark.parametrize("bad_index, problem", [(150, "invalid JSON"), (240, "alpaca format, not messages")])
def test_the_first_bad_record_stops_with_its_file_and_line(tiny, tmp_path, bad_index, problem):
    family, tok = tiny
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(_rows(300, {k: v for k, v in BAD.items() if k >= bad_index})), encoding="utf-8")
    with pytest.raises(DataError) as sequential:
        read_conversations(str(path))
    plan = plan_lines(str(path))
    with pytest.raises(DataError) as parallel:
        read_and_encode(plan.head.conversations, family, tok, "all_assistant", None, 64, processes=2, plan=plan)
    assert str(parallel.value) == str(sequential.value)
    assert f"d.jsonl:{bad_index + 1}: " in str(parallel.value) and problem in str(parallel.value)


def test_a_file_of_bad_records_and_an_array_are_handled_as_before(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n[1]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: no usable conversations: all 2 records are bad \(first at line 1"):
        plan_lines(str(bad), skip_bad_records=True)
    array = tmp_path / "a.json"
    array.write_text(json.dumps([json.loads(r) for r in _rows(3, {})]), encoding="utf-8")
    assert plan_lines(str(array)) is None  # an array is read whole, by read_conversations


def test_batched_shortcut_turns_itself_off_when_transformers_would_tokenize_differently(tiny):
    _, tok = tiny

    class Lowercasing(type(tok)):
        def encode(self, text, *args, **kwargs):
            return super().encode(text.lower(), *args, **kwargs)

    lower = Lowercasing.from_pretrained(tok.name_or_path)
    texts = ["Hello World", "Other TEXT", "Hello World"]
    assert TokenCache(lower).get_many(texts, False) == [
        lower.encode(t.lower(), add_special_tokens=False) for t in texts
    ]
    plain = TokenCache(tok)
    texts = [f"Piece {i} <|im_end|> ünï {i * 7}" for i in range(80)]
    for split in (False, True):
        want = [tok(t, add_special_tokens=False, split_special_tokens=split)["input_ids"] for t in texts]
        assert plain.get_many(texts, split) == want
    assert plain._backend is not None
