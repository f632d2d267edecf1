"""From data files to model-ready samples: read, encode through the plugin, truncate, split.

Nothing is dropped silently: bad records skipped, samples truncated and samples dropped because
truncation would leave no supervised token are all counted in ``SampleReport``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from famtune.data import read_conversations
from famtune.encoding import IGNORE_INDEX, EncodedConversation
from famtune.errors import FamtuneError


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    source: str
    line: int


@dataclass
class SampleReport:
    files: list[str] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    records: int = 0
    skipped_bad: list[tuple[str, int, str]] = field(default_factory=list)
    truncated: int = 0
    dropped_no_supervision: list[tuple[str, int]] = field(default_factory=list)
    train: int = 0
    eval: int = 0
    tokens: int = 0
    supervised_tokens: int = 0

    def lines(self) -> list[str]:
        out = [
            f"data: {', '.join(self.files)} ({', '.join(self.formats)}): {self.records} records -> "
            f"{self.train} train + {self.eval} eval samples, {self.tokens} tokens, {self.supervised_tokens} supervised",
        ]
        if self.skipped_bad:
            out.append(f"data: skipped {len(self.skipped_bad)} bad records (--skip-bad-records):")
            out += [f"  {src}:{line}: {why}" for src, line, why in self.skipped_bad[:20]]
            if len(self.skipped_bad) > 20:
                out.append(f"  ... and {len(self.skipped_bad) - 20} more")
        if self.truncated:
            out.append(f"data: truncated {self.truncated} samples longer than max_length")
        if self.dropped_no_supervision:
            out.append(
                f"data: dropped {len(self.dropped_no_supervision)} samples whose supervised tokens all lie beyond "
                "max_length (raise max_length to keep them): "
                + ", ".join(f"{s}:{ln}" for s, ln in self.dropped_no_supervision[:10])
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records, "skipped_bad_records": len(self.skipped_bad), "truncated": self.truncated,
            "dropped_no_supervision": len(self.dropped_no_supervision), "train_samples": self.train,
            "eval_samples": self.eval, "tokens": self.tokens, "supervised_tokens": self.supervised_tokens,
        }


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def truncate(enc: EncodedConversation, max_length: int) -> tuple[EncodedConversation, bool]:
    if len(enc.input_ids) <= max_length:
        return enc, False
    return EncodedConversation(enc.input_ids[:max_length], enc.labels[:max_length]), True


def _encode_file(path: str, recipe, family, tokenizer, masking: str, report: SampleReport) -> list[Sample]:
    read = read_conversations(path, fmt=recipe.data_format, skip_bad_records=recipe.skip_bad_records)
    report.files.append(path)
    report.formats.append(read.format)
    report.records += len(read.conversations) + len(read.skipped)
    report.skipped_bad += [(path, line, why) for line, why in read.skipped]
    samples = []
    for conv in read.conversations:
        enc = family.encode(tokenizer, with_system(conv.messages, recipe.system), masking)
        enc, cut = truncate(enc, recipe.max_length)
        report.truncated += cut
        # The loss predicts token i from tokens < i, so the first position's label never counts.
        if all(x == IGNORE_INDEX for x in enc.labels[1:]):
            report.dropped_no_supervision.append((conv.source, conv.line))
            continue
        samples.append(Sample(enc.input_ids, enc.labels, conv.source, conv.line))
    return samples


def prepare_samples(recipe, family, tokenizer, masking: str) -> tuple[list[Sample], list[Sample], SampleReport]:
    report = SampleReport()
    train = _encode_file(recipe.data, recipe, family, tokenizer, masking, report)
    if recipe.eval_data:
        evals = _encode_file(recipe.eval_data, recipe, family, tokenizer, masking, report)
    elif recipe.eval_split > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(recipe.seed).shuffle(order)
        n_eval = max(1, int(round(len(train) * recipe.eval_split)))
        held = set(order[:n_eval])
        evals = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
    else:
        evals = []
    if not train:
        raise FamtuneError(f"{recipe.data}: no trainable sample left; see the counts above")
    report.train, report.eval = len(train), len(evals)
    report.tokens = sum(len(s.input_ids) for s in train)
    report.supervised_tokens = sum(sum(1 for x in s.labels if x != IGNORE_INDEX) for s in train)
    return train, evals, report
