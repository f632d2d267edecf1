"""Scores: accuracy with its 95% interval, letter extraction, and open-QA metrics through
maintained libraries (sacrebleu for BLEU, rouge-score for ROUGE-L, jieba to segment Chinese)."""

from __future__ import annotations

import math
import re
from typing import Any

from famtune.errors import FamtuneError

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n correct,
    which matters for the small eval sets people fine-tune against."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy(correct: int, total: int) -> dict[str, Any]:
    low, high = wilson_interval(correct, total)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total, "ci95": [low, high]}


# "The answer is (B)", "答案是：B", "Answer: B" ... then a letter standing alone at the start.
_STATED = re.compile(
    r"(?:answer\s*(?:is|:)?|答案\s*(?:是|为)?)\s*[:：]?\s*[\(\[（【]?\s*([A-Za-z])(?![A-Za-z])", re.IGNORECASE
)
_LEADING = re.compile(r"^\W*([A-Za-z])(?:[\s\.\)\]）】:：,，、]|$)")
_ALONE = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def extract_letter(text: str, options: dict[str, str]) -> str | None:
    """The option letter a generated answer gives, or None when it names none unambiguously.

    Tried in order: a stated answer ("the answer is C", "答案是C"), a letter opening the reply
    ("C", "C. Heart", "(C)"), the exact text of one option, and a single option letter standing
    alone anywhere in the reply."""
    stripped = text.strip()
    for pattern in (_STATED, _LEADING):
        m = pattern.search(stripped)
        if m and m.group(1).upper() in options:
            return m.group(1).upper()
    by_text = [k for k, v in options.items() if v.strip().casefold() == stripped.casefold()]
    if len(by_text) == 1:
        return by_text[0]
    alone = {m.group(1) for m in _ALONE.finditer(stripped) if m.group(1) in options}
    return alone.pop() if len(alone) == 1 else None


# -- open QA -----------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def normalize_answer(text: str) -> str:
    """For exact match: outer whitespace dropped, inner runs of whitespace made one space."""
    return " ".join(text.split())


class _SegmentingTokenizer:
    """ROUGE tokens: jieba words for text with Chinese characters (rouge-score's default
    tokenizer drops every non-ASCII character), rouge-score's own tokenizer otherwise."""

    def __init__(self) -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        self.default = DefaultTokenizer(use_stemmer=False)

    def tokenize(self, text: str) -> list[str]:
        if has_cjk(text):
            import jieba

            return [w for w in jieba.lcut(text) if w.strip()]
        return self.default.tokenize(text)


def _require_qa_libraries() -> None:
    try:
        import jieba  # noqa: F401
        import rouge_score  # noqa: F401
        import sacrebleu  # noqa: F401
    except ImportError as exc:
        raise FamtuneError(f"open-QA metrics need {exc.name}; install them with: pip install 'famtune[eval]'") from None


def qa_scores(predictions: list[str], references: list[str]) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Corpus figures (exact match with its interval, BLEU, mean ROUGE-L F1) and per-item scores."""
    _require_qa_libraries()
    import logging

    import jieba
    import sacrebleu
    from rouge_score import rouge_scorer

    jieba.setLogLevel(logging.WARNING)
    chinese = any(has_cjk(r) for r in references)
    # sacrebleu's "zh" tokenizer splits Chinese characters and keeps other words whole, as its
    # documentation recommends for Chinese; 13a is its default (mteval) tokenizer.
    tokenize = "zh" if chinese else "13a"
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_SegmentingTokenizer())
    per_item = []
    exact = 0
    for pred, ref in zip(predictions, references):
        em = normalize_answer(pred) == normalize_answer(ref)
        exact += em
        rouge = scorer.score(ref, pred)["rougeL"].fmeasure
        sent = sacrebleu.sentence_bleu(pred, [ref], tokenize=tokenize).score
        per_item.append({"exact_match": float(em), "rougeL": rouge, "bleu": sent})
    n = len(predictions)
    figures = {
        "exact_match": accuracy(exact, n),
        "bleu": bleu.score,
        "bleu_tokenize": tokenize,
        "rougeL": sum(p["rougeL"] for p in per_item) / n if n else 0.0,
        "rouge_tokens": "jieba words" if chinese else "rouge-score words",
    }
    return figures, per_item
