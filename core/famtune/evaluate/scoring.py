"""Running a chat model over eval items: option log-likelihoods and greedy answers, batched.

Every prompt is the family plugin's ``encode`` with the generation prompt (the ids chat and
training use), so a chat model is scored in the format it was tuned on. An option's score is the
log-likelihood of the assistant turn that gives it (the option's text as the family encodes an
assistant reply, its end-of-turn token included) after that prompt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError
from famtune.evaluate.metrics import accuracy, extract_letter, has_cjk, qa_scores
from famtune.evaluate.records import MCQItem, QAItem

INSTRUCTION = "Answer with the letter of the correct option."
INSTRUCTION_ZH = "请只回答正确选项的字母。"
DEFAULT_CHOICE_FORMAT = "{letter}"


@dataclass
class ScoringModel:
    """What scoring needs from a loaded model: the model, its tokenizer and family, stop ids."""

    model: Any
    tokenizer: Any
    family: Any  # famtune.plugins.Family
    stop_ids: list[int]
    pad_id: int
    system: str | None = None  # the run's system prompt (None: the family's default)

    @classmethod
    def from_session(cls, session: Any) -> ScoringModel:
        return cls(
            session.model, session.tokenizer, session.family, list(session.stop_ids), session.pad_id, session.system
        )

    @property
    def device(self):
        return next(self.model.parameters()).device


@dataclass
class EvalSettings:
    batch_size: int = 8
    max_new_tokens: int = 16
    choice_format: str = DEFAULT_CHOICE_FORMAT  # the assistant reply scored for each option
    seed: int = 0
    progress: bool = True


def mcq_prompt(item: MCQItem) -> str:
    """The user turn: question, lettered options, and what form the answer should take."""
    lines = [item.question.strip(), ""] + [f"{k}. {v.strip()}" for k, v in item.options.items()]
    return "\n".join(lines + ["", INSTRUCTION_ZH if has_cjk(item.question) else INSTRUCTION])


def messages_for(prompt: str, system: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": prompt}]


def mcq_conversations(items: list[MCQItem], choice_format: str = DEFAULT_CHOICE_FORMAT) -> list[dict[str, Any]]:
    """Training records (``messages`` format) that teach the prompt and answer form the eval scores."""
    out = []
    for it in items:
        msgs = messages_for(mcq_prompt(it), it.system)
        reply = choice_format.format(letter=it.answer, text=it.options[it.answer])
        out.append({"messages": msgs + [{"role": "assistant", "content": reply}]})
    return out


@contextlib.contextmanager
def inference(model: Any) -> Iterator[None]:
    """Eval mode with the KV cache on and no gradients; a model mid-training gets its state back."""
    import torch

    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True
    try:
        with torch.no_grad():
            yield
    finally:
        if config is not None:
            config.use_cache = use_cache
        if was_training:
            model.train()


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, max(size, 1))]


def _bar(total: int, desc: str, enabled: bool, unit: str = "q"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled, leave=False)


class Scorer:
    def __init__(self, sm: ScoringModel, settings: EvalSettings) -> None:
        self.sm, self.settings = sm, settings

    def prompt_ids(self, prompt: str, system: str | None) -> list[int]:
        msgs = messages_for(prompt, system if system is not None else self.sm.system)
        return list(
            self.sm.family.encode(self.sm.tokenizer, msgs, "all_assistant", add_generation_prompt=True).input_ids
        )

    def reply_tokens(
        self, prompt: str, system: str | None, reply: str, end_of_turn: bool = True
    ) -> tuple[list[int], list[int]]:
        """(ids of prompt + reply, positions of the reply's tokens), checked against the prompt alone.

        With ``end_of_turn`` false the reply's closing stop token is not scored (a continuation
        that may not be the whole answer, as lm-eval's requests are)."""
        sm = self.sm
        msgs = messages_for(prompt, system if system is not None else sm.system)
        head = self.prompt_ids(prompt, system)
        enc = sm.family.encode(sm.tokenizer, msgs + [{"role": "assistant", "content": reply}], "all_assistant")
        ids = list(enc.input_ids)
        if ids[: len(head)] != head:
            raise FamtuneError(
                f"{sm.family.info.describe()}: the {sm.family.name} generation prompt is not a prefix "
                "of the same conversation with an answer; options cannot be scored after it"
            )
        positions = [i for i in range(len(head), len(ids)) if enc.labels[i] != IGNORE_INDEX]
        if not end_of_turn:
            stops = set(sm.stop_ids)
            while positions and ids[positions[-1]] in stops:
                positions.pop()
        if not positions:
            raise FamtuneError(f"{sm.family.info.describe()}: the reply {reply!r} has no supervised token to score")
        return ids, positions

    # -- log-likelihood ------------------------------------------------------------------------
    def sequence_logliks(
        self, rows: list[tuple[list[int], list[int]]], on_batch: Callable[[int], Any] | None = None
    ) -> list[float]:
        """Sum of log p(token | everything before it) over each row's positions, right-padded batches."""
        return [s for s, _ in self.sequence_scores(rows, on_batch)]

    def sequence_scores(
        self, rows: list[tuple[list[int], list[int]]], on_batch: Callable[[int], Any] | None = None
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, whether greedy decoding would produce exactly these tokens) per row."""
        import torch

        sm, out = self.sm, []
        for chunk in _batches(len(rows), self.settings.batch_size):
            part = [rows[i] for i in chunk]
            width = max(len(ids) for ids, _ in part)
            ids = torch.full((len(part), width), sm.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, (row, _) in enumerate(part):
                ids[b, : len(row)] = torch.tensor(row)
                mask[b, : len(row)] = 1
            logits = sm.model(input_ids=ids.to(sm.device), attention_mask=mask.to(sm.device)).logits
            for b, (row, positions) in enumerate(part):
                pos = torch.tensor(positions, device=logits.device)
                # Token t is predicted by the logits at t - 1; log-softmax in fp32 for a stable sum.
                logp = torch.log_softmax(logits[b, pos - 1].float(), dim=-1)
                target = torch.tensor(row, device=logits.device)[pos]
                out.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
            if on_batch:
                on_batch(len(part))
        return out

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], on_batch: Callable[[int], Any] | None = None) -> list[str]:
        """Greedy replies, left-padded batches, each cut at its first stop id."""
        import torch

        sm, out = self.sm, []
        stops = set(sm.stop_ids)
        for chunk in _batches(len(prompts), self.settings.batch_size):
            part = [prompts[i] for i in chunk]
            width = max(len(p) for p in part)
            ids = torch.full((len(part), width), sm.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, row in enumerate(part):
                ids[b, width - len(row) :] = torch.tensor(row)
                mask[b, width - len(row) :] = 1
            gen = sm.model.generate(
                input_ids=ids.to(sm.device),
                attention_mask=mask.to(sm.device),
                do_sample=False,
                max_new_tokens=self.settings.max_new_tokens,
                eos_token_id=list(sm.stop_ids),
                pad_token_id=sm.pad_id,
            )
            for b in range(len(part)):
                new = gen[b, width:].tolist()
                cut = next((i for i, t in enumerate(new) if t in stops), len(new))
                out.append(sm.tokenizer.decode(new[:cut], skip_special_tokens=True))
            if on_batch:
                on_batch(len(part))
        return out


def evaluate_mcq(sm: ScoringModel, items: list[MCQItem], settings: EvalSettings) -> dict[str, Any]:
    """Accuracy by option log-likelihood and by greedy answer, with 95% intervals and per-question detail."""
    import torch

    torch.manual_seed(settings.seed)
    scorer = Scorer(sm, settings)
    t0 = time.perf_counter()
    rows, owner = [], []
    for q, it in enumerate(items):
        for letter, text in it.options.items():
            reply = settings.choice_format.format(letter=letter, text=text.strip())
            rows.append(scorer.reply_tokens(mcq_prompt(it), it.system, reply))
            owner.append((q, letter))
    prompts = [scorer.prompt_ids(mcq_prompt(it), it.system) for it in items]
    with inference(sm.model):
        bar = _bar(len(rows), "eval log-likelihood", settings.progress, unit="option")
        scores = scorer.sequence_logliks(rows, bar.update)
        bar.close()
        bar = _bar(len(items), "eval generation", settings.progress)
        replies = scorer.generate(prompts, bar.update)
        bar.close()
    seconds = time.perf_counter() - t0
    by_q: list[dict[str, float]] = [{} for _ in items]
    for (q, letter), s in zip(owner, scores):
        by_q[q][letter] = s
    details, right_ll, right_gen, unparsed = [], 0, 0, 0
    for it, option_scores, reply in zip(items, by_q, replies):
        ll_pred = max(option_scores, key=option_scores.__getitem__)  # ties: the first option listed
        gen_pred = extract_letter(reply, it.options)
        right_ll += ll_pred == it.answer
        right_gen += gen_pred == it.answer
        unparsed += gen_pred is None
        details.append(
            {
                "line": it.line,
                "question": it.question,
                "answer": it.answer,
                "loglikelihood": {"prediction": ll_pred, "scores": option_scores},
                "generation": {"prediction": gen_pred, "text": reply},
            }
        )
    gen = accuracy(right_gen, len(items))
    gen["unparseable"] = unparsed
    return {
        "task": "mcq",
        "questions": len(items),
        "loglikelihood": accuracy(right_ll, len(items)),
        "generation": gen,
        "seconds": seconds,
        "questions_per_s": len(items) / seconds if seconds else None,
        "settings": {
            "choice_format": settings.choice_format,
            "max_new_tokens": settings.max_new_tokens,
            "batch_size": settings.batch_size,
            "instruction": INSTRUCTION,
        },
        "items": details,
    }


def evaluate_qa(sm: ScoringModel, items: list[QAItem], settings: EvalSettings) -> dict[str, Any]:
    """Greedy answers scored by exact match, BLEU and ROUGE-L against the references."""
    import torch

    torch.manual_seed(settings.seed)
    scorer = Scorer(sm, settings)
    t0 = time.perf_counter()
    prompts = [scorer.prompt_ids(it.question, it.system) for it in items]
    with inference(sm.model):
        bar = _bar(len(items), "eval generation", settings.progress)
        replies = scorer.generate(prompts, bar.update)
        bar.close()
    seconds = time.perf_counter() - t0
    figures, per_item = qa_scores([r.strip() for r in replies], [it.answer for it in items])
    details = [
        {"line": it.line, "question": it.question, "answer": it.answer, "prediction": r, **s}
        for it, r, s in zip(items, replies, per_item)
    ]
    return {
        "task": "qa",
        "questions": len(items),
        **figures,
        "seconds": seconds,
        "questions_per_s": len(items) / seconds if seconds else None,
        "settings": {"max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size},
        "items": details,
    }
