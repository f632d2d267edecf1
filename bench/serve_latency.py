"""Time to first token and tokens/s: ``famtune serve`` (streamed over HTTP) against the in-process
chat generation ``famtune chat`` uses, on the same model and prompts (greedy).

    python bench/serve_latency.py MODEL_DIR [--adapter DIR] [--max-tokens 64] [--runs 5]

Prints one line per path: median time to first token and median tokens/s of the reply.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import ServerProcess

from famtune.chat import load_chat_model

PROMPTS = ["Who are you?", "请介绍一下你自己", "tell me a story", "hello there"]


def measure_chat(model, adapter, max_tokens, runs):
    session = load_chat_model(model, adapter)
    rows = []
    for i in range(runs):
        prompt = PROMPTS[i % len(PROMPTS)]
        first: list[float] = []
        start = time.perf_counter()
        gen = session.generate(
            session.prompt_ids([{"role": "user", "content": prompt}]),
            session.settings(greedy=True),
            max_new_tokens=max_tokens,
            on_text=lambda t, first=first: first or first.append(time.perf_counter()),
        )
        total = time.perf_counter() - start
        rows.append((first[0] - start, len(gen.new_ids) / total))
    return rows


def measure_serve(model, adapter, max_tokens, runs):
    args = [model] + (["--adapter", f"tuned={adapter}"] if adapter else [])
    name = "tuned" if adapter else Path(model).name
    rows = []
    with ServerProcess(*args) as srv:
        for i in range(runs):
            prompt = PROMPTS[i % len(PROMPTS)]
            body = {
                "model": name,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": max_tokens,
                "stream": True,
            }
            first, usage, start = None, None, time.perf_counter()
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as resp:
                for line in resp.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
                    usage = chunk.get("usage") or usage
            total = time.perf_counter() - start
            rows.append((first - start, usage["completion_tokens"] / total))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--adapter")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=8)
    a = p.parse_args()
    for label, fn in (("famtune chat (in process)", measure_chat), ("famtune serve (HTTP, SSE)", measure_serve)):
        rows = fn(a.model, a.adapter, a.max_tokens, a.runs)[1:]  # the first run warms up
        print(
            f"{label}: time to first token {statistics.median(r[0] for r in rows) * 1000:.0f} ms, "
            f"{statistics.median(r[1] for r in rows):.1f} tokens/s (median of {len(rows)})"
        )


if __name__ == "__main__":
    main()
