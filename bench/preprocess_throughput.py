#!/usr/bin/env python
"""Data preparation speed: famtune (cold and warm cache) against TRL's dataset preparation.

Builds a 100k-conversation file by repeating the shared fixture's train.jsonl, then measures
conversations/s for reading, encoding (chat format + assistant-only labels) and truncation to
max_length. TRL is measured through ``SFTTrainer._prepare_dataset`` (datasets ``map`` with
``apply_chat_template`` and assistant masks), the step a TRL user waits for, in TRL's own venv:
with its default (one process) and with ``dataset_num_proc`` set to famtune's process count.

famtune tokenizes each distinct piece of text once (see famtune.encoding.TokenCache), and a
repeated file repeats every piece. ``--unique`` measures a file of distinct conversations instead,
made from the fixture's by replacing about a third of the words (see ``unique_file``), where
only role headers, newlines and the odd short message repeat. The cache is cold for the first
famtune run (a fresh FAMTUNE_CACHE), warm for the second.

``tokenizer_only`` is the Rust tokenizer alone over the same text in one process: every
preparation pays it, so ``ceiling_ratio_vs_trl_num_proc`` is the most any preparation with this
tokenizer could gain over TRL with ``dataset_num_proc``.

TRL runs in its own interpreter (``TRL_PYTHON``, default /tmp/trlvenv/bin/python), made with
``python -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 transformers trl datasets``;
without it the result says TRL was not measured.

``--before DIR`` also measures another checkout's famtune (its ``core/`` directory) cold, the same way.
Wall times on a shared machine follow the other jobs; the ``cpu_s`` fields (this process and its
workers) do much less, so compare those when the load changes during a run.

Usage: python bench/preprocess_throughput.py [--fixture DIR] [--conversations 100000] [--unique]
[--no-trl-single] [--before DIR].  Prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
TRL_PYTHON = Path(os.environ.get("TRL_PYTHON", "/tmp/trlvenv/bin/python"))

# Run by TRL's interpreter: the preparation SFTTrainer performs before training, nothing else.
TRL_PREP = r"""
import json, resource, sys, time, tempfile
import datasets
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer
datasets.disable_progress_bars()
data, model, max_length, procs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model)
def cpu():
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
c0 = cpu()
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as cache:  # a fresh datasets cache: nothing reused from earlier runs
    ds = load_dataset("json", data_files=data, split="train", cache_dir=cache)
    args = SFTConfig(output_dir=cache, max_length=max_length, assistant_only_loss=True, packing=False,
                     dataset_num_proc=procs or None, report_to="none", use_cpu=True)
    class Host:  # the attributes _prepare_dataset reads from the trainer
        _tokenizer = tok
        chat_template = None
        completion_only_loss = False
        _is_vision_dataset = False
    out = SFTTrainer._prepare_dataset(Host(), ds, tok, args, False, None, "train")
    n = len(out)
    elapsed = time.perf_counter() - t0
print("TRL", json.dumps({"seconds": elapsed, "cpu_seconds": cpu() - c0, "rows": n}))
"""


def ensure_fixture(fixture: Path) -> Path:
    if not (fixture / "data" / "train.jsonl").exists():
        subprocess.run(
            [sys.executable, str(SHARED_BENCH / "make_fixture.py"), str(fixture)], check=True, stdout=subprocess.DEVNULL
        )
    return fixture


def repeated_file(fixture: Path, n: int) -> Path:
    out = fixture / "data" / f"train_{n}.jsonl"
    if out.exists():
        return out
    lines = (fixture / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    with open(out, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(lines[i % len(lines)] + "\n")
    return out


def unique_file(fixture: Path, n: int) -> Path:
    """``n`` distinct conversations made from the fixture's 2,000: conversation ``i`` is fixture
    conversation ``i % 2000`` with about a third of its words replaced by words drawn from the
    fixture's word list by ``random.Random(i)``, keeping case and punctuation. Deterministic, a few
    seconds to build; no two conversations are equal (checked)."""
    out = fixture / "data" / f"train_unique_{n}.jsonl"
    if out.exists():
        return out
    import random

    base = [json.loads(line) for line in (fixture / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    words = (fixture / "data" / "words.txt").read_text(encoding="utf-8").split()
    word = re.compile(r"[A-Za-z]+")
    seen: set[bytes] = set()
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            for attempt in range(100):
                rng = random.Random(i * 100 + attempt)

                def vary(m: re.Match, rng: random.Random = rng) -> str:
                    if rng.random() >= 0.35:
                        return m.group(0)
                    w = rng.choice(words)
                    return w.capitalize() if m.group(0)[0].isupper() else w

                record = {
                    "messages": [
                        {"role": m["role"], "content": word.sub(vary, m["content"])}
                        for m in base[i % len(base)]["messages"]
                    ]
                }
                line = json.dumps(record, ensure_ascii=False)
                digest = hashlib.blake2b(line.encode(), digest_size=16).digest()
                if digest not in seen:
                    break
            else:
                raise SystemExit(f"could not make conversation {i} distinct")
            seen.add(digest)
            f.write(line + "\n")
    tmp.replace(out)
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the encoding workers): on a shared
    machine this, unlike wall time, does not grow with the other jobs."""
    import resource

    return sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )


def famtune_prepare(data: Path, model: Path, max_length: int) -> tuple[float, float, int, list[str]]:
    from famtune.checkpoint import open_checkpoint
    from famtune.samples import prepare_samples

    ckpt = open_checkpoint(str(model))
    tok = ckpt.load_tokenizer()
    recipe = SimpleNamespace(
        data=str(data),
        data_format="auto",
        skip_bad_records=False,
        system=None,
        max_length=max_length,
        eval_data=None,
        eval_split=0.0,
        seed=0,
    )
    c0, t0 = cpu_seconds(), time.perf_counter()
    train, _, report = prepare_samples(recipe, ckpt.family, tok, "all_assistant")
    return time.perf_counter() - t0, cpu_seconds() - c0, len(train), report.lines()


def trl_prepare(data: Path, model: Path, max_length: int, procs: int) -> dict | None:
    if not TRL_PYTHON.exists():
        return None
    res = subprocess.run(
        [str(TRL_PYTHON), "-c", TRL_PREP, str(data), str(model), str(max_length), str(procs)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    for line in res.stdout.splitlines():
        if line.startswith("TRL "):
            return json.loads(line[4:])
    print(res.stderr[-2000:], file=sys.stderr)
    return None


def tokenizer_floor(data: Path, model: Path) -> float:
    """Seconds the Rust tokenizer alone takes, in one process, to tokenize every message of
    ``data`` (role header and content, batched, no offsets): the part of any preparation's time
    that batching or fewer Python calls cannot remove."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process, like each worker
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    texts = [
        m["role"] + "\n" + m["content"]
        for line in data.read_text(encoding="utf-8").splitlines()
        for m in json.loads(line)["messages"]
    ]
    t0 = time.perf_counter()
    for start in range(0, len(texts), 10_000):
        tok.encode_batch_fast(texts[start : start + 10_000], add_special_tokens=False)
    elapsed = time.perf_counter() - t0
    if before is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    return elapsed


def famtune_elsewhere(core: str, argv: list[str]) -> dict:
    """famtune's cold preparation with another checkout's ``core/`` first on the path."""
    res = subprocess.run(
        [sys.executable, __file__, *argv, "--famtune-only"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": core},
    )
    for line in res.stdout.splitlines():
        if line.startswith("FAMTUNE "):
            return json.loads(line[8:])
    raise SystemExit(f"famtune from {core} failed:\n{res.stderr[-2000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default="/tmp/famtune-bench-fixture")
    ap.add_argument("--conversations", type=int, default=100_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--unique", action="store_true", help="distinct conversations instead of a repeated fixture")
    ap.add_argument("--no-trl-single", action="store_true", help="measure TRL with dataset_num_proc only")
    ap.add_argument("--before", help="another famtune checkout's core/ directory, measured cold the same way")
    ap.add_argument("--famtune-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    fixture = ensure_fixture(Path(args.fixture))
    data = unique_file(fixture, args.conversations) if args.unique else repeated_file(fixture, args.conversations)
    model = fixture / "model"
    n = args.conversations
    cache = tempfile.mkdtemp(prefix="famtune-prep-cache-")
    os.environ["FAMTUNE_CACHE"] = cache
    try:
        cold_s, cold_cpu, kept, cold_lines = famtune_prepare(data, model, args.max_length)
        if args.famtune_only:
            print("FAMTUNE " + json.dumps({"seconds": cold_s, "cpu_seconds": cold_cpu, "samples": kept}))
            return 0
        warm_s, _, kept_warm, warm_lines = famtune_prepare(data, model, args.max_length)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert kept == kept_warm, (kept, kept_warm)
    for line in cold_lines[:1] + warm_lines[:1]:
        print(line)
    from famtune.samples import _processes

    procs = _processes(n, None)
    result = {
        "data": "unique" if args.unique else "repeated fixture",
        "conversations": n,
        "samples": kept,
        "famtune_processes": procs,
        "famtune_cold_s": round(cold_s, 2),
        "famtune_warm_s": round(warm_s, 2),
        "famtune_cold_conv_per_s": round(n / cold_s),
        "famtune_cold_cpu_s": round(cold_cpu, 2),
        "famtune_warm_conv_per_s": round(n / warm_s),
    }
    if args.before:
        before = famtune_elsewhere(args.before, sys.argv[1:])
        result.update(
            before_cold_s=round(before["seconds"], 2),
            before_cold_conv_per_s=round(n / before["seconds"]),
            before_cold_cpu_s=round(before["cpu_seconds"], 2),
        )
    floor_c0 = cpu_seconds()
    floor_s = tokenizer_floor(data, model)
    floor_cpu = cpu_seconds() - floor_c0
    result.update(
        tokenizer_only_s=round(floor_s, 2),
        tokenizer_only_conv_per_s=round(n / floor_s),
        tokenizer_only_cpu_s=round(floor_cpu, 2),
    )
    if not TRL_PYTHON.exists():
        result["trl"] = f"not measured: no TRL interpreter at {TRL_PYTHON} (set TRL_PYTHON; see the module docstring)"
    trl = trl_prepare(data, model, args.max_length, 0) if TRL_PYTHON.exists() and not args.no_trl_single else None
    if trl:
        result.update(
            trl_s=round(trl["seconds"], 2),
            trl_conv_per_s=round(n / trl["seconds"]),
            ratio_cold_vs_trl=round(trl["seconds"] / cold_s, 2),
            trl_cpu_s=round(trl["cpu_seconds"], 2),
            ratio_warm_vs_trl=round(trl["seconds"] / warm_s, 2),
        )
    trl_par = trl_prepare(data, model, args.max_length, procs) if procs > 1 else None
    if trl_par:
        result.update(
            trl_num_proc=procs,
            trl_num_proc_s=round(trl_par["seconds"], 2),
            trl_num_proc_conv_per_s=round(n / trl_par["seconds"]),
            ratio_cold_vs_trl_num_proc=round(trl_par["seconds"] / cold_s, 2),
            trl_num_proc_cpu_s=round(trl_par["cpu_seconds"], 2),
            cpu_ratio_cold_vs_trl_num_proc=round(trl_par["cpu_seconds"] / cold_cpu, 2),
            # What no preparation that tokenizes every text with this tokenizer can beat.
            ceiling_ratio_vs_trl_num_proc=round(trl_par["seconds"] / (floor_s / procs), 2),
            cpu_ceiling_ratio_vs_trl_num_proc=round(trl_par["cpu_seconds"] / floor_cpu, 2),
        )
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
