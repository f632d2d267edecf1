"""``famtune demo``: the whole job on a tiny model, with nothing downloaded.

It asks the demo family's plugin for a tiny random-weight checkpoint with a tokenizer trained on
the bundled self-identity set, fine-tunes it with QLoRA, merges the adapter, and chats with the
merged model, checking that each identity question gets its trained answer and that generation
stops.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from famtune.errors import FamtuneError

DEMO_DIR = Path(__file__).with_name("demo_data")


def demo_corpus() -> list[str]:
    texts = []
    for line in (DEMO_DIR / "identity.jsonl").read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            texts.append(m["content"])
    return texts


def expected_answers() -> dict[str, str]:
    """Each evaluation question's trained answer, read from the bundled data."""
    answers = {}
    for line in (DEMO_DIR / "identity.jsonl").read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        answers.setdefault(msgs[0]["content"], msgs[1]["content"])
    return answers


def run_demo(workdir: str, family: str | None = None, steps: int | None = None, log=print) -> int:
    from famtune.chat import load_chat_model
    from famtune.merge import merge
    from famtune.plugins import get_plugins
    from famtune.recipe import load_recipe
    from famtune.train import train

    t0 = time.perf_counter()
    work = Path(workdir).resolve()
    base, out, merged = work / "tiny-base", work / "adapter", work / "merged"
    overrides = {"model": str(base), "output_dir": str(out)}
    if family:
        overrides["family"] = family
    if steps:
        overrides["max_steps"] = steps
    recipe = load_recipe(str(DEMO_DIR / "demo.yaml"), overrides)
    fam = get_plugins().claim({}, "", family=recipe.family)
    base.mkdir(parents=True, exist_ok=True)
    if not fam.tiny_checkpoint(str(base), demo_corpus()):
        raise FamtuneError(f"{fam.info.describe()} cannot build a tiny {fam.name} checkpoint; pick another --family")
    log(f"demo: tiny {fam.name} checkpoint in {base}")
    train(recipe, log=log, overwrite=True)  # a demo replaces the previous demo in its workdir
    merge(str(out), str(merged), log=log)
    session = load_chat_model(str(merged))
    expected = expected_answers()
    ok = True
    for question in recipe.evaluation_inputs:
        reply = session.reply(
            [{"role": "user", "content": question}], greedy=True, max_new_tokens=recipe.max_new_tokens
        )
        # Some families open a reply with a header line (their own chat() strips it as well).
        good = reply.strip() == expected.get(question)
        ok &= good
        log(
            f"demo chat> {question}\n{reply}\n  [{'trained answer, stopped' if good else 'DIFFERS from the trained answer'}]"
        )
    log(f"demo: {'OK' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f}s; try: famtune chat {merged}")
    return 0 if ok else 1
