"""Parallel encoding and the encoded-data cache: same samples and counts however they are produced."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from famtune.checkpoint import open_checkpoint
from famtune.data import read_conversations
from famtune.prepcache import tokenizer_digest
from famtune.samples import encode_conversations, prepare_samples


@pytest.fixture(scope="module")
def tiny(tiny_qwen25):
    ckpt = open_checkpoint(str(tiny_qwen25))
    return ckpt.family, ckpt.load_tokenizer()


def _write_data(path, n=150):
    rows = []
    for i in range(n):
        msgs = [
            {"role": "user", "content": f"question {i} " + "word " * (i % 7)},
            {"role": "assistant", "content": f"answer {i} " + "reply " * (i % 11)},
        ]
        rows.append(json.dumps({"messages": msgs}))
    # one sample longer than max_length, one whose answer lies wholly beyond it, one bad record
    rows.append(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "long " * 200}]})
    )
    rows.append(
        json.dumps({"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "late"}]})
    )
    rows.append(json.dumps({"messages": [{"role": "bot", "content": "bad"}]}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _recipe(data, **kw):
    base = dict(
        data=str(data),
        data_format="auto",
        skip_bad_records=True,
        system=None,
        max_length=256,
        eval_data=None,
        eval_split=0.0,
        seed=0,
    )
    return SimpleNamespace(**{**base, **kw})


def test_parallel_encoding_equals_one_process(tiny, tmp_path):
    family, tok = tiny
    read = read_conversations(str(_write_data(tmp_path / "d.jsonl")), skip_bad_records=True)
    one = encode_conversations(read.conversations, family, tok, "all_assistant", None, 256, processes=1)
    two = encode_conversations(read.conversations, family, tok, "all_assistant", None, 256, processes=2)
    for a, b in zip(one[:4], two[:4]):
        assert a.tolist() == b.tolist()
    assert one[4] == two[4] >= 1 and one[5] == two[5] and len(one[5]) == 1
    # the flat arrays hold exactly what the plugin encodes, conversation by conversation
    first = family.encode(tok, read.conversations[0].messages, "all_assistant")
    assert one[0][: len(first.input_ids)].tolist() == first.input_ids
    assert one[1][: len(first.labels)].tolist() == first.labels


def test_second_run_reuses_cache_with_identical_samples_and_counts(tiny, tmp_path, monkeypatch):
    family, tok = tiny
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    data = _write_data(tmp_path / "d.jsonl")
    train1, _, rep1 = prepare_samples(_recipe(data), family, tok, "all_assistant")
    assert any("encoded" in line and "cached as" in line for line in rep1.lines())
    assert len(list((tmp_path / "cache" / "samples").glob("*.npz"))) == 1
    train2, _, rep2 = prepare_samples(_recipe(data), family, tok, "all_assistant")
    assert any("reused the cached encoding" in line for line in rep2.lines())
    assert [(s.input_ids, s.labels, s.source, s.line) for s in train1] == [
        (s.input_ids, s.labels, s.source, s.line) for s in train2
    ]
    assert rep1.to_dict() == rep2.to_dict()
    assert rep2.truncated >= 1 and len(rep2.dropped_no_supervision) == 1 and len(rep2.skipped_bad) == 1
    assert rep1.skipped_bad == rep2.skipped_bad and rep1.dropped_no_supervision == rep2.dropped_no_supervision


@pytest.mark.parametrize(
    "change", [{"max_length": 300}, {"system": "Be brief."}, {"masking": "train_on_prompt"}, {"data": "edited"}]
)
def test_any_input_change_misses_the_cache(tiny, tmp_path, monkeypatch, change):
    family, tok = tiny
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    data = _write_data(tmp_path / "d.jsonl")
    prepare_samples(_recipe(data), family, tok, "all_assistant")
    masking = change.pop("masking", "all_assistant")
    if change.get("data") == "edited":
        change = {}
        data.write_text(data.read_text(encoding="utf-8").replace("question 3 ", "question three "), encoding="utf-8")
    _, _, rep = prepare_samples(_recipe(data, **change), family, tok, masking)
    assert not any("reused" in line for line in rep.lines())
    assert len(list((tmp_path / "cache" / "samples").glob("*.npz"))) == 2


def test_tokenizer_digest_sees_added_tokens(tiny_qwen25):
    a = open_checkpoint(str(tiny_qwen25)).load_tokenizer()
    b = open_checkpoint(str(tiny_qwen25)).load_tokenizer()
    assert tokenizer_digest(a) == tokenizer_digest(b)
    b.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    assert tokenizer_digest(a) != tokenizer_digest(b)


def _all_family_names():
    from famtune.plugins import get_plugins

    plugins = get_plugins()
    return [f for name in plugins.infos for f in plugins.families_of(name)]


@pytest.mark.parametrize("family_name", _all_family_names())
def test_memoised_tokenization_gives_exactly_the_piecewise_ids(family_name, tmp_path, monkeypatch):
    """Data preparation tokenizes pieces through a memo and the Rust tokenizer directly; every
    family's ids and labels must equal those of encoding each conversation on its own."""
    import shutil

    from conftest import SHARED
    from famtune.data import Conversation
    from famtune.demo import demo_corpus
    from famtune.plugins import get_plugins

    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    where = tmp_path / "ckpt"
    if not get_plugins().claim({}, "", family=family_name).tiny_checkpoint(str(where), demo_corpus()):
        # no tiny builder (Qwen1): the published layout from the shared reference fixtures
        ref = SHARED / "fixtures" / "reference" / family_name
        where.mkdir()
        for src in [*(ref / "tiny").iterdir(), *(ref / "tokenizer").iterdir()]:
            shutil.copyfile(src, where / src.name)
    ckpt = open_checkpoint(str(where), family=family_name)
    family, tok = ckpt.family, ckpt.load_tokenizer()
    tricky = ["<|im_end|>", "<reserved_106>", "</s>", "<|user|>", "<|im_start|>assistant\n", "[UNUSED_TOKEN_145]"]
    convs = []
    for i in range(40):
        msgs = [{"role": "system", "content": f"Be brief {i % 3}."}] if i % 4 == 0 else []
        for t in range(1 + i % 3):
            msgs += [
                {"role": "user", "content": f"q{i}.{t} 你好 " + tricky[(i + t) % len(tricky)] + " \n x" * (i % 5)},
                {"role": "assistant", "content": f"a{i}.{t} " + "yes " * (i % 7) + tricky[i % len(tricky)]},
            ]
        convs.append(Conversation(messages=msgs, source="mem", line=i + 1))
    convs += convs[:10]  # repeated conversations are answered from the memo
    for masking in ("all_assistant", "last_turn"):
        ids, labels, lengths, lines, _, dropped = encode_conversations(
            convs, family, tok, masking, None, 4096, processes=1
        )
        assert not dropped and lines.tolist() == [c.line for c in convs]
        at = 0
        for conv, n in zip(convs, lengths.tolist()):
            alone = family.encode(tok, conv.messages, masking)
            assert ids[at : at + n].tolist() == alone.input_ids, (family_name, conv.line)
            assert labels[at : at + n].tolist() == alone.labels, (family_name, conv.line)
            at += n


def test_rust_shortcut_turns_itself_off_when_transformers_would_tokenize_differently(tiny):
    """A tokenizer class that rewrites text in Python before its Rust tokenizer sees it: the memo's
    direct call to the Rust tokenizer would disagree, and the first check must catch that."""
    from famtune.encoding import TokenCache

    _, tok = tiny

    class Lowercasing(type(tok)):
        def encode(self, text, *args, **kwargs):
            return super().encode(text.lower(), *args, **kwargs)

    lower = Lowercasing.from_pretrained(tok.name_or_path)
    cache = TokenCache(lower)
    assert cache.get("Hello World", False) == lower.encode("hello world", add_special_tokens=False)
    assert cache._backend is None
    assert cache.get("Other TEXT", False) == lower.encode("other text", add_special_tokens=False)
    # an ordinary fast tokenizer keeps the shortcut, and agrees with transformers
    plain = TokenCache(tok)
    texts = [f"Piece {i} <|im_end|> ünï {i * 7}" for i in range(80)]
    assert [plain.get(t, False) for t in texts] == [tok.encode(t, add_special_tokens=False) for t in texts]
    assert plain._backend is not None and plain.checks == 0
