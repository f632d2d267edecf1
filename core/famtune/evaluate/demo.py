"""``famtune eval --demo``: a tiny model goes from chance to well above it on a bundled MCQ set.

The bundled set (``demo_data/mcq_train.jsonl``, ``mcq_test.jsonl``, MedQA layout) asks 24 made-up
basic medical facts; the test split asks each fact in a wording the training split never uses,
with the same options. The demo runs ``famtune compare`` on one tiny model with the recipe's
``eval:`` task (so the compare report shows base → tuned), then ``famtune eval`` on the base and
on base + adapter, the way a user scores a model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from famtune.demo import DEMO_DIR
from famtune.evaluate.records import read_eval_file
from famtune.evaluate.scoring import EvalSettings, mcq_conversations

RECIPE = DEMO_DIR / "eval_demo.yaml"
TRAIN = DEMO_DIR / "mcq_train.jsonl"
TEST = DEMO_DIR / "mcq_test.jsonl"


def demo_recipe(work: Path, family: str | None = None, steps: int | None = None) -> Path:
    """The demo's comparison recipe in ``work``, with its training split converted to messages."""
    work.mkdir(parents=True, exist_ok=True)
    conversations = work / "mcq_train.messages.jsonl"
    conversations.write_text(
        "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in mcq_conversations(read_eval_file(str(TRAIN), "mcq"))),
        encoding="utf-8",
    )
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    recipe["data"] = str(conversations)
    recipe["eval"]["data"] = str(TEST)
    if family:
        recipe["models"] = [f"tiny:{family}"]
    if steps:
        recipe["max_steps"] = steps
    path = work / "eval_demo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_eval_demo(
    workdir: str, family: str | None = None, steps: int | None = None, log: Callable[[str], Any] = print
) -> int:
    from famtune.compare import compare
    from famtune.evaluate.runner import run_eval

    t0 = time.perf_counter()
    work = Path(workdir).resolve()
    recipe = demo_recipe(work, family, steps)
    spec = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    code = compare(str(recipe), output=str(work / "compare"), log=log)
    if code != 0:
        log("eval demo: FAILED: the fine-tune did not finish; see the compare log above")
        return 1
    model = spec["models"][0]
    fam = model.split(":", 1)[1]
    base, adapter = work / "compare" / "tiny-bases" / fam, work / "compare" / f"tiny-{fam}"
    settings = EvalSettings(batch_size=spec["eval"].get("batch_size", 8), progress=False)
    before = run_eval(str(base), str(TEST), "mcq", output=str(work / "eval-base"), settings=settings, log=log)
    after = run_eval(
        str(base), str(TEST), "mcq", adapter=str(adapter), output=str(work / "eval-tuned"), settings=settings, log=log
    )
    n = before["questions"]
    chance = sum(1.0 / len(it.options) for it in read_eval_file(str(TEST), "mcq")) / n
    log(f"eval demo: {fam}, {n} held-out questions, chance {chance:.0%}")
    log(f"  {'method':<26}{'base':>8}{'tuned':>8}")
    for label, key in (("option log-likelihood", "loglikelihood"), ("greedy answer", "generation")):
        log(f"  {label:<26}{before[key]['accuracy']:>8.1%}{after[key]['accuracy']:>8.1%}")
    ok = all(after[k]["ci95"][0] > chance for k in ("loglikelihood", "generation"))
    log(
        f"eval demo: {'OK' if ok else 'FAILED'} (tuned accuracy {'above' if ok else 'not above'} chance with 95% "
        f"confidence) in {time.perf_counter() - t0:.0f}s; report: {work / 'compare' / 'report' / 'report.html'}"
    )
    return 0 if ok else 1
