"""``famtune data check``: validate a data file against a model's family plugin and show what the
model will be trained on, with the supervised spans marked."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from famtune.encoding import IGNORE_INDEX

OPEN, CLOSE = "[[", "]]"


def render_supervision(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The decoded sample with every run of supervised tokens wrapped in [[ ]]."""
    out, run, supervised = [], [], None
    for tid, label in zip(input_ids, labels):
        sup = label != IGNORE_INDEX
        if supervised is not None and sup != supervised:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{OPEN}{text}{CLOSE}" if supervised else text)
            run = []
        supervised = sup
        run.append(tid)
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"{OPEN}{text}{CLOSE}" if supervised else text)
    return "".join(out)


def data_check(
    path: str,
    model: str,
    *,
    fmt: str = "auto",
    masking: str | None = None,
    max_length: int = 1024,
    skip_bad_records: bool = False,
    family: str | None = None,
    trust_remote_code: bool = False,
    out=sys.stdout,
) -> int:
    from famtune.checkpoint import open_checkpoint
    from famtune.samples import prepare_samples

    ckpt = open_checkpoint(model, family=family, trust_remote_code=trust_remote_code)
    tokenizer = ckpt.load_tokenizer()
    policies = ckpt.family.masking_policies()
    masking = masking or policies[0]
    recipe = SimpleNamespace(
        data=path,
        data_format=fmt,
        skip_bad_records=skip_bad_records,
        system=None,
        max_length=max_length,
        eval_data=None,
        eval_split=0.0,
        seed=0,
    )
    train, _, report = prepare_samples(recipe, ckpt.family, tokenizer, masking)
    print(
        f"model: {model} -> {ckpt.family.info.describe()}, family {ckpt.family.name}, masking {masking} "
        f"(offered: {', '.join(policies)})",
        file=out,
    )
    for line in report.lines():
        print(line, file=out)
    sample = train[0]
    n_sup = sum(1 for x in sample.labels if x != IGNORE_INDEX)
    print(
        f"\nfirst sample ({sample.source}:{sample.line}): {len(sample.input_ids)} tokens, {n_sup} supervised, "
        f"shown between {OPEN} and {CLOSE}:",
        file=out,
    )
    print(render_supervision(tokenizer, sample.input_ids, sample.labels), file=out)
    return 0
