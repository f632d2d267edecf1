"""``famtune eval`` on its own: eval file layouts and their FILE:LINE errors, the interval and
QA metrics against maintained implementations, letter extraction, and the scoring of a tiny model
checked against an independent rendering of the family's chat template."""

from __future__ import annotations

import json
import math

import pytest

from conftest import build_tiny, famtune_cli
from famtune.demo import DEMO_DIR
from famtune.errors import FamtuneError
from famtune.evaluate.metrics import extract_letter, qa_scores, wilson_interval
from famtune.evaluate.records import read_eval_file

TEST = DEMO_DIR / "mcq_test.jsonl"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_lines(path, records):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
        encoding="utf-8",
    )
    return path


def test_bundled_split_reads_in_medqa_layout_with_known_letter_counts():
    items = read_eval_file(str(TEST), "mcq")
    train = read_eval_file(str(DEMO_DIR / "mcq_train.jsonl"), "mcq")
    assert len(items) == 24 and len(train) == 48
    assert {k: sum(it.answer == k for it in items) for k in "ABCD"} == {"A": 7, "B": 5, "C": 8, "D": 4}
    assert not {it.question for it in items} & {it.question for it in train}  # held-out wordings
    first = json.loads(TEST.read_text(encoding="utf-8").splitlines()[0])
    assert items[0].options == first["options"] and items[0].answer == first["answer_idx"]


def test_generic_layout_letters_a_list_and_accepts_lowercase(tmp_path):
    f = write_lines(
        tmp_path / "g.jsonl",
        [
            {"question": "2+2?", "options": ["3", "4"], "answer": "b"},
            {"question": "q", "options": {"a": "x", "b": "y"}, "answer": "A", "system": "be brief"},
        ],
    )
    a, b = read_eval_file(str(f), "mcq")
    assert a.options == {"A": "3", "B": "4"} and a.answer == "B" and a.line == 1
    assert b.options == {"A": "x", "B": "y"} and b.system == "be brief" and b.line == 2


@pytest.mark.parametrize(
    "bad, line, words",
    [
        ('{"question": "q", "options": {"A": "x", "B": "y"}, "answer": "C"}', 2, "not one of the options A, B"),
        ('{"question": "q", "options": {"A": "x"}, "answer": "A"}', 2, "at least two options"),
        ('{"question": "", "options": {"A": "x", "B": "y"}, "answer": "A"}', 2, '"question" is a string'),
        ('{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "B", "answer": "x"}', 2, "is not option B"),
        ('{"question": "q", "options": {"A": "x", "1": "y"}, "answer": "A"}', 2, "not a letter"),
        ('{"question": "q", "options": {"A": "x", "B": "y"}, "answer": "A"', 2, "invalid JSON"),
        ('["not", "an", "object"]', 2, "expected a JSON object"),
    ],
)
def test_bad_mcq_record_names_file_and_line(tmp_path, bad, line, words):
    good = {"question": "q", "options": {"A": "x", "B": "y"}, "answer": "A"}
    f = write_lines(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(FamtuneError) as err:
        read_eval_file(str(f), "mcq")
    msg = str(err.value)
    assert msg.startswith(f"{f}:{line}: ") and words in msg and "\n" not in msg, msg


def test_bad_eval_file_is_one_line_error_from_the_command(tmp_path):
    f = write_lines(
        tmp_path / "bad.jsonl",
        [{"question": "q", "options": {"A": "x", "B": "y"}, "answer": "A"}, {"question": "q", "answer": "A"}],
    )
    res = famtune_cli(
        "eval", tmp_path, "--data", f, check=False, env={"OMP_NUM_THREADS": "1"}
    )  # the file is checked before any model load
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"famtune: error: {f}:2: ") and '"options"' in lines[0], lines


def test_qa_layouts(tmp_path):
    f = write_lines(
        tmp_path / "qa.jsonl",
        [
            {"question": "Capital of France?", "answer": "Paris"},
            {"instruction": "Translate", "input": "chat", "output": "cat"},
        ],
    )
    a, b = read_eval_file(str(f), "qa")
    assert (a.question, a.answer) == ("Capital of France?", "Paris")
    assert (b.question, b.answer, b.line) == ("Translate\nchat", "cat", 2)


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 10), (4, 24), (17, 24), (24, 24), (503, 1000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson_interval(k, n)
        assert math.isclose(low, ci.low, abs_tol=1e-9) and math.isclose(high, ci.high, abs_tol=1e-9), (k, n)


@pytest.mark.parametrize(
    "text, letter",
    [
        ("C", "C"),
        ("C.", "C"),
        (" (B) Liver", "B"),
        ("The answer is D.", "D"),
        ("答案是：A", "A"),
        ("Lung", "C"),
        ("I would say B here", "B"),
        ("BBBB", None),
        ("Kidneys and more", None),
        ("", None),
        ("E", None),  # not one of the options
    ],
)
def test_letter_extraction(text, letter):
    assert extract_letter(text, {"A": "Heart", "B": "Liver", "C": "Lung", "D": "Kidney"}) == letter


def test_qa_metrics_come_from_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    preds, refs = ["the cat sat on the mat", "a dog"], ["the cat sat on the mat", "the dog barked loudly"]
    figures, per_item = qa_scores(preds, refs)
    assert figures["exact_match"]["correct"] == 1 and figures["exact_match"]["total"] == 2
    assert math.isclose(figures["bleu"], sacrebleu.corpus_bleu(preds, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    assert [round(p["rougeL"], 9) for p in per_item] == [round(e, 9) for e in expected]
    assert 0 < per_item[1]["rougeL"] < 1


def test_chinese_answers_are_segmented_not_dropped():
    figures, per_item = qa_scores(["巴黎是法国的首都"], ["法国的首都是巴黎"])
    # rouge-score's own tokenizer drops CJK characters and would score 0 here
    assert figures["rouge_tokens"] == "jieba words" and 0.3 < per_item[0]["rougeL"] < 1
    assert figures["bleu_tokenize"] == "zh" and figures["bleu"] > 0


# Families with different turn formats: ChatML, InternLM2's, Baichuan2-13B (ALiBi, own model
# code), ChatGLM3 (no end-of-turn token: the next role token stops a reply).
FAMILIES = ["qwen2.5", "internlm2", "baichuan2-13b", "chatglm3"]


def _load(tmp_path_factory, family):
    from famtune.chat import load_chat_model
    from famtune.evaluate.scoring import ScoringModel

    base = build_tiny(family, tmp_path_factory.mktemp(f"tiny-eval-{family}"))
    return base, ScoringModel.from_session(load_chat_model(str(base)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _load(tmp_path_factory, "qwen2.5")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_family(request, tmp_path_factory, tiny):
    return tiny if request.param == "qwen2.5" else _load(tmp_path_factory, request.param)


def test_option_scores_equal_an_independent_chat_template_rendering(tiny_family):
    """The score of each option is the log-probability of the assistant turn, rendered with the
    family's Jinja chat template (not famtune's encoder), computed token by token."""
    import torch

    from famtune.evaluate.scoring import EvalSettings, evaluate_mcq, mcq_prompt

    _, sm = tiny_family
    items = read_eval_file(str(TEST), "mcq")[:3]
    result = evaluate_mcq(sm, items, EvalSettings(batch_size=5, progress=False))
    template = sm.family.chat_template()
    for it, detail in zip(items, result["items"]):
        user = [{"role": "user", "content": mcq_prompt(it)}]
        prompt = sm.tokenizer.apply_chat_template(
            user, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for letter in it.options:
            full = sm.tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": letter}],
                chat_template=template,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
            assert full[: len(prompt)] == prompt
            end = next(i for i in range(len(prompt), len(full)) if full[i] in sm.stop_ids)  # the end of turn
            with torch.no_grad():
                logp = torch.log_softmax(sm.model(input_ids=torch.tensor([full])).logits[0].float(), -1)
            expected = sum(float(logp[i - 1, full[i]]) for i in range(len(prompt), end + 1))
            assert math.isclose(detail["loglikelihood"]["scores"][letter], expected, rel_tol=1e-5, abs_tol=1e-4)
        scores = detail["loglikelihood"]["scores"]
        assert detail["loglikelihood"]["prediction"] == max(scores, key=scores.get)


def test_batched_greedy_answers_equal_chat_replies(tiny_family):
    """Left-padded batches answer exactly what `famtune chat --greedy` answers one at a time."""
    import torch

    from famtune.chat import load_chat_model
    from famtune.evaluate.scoring import EvalSettings, evaluate_mcq, mcq_prompt

    base, sm = tiny_family
    items = read_eval_file(str(TEST), "mcq")[:6]
    result = evaluate_mcq(sm, items, EvalSettings(batch_size=4, max_new_tokens=6, progress=False))
    session = load_chat_model(str(base))
    for it, detail in zip(items, result["items"]):
        # what `famtune chat --greedy` generates for the question alone, decoded as eval decodes
        ids = session.prompt_ids([{"role": "user", "content": mcq_prompt(it)}])
        with torch.no_grad():
            out = session.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=6,
            )
        new = out[0, len(ids) :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in session.stop_ids), len(new))]
        assert detail["generation"]["text"] == session.tokenizer.decode(new, skip_special_tokens=True)
    assert result["generation"]["unparseable"] == sum(d["generation"]["prediction"] is None for d in result["items"])
    again = evaluate_mcq(sm, items, EvalSettings(batch_size=2, max_new_tokens=6, progress=False))
    assert [d["generation"]["text"] for d in again["items"]] == [d["generation"]["text"] for d in result["items"]]
    assert [d["loglikelihood"]["prediction"] for d in again["items"]] == [
        d["loglikelihood"]["prediction"] for d in result["items"]
    ]


def test_open_qa_run_writes_the_scores_of_its_own_answers(tiny, tmp_path):
    from famtune.evaluate.runner import run_eval
    from famtune.evaluate.scoring import EvalSettings

    base, _ = tiny
    f = write_lines(
        tmp_path / "qa.jsonl",
        [{"question": "Who are you?", "answer": "I am FamBot."}, {"question": "你是谁？", "answer": "我是FamBot。"}],
    )
    said: list[str] = []
    run_eval(
        str(base),
        str(f),
        "qa",
        output=str(tmp_path / "out"),
        settings=EvalSettings(max_new_tokens=8, progress=False),
        log=said.append,
    )
    saved = json.loads((tmp_path / "out" / "eval.json").read_text(encoding="utf-8"))
    figures, per_item = qa_scores([it["prediction"].strip() for it in saved["items"]], ["I am FamBot.", "我是FamBot。"])
    assert saved["bleu"] == figures["bleu"] and saved["rougeL"] == figures["rougeL"]
    assert saved["exact_match"] == figures["exact_match"] and saved["questions"] == 2
    assert [it["line"] for it in saved["items"]] == [1, 2]
    assert any(line.startswith("eval: ROUGE-L F1: ") for line in said)
    assert "| line | reference | answer | exact | ROUGE-L |" in (tmp_path / "out" / "eval.md").read_text(
        encoding="utf-8"
    )


@pytest.mark.parametrize(
    "section, words",
    [
        ({"task": "mcq"}, "eval has no data"),
        ({"data": "t.jsonl", "task": "essay"}, "eval.task is 'essay'"),
        ({"data": "t.jsonl", "batchsize": 4}, "unknown eval key 'batchsize'"),
        ({"data": "t.jsonl", "batch_size": "4"}, "eval.batch_size is '4'; expected int"),
        ("t.jsonl", "expected a mapping"),
    ],
)
def test_recipe_eval_section_is_checked_when_the_recipe_loads(tmp_path, section, words):
    import yaml

    from famtune.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "m", "data": "d.jsonl", "eval": section}), encoding="utf-8")
    with pytest.raises(FamtuneError, match=words):
        load_recipe(str(recipe))


def test_recipe_eval_data_is_relative_to_the_recipe(tmp_path):
    import yaml

    from famtune.recipe import load_recipe

    (tmp_path / "test.jsonl").write_text(TEST.read_text(encoding="utf-8"), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": "m", "data": "d.jsonl", "eval": {"data": "test.jsonl"}}), encoding="utf-8"
    )
    assert load_recipe(str(recipe)).eval == {"task": "mcq", "data": str(tmp_path / "test.jsonl")}


def test_demo_trains_on_the_prompt_form_eval_asks_in(tmp_path):
    import yaml

    from famtune.data import read_conversations
    from famtune.evaluate.demo import demo_recipe
    from famtune.evaluate.scoring import mcq_prompt
    from famtune.recipe import load_recipe

    path = demo_recipe(tmp_path, family="internlm2", steps=7)
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert spec["models"] == ["tiny:internlm2"] and spec["max_steps"] == 7 and spec["eval"]["data"] == str(TEST)
    convs = read_conversations(spec["data"]).conversations
    train = read_eval_file(str(DEMO_DIR / "mcq_train.jsonl"), "mcq")
    assert [[m["content"] for m in c.messages] for c in convs] == [[mcq_prompt(it), it.answer] for it in train]
    load_recipe(None, {**{k: v for k, v in spec.items() if k != "models"}, "model": "m"})  # every key is valid
