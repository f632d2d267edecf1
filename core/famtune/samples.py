"""From data files to model-ready samples: read, encode through the plugin, truncate, split.

Nothing is dropped silently: bad records skipped, samples truncated and samples dropped because
truncation would leave no supervised token are all counted in ``SampleReport``.

Large files are encoded over several processes; every encoded file is cached (see ``prepcache``)
so that a second run with the same inputs reads the samples back instead of re-tokenising.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from famtune.data import DataError, no_usable_error, plan_lines, read_conversations, read_lines
from famtune.encoding import IGNORE_INDEX, EncodedConversation, TokenCache, memoised_tokenization
from famtune.errors import FamtuneError


class Sample:
    """One model-ready sample: its ids, labels and the record it came from.

    Samples read from an encoded file hold slices of the file's flat arrays and give their ids
    and labels as lists on access, so 100k samples cost no list building up front.
    """

    __slots__ = ("_ids", "_labels", "source", "line", "num_supervised")

    def __init__(self, input_ids, labels, source: str, line: int, num_supervised: int | None = None) -> None:
        self._ids, self._labels, self.source, self.line = input_ids, labels, source, line
        if num_supervised is None:
            num_supervised = sum(1 for x in labels if x != IGNORE_INDEX)
        self.num_supervised = int(num_supervised)

    @property
    def input_ids(self) -> list[int]:
        ids = self._ids
        return ids if isinstance(ids, list) else ids.tolist()

    @property
    def labels(self) -> list[int]:
        labels = self._labels
        return labels if isinstance(labels, list) else labels.tolist()

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"Sample({self.source}:{self.line}, {len(self)} tokens, {self.num_supervised} supervised)"


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
    cache_lines: list[str] = field(default_factory=list)  # per file: encoded fresh or reused from the cache

    def lines(self) -> list[str]:
        out = [
            *self.cache_lines,
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
            "records": self.records,
            "skipped_bad_records": len(self.skipped_bad),
            "truncated": self.truncated,
            "dropped_no_supervision": len(self.dropped_no_supervision),
            "train_samples": self.train,
            "eval_samples": self.eval,
            "tokens": self.tokens,
            "supervised_tokens": self.supervised_tokens,
        }


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def truncate(enc: EncodedConversation, max_length: int) -> tuple[EncodedConversation, bool]:
    if len(enc.input_ids) <= max_length:
        return enc, False
    return EncodedConversation(enc.input_ids[:max_length], enc.labels[:max_length]), True


# Below this many conversations the cost of starting worker processes outweighs the gain.
PARALLEL_MIN_CONVERSATIONS = 2000
PROCESSES_ENV = "FAMTUNE_PREP_PROCESSES"

# Handed to forked workers by inheritance: the tokenizer and the plugin facade are not sent over a pipe.
_JOB: dict[str, Any] = {}


def _encode_range(kind: str, start: int, stop: int):
    """Encode conversations [start, stop) of the current job (``kind`` "conversations"), or read
    lines [start, stop) of its JSON Lines plan and encode them (``kind`` "lines"), into flat int32
    arrays; also returns the records read, the bad records skipped and the first bad record."""
    import numpy as np

    job = _JOB
    family, tokenizer, masking, system, max_length = (
        job["family"],
        job["tokenizer"],
        job["masking"],
        job["system"],
        job["max_length"],
    )
    skipped: list[tuple[int, str]] = []
    error = None
    if kind == "lines":
        part = read_lines(job["plan"], start, stop)
        conversations, skipped, error = part.conversations, part.skipped, part.error
    else:
        conversations = job["conversations"][start:stop]
    ids: list[int] = []
    labels: list[int] = []
    lengths, lines, dropped = [], [], []
    truncated = 0
    if "token_cache" not in job:  # one per process, kept across its chunks
        job["token_cache"] = TokenCache(tokenizer)
    # The loop allocates millions of small objects and no reference cycles: the cyclic collector's
    # passes over them would only cost time (about 6%, measured).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with memoised_tokenization(job["token_cache"]):
            for conv in conversations:
                truncated += _encode_one(
                    conv, family, tokenizer, masking, system, max_length, ids, labels, lengths, lines, dropped
                )
    finally:
        if collecting:
            gc.enable()
    return (
        np.asarray(ids, dtype=np.int32),
        np.asarray(labels, dtype=np.int32),
        np.asarray(lengths, dtype=np.int64),
        np.asarray(lines, dtype=np.int64),
        truncated,
        dropped,
        len(conversations),
        skipped,
        error,
    )


def _encode_one(conv, family, tokenizer, masking, system, max_length, ids, labels, lengths, lines, dropped) -> int:
    """Encode one conversation onto the flat lists; returns 1 if it was truncated."""
    enc = family.encode(tokenizer, with_system(conv.messages, system), masking)
    enc, cut = truncate(enc, max_length)
    # The loss predicts token i from tokens < i, so the first position's label never counts.
    if enc.labels[1:].count(IGNORE_INDEX) == len(enc.labels) - 1:
        dropped.append(conv.line)
        return int(cut)
    ids += enc.input_ids
    labels += enc.labels
    lengths.append(len(enc.input_ids))
    lines.append(conv.line)
    return int(cut)


def _work(conversations: list, plan) -> int:
    """Conversations to encode: those read already, plus the lines of a plan the workers read."""
    return len(conversations) + (len(plan.lines) - plan.start if plan is not None else 0)


def _processes(n_conversations: int, requested: int | None) -> int:
    if requested is None:
        env = os.environ.get(PROCESSES_ENV)
        if env:
            try:
                requested = int(env)
            except ValueError:
                raise FamtuneError(
                    f"{PROCESSES_ENV}={env!r} is not a number; set it to a process count, e.g. 2"
                ) from None
        elif n_conversations < PARALLEL_MIN_CONVERSATIONS:
            requested = 1
        else:
            requested = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Workers inherit the tokenizer and plugins by fork; without fork the one-process path is used.
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(requested, n_conversations // 64 or 1))


def encode_conversations(
    conversations: list,
    family,
    tokenizer,
    masking: str,
    system: str | None,
    max_length: int,
    processes: int | None = None,
):
    """Encode, truncate and filter conversations, over several processes for large inputs.

    Returns ``(ids, labels, lengths, lines, truncated, dropped_lines)`` with flat int32 ids and
    labels. The result does not depend on the number of processes.
    """
    return read_and_encode(conversations, family, tokenizer, masking, system, max_length, processes)[:6]


def read_and_encode(
    conversations: list,
    family,
    tokenizer,
    masking: str,
    system: str | None,
    max_length: int,
    processes: int | None = None,
    plan=None,
):
    """``encode_conversations``, and with a ``famtune.data.LinesPlan`` the lines after
    ``plan.start`` are read by the worker processes too (after ``conversations``: the plan's head).

    Returns ``(ids, labels, lengths, lines, truncated, dropped_lines, conversations_read,
    skipped_bad)``. A bad record raises ``DataError`` (the first in file order) unless the plan
    skips them.
    """
    import numpy as np

    n = len(conversations)
    tasks = [("conversations", 0, n)] if n else []
    if plan is not None:
        tasks += [("lines", plan.start, len(plan.lines))]
    work = _work(conversations, plan)
    procs = _processes(work, processes)
    _JOB.update(
        family=family,
        tokenizer=tokenizer,
        masking=masking,
        system=system,
        max_length=max_length,
        conversations=conversations,
        plan=plan,
    )
    try:
        if procs <= 1:
            parts = [_encode_range(*t) for t in tasks]
        else:
            # Several chunks per process even out slow and fast chunks; order is kept by map.
            step = max(1, -(-work // (procs * 8)))
            bounds = [(kind, i, min(i + step, b)) for kind, a, b in tasks for i in range(a, b, step)]
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            try:
                with multiprocessing.get_context("fork").Pool(procs) as pool:
                    parts = pool.starmap(_encode_range, bounds)
            except Exception:
                # A plugin error inside a worker loses its type on the way back; read and encode
                # here to raise it with its own message (a bad record first, as when reading).
                if plan is not None:
                    read_lines(plan, plan.start, len(plan.lines)).raise_error(plan.source)
                parts = [_encode_range(*t) for t in tasks]
    finally:
        _JOB.clear()
    if plan is not None:
        for p in parts:
            if p[8] is not None:
                raise DataError(plan.source, *p[8])
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    lengths = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    lines = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int64)
    return (
        ids,
        labels,
        lengths,
        lines,
        sum(p[4] for p in parts),
        [x for p in parts for x in p[5]],
        sum(p[6] for p in parts),
        [x for p in parts for x in p[7]],
    )


def _encode_file_arrays(path: str, recipe, family, tokenizer, masking: str, tokenizer_hash: str, report: SampleReport):
    import numpy as np

    from famtune import prepcache

    key = prepcache.cache_key(
        path,
        tokenizer_hash,
        family,
        masking=masking,
        system=recipe.system,
        max_length=recipe.max_length,
        data_format=recipe.data_format,
        skip_bad_records=recipe.skip_bad_records,
    )
    cached = prepcache.load(key)
    if cached is not None:
        report.cache_lines.append(f"data: {path}: reused the cached encoding {prepcache.entry_path(key)}")
        return cached
    started = time.perf_counter()
    # JSON Lines are read by the worker processes as they encode; other files are read here.
    plan = plan_lines(path, fmt=recipe.data_format, skip_bad_records=recipe.skip_bad_records)
    if plan is None:
        read = read_conversations(path, fmt=recipe.data_format, skip_bad_records=recipe.skip_bad_records)
        head, head_skipped, data_format = read.conversations, list(read.skipped), read.format
    else:
        head, head_skipped, data_format = plan.head.conversations, list(plan.head.skipped), plan.format
    procs = _processes(_work(head, plan), None)
    ids, labels, lengths, lines, truncated, dropped, read_n, skipped = read_and_encode(
        head, family, tokenizer, masking, recipe.system, recipe.max_length, procs, plan=plan
    )
    skipped = head_skipped + skipped
    if plan is not None and read_n == 0:
        raise no_usable_error(path, skipped)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    enc = prepcache.EncodedFile(
        format=data_format,
        records=read_n + len(skipped),
        skipped_bad=skipped,
        truncated=truncated,
        dropped_lines=dropped,
        ids=ids,
        labels=labels,
        offsets=offsets,
        lines=lines,
    )
    where = prepcache.save(key, enc)
    report.cache_lines.append(
        f"data: {path}: encoded {read_n} conversations in {time.perf_counter() - started:.1f}s "
        f"({procs} process{'es' if procs > 1 else ''}); "
        + (f"cached as {where}" if where else f"could not write the cache under {prepcache.cache_root()}")
    )
    return enc


def _encode_file(
    path: str, recipe, family, tokenizer, masking: str, tokenizer_hash: str, report: SampleReport
) -> list[Sample]:
    enc = _encode_file_arrays(path, recipe, family, tokenizer, masking, tokenizer_hash, report)
    report.files.append(path)
    report.formats.append(enc.format)
    report.records += enc.records
    report.skipped_bad += [(path, line, why) for line, why in enc.skipped_bad]
    report.truncated += enc.truncated
    report.dropped_no_supervision += [(path, line) for line in enc.dropped_lines]
    import numpy as np

    offsets = enc.offsets.tolist()
    supervised = (enc.labels != IGNORE_INDEX).astype(np.int64)
    per_sample = np.add.reduceat(supervised, enc.offsets[:-1]).tolist() if len(offsets) > 1 else []
    ids, labels = enc.ids, enc.labels
    return [
        Sample(ids[a:b], labels[a:b], path, line, n)
        for a, b, line, n in zip(offsets[:-1], offsets[1:], enc.lines.tolist(), per_sample)
    ]


def prepare_samples(recipe, family, tokenizer, masking: str) -> tuple[list[Sample], list[Sample], SampleReport]:
    from famtune.prepcache import tokenizer_digest

    report = SampleReport()
    tok_hash = tokenizer_digest(tokenizer)
    train = _encode_file(recipe.data, recipe, family, tokenizer, masking, tok_hash, report)
    if recipe.eval_data:
        evals = _encode_file(recipe.eval_data, recipe, family, tokenizer, masking, tok_hash, report)
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
    report.tokens = sum(len(s) for s in train)
    report.supervised_tokens = sum(s.num_supervised for s in train)
    return train, evals, report
