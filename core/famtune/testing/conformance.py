"""The conformance suite: what every family plugin must get right, checked on a tiny model.

For each family of a plugin, the plugin builds a tiny random-weight checkpoint
(``famtune_tiny_checkpoint``); the suite then checks the claim, the chat template, the labels,
the stop ids, the LoRA targets, a QLoRA step, the merge and declared packing support, through
the same ``Family`` facade and the same train/merge code a real run uses. Every check runs even
when an earlier one failed, so one report lists everything to fix.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from famtune.encoding import GENERIC_POLICIES, IGNORE_INDEX
from famtune.errors import FamtuneError
from famtune.types import PluginInfo

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"

#: Conversations every family must render, label and stop correctly. Contents carry no
#: surrounding whitespace, so families whose official template trims them render them unchanged.
CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am a tiny model trained by famtune."},
    ],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "请介绍一下你自己"},
        {"role": "assistant", "content": "我是一个小模型。"},
    ],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, like grass."},
    ],
]
# Merged logits are compared in fp32; the merge folds B@A into W, so only rounding differs.
MERGE_ATOL = 1e-4
# fp32 tolerance for packed vs alone, absolute plus relative to the logit: the tiny models' wide init
# gives logits of a few tens, where summing in a different order alone moves the last bits by
# ~1e-5. A sample that sees its neighbour moves them by whole units.
PACKING_ATOL = PACKING_RTOL = 1e-5
#: Sample lengths of the packing check, as in famtune's tests/test_packing.py: rows [9, 17, 1, 5],
#: [30, 4] and [11] (the first sample is a real conversation of the family's format).
PACKING_LENGTHS = (9, 17, 1, 5, 30, 4, 11)


@dataclass
class CheckResult:
    family: str
    check: str
    status: str
    detail: str = ""


@dataclass
class Report:
    plugin: PluginInfo
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.status != FAIL for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == FAIL]

    def text(self) -> str:
        lines = [f"conformance of {self.plugin.describe()}:"]
        for r in self.results:
            lines.append(f"  {r.family:<16} {r.check:<12} {r.status.upper():<8} {r.detail}")
        verdict = "PASSED" if self.ok else f"FAILED ({len(self.failures)} check(s))"
        lines.append(f"{verdict} in {self.seconds:.0f}s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin.name,
            "distribution": self.plugin.distribution,
            "version": self.plugin.version,
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "results": [r.__dict__ for r in self.results],
        }


def check_plugin(
    plugin_name: str,
    workdir: str | Path,
    families: list[str] | None = None,
    log: Callable[[str], Any] = lambda line: None,
) -> Report:
    """Run the suite on every family (or the given ones) of the installed plugin ``plugin_name``."""
    from famtune.plugins import Family, get_plugins

    plugins = get_plugins()
    if plugin_name not in plugins.infos:
        for b in plugins.broken:
            if b.info.name == plugin_name:
                raise FamtuneError(f"{b.info.describe()} is disabled: {b.error}")
        installed = ", ".join(plugins.infos) or "none"
        raise FamtuneError(
            f"no plugin named {plugin_name!r} is loaded (loaded: {installed}); "
            "pass the entry-point name that `famtune plugins` lists"
        )
    provided = plugins.families_of(plugin_name)
    unknown = [f for f in families or [] if f not in provided]
    if unknown:
        raise FamtuneError(
            f"{plugins.infos[plugin_name].describe()} provides no family {unknown[0]!r}; "
            f"it provides {', '.join(provided)}"
        )
    report = Report(plugins.infos[plugin_name])
    t0 = time.perf_counter()
    for name in families or provided:
        for result in check_family(Family(plugins, plugin_name, name), Path(workdir) / _safe(name)):
            log(f"{result.family}: {result.check}: {result.status} {result.detail}".rstrip())
            report.results.append(result)
    report.seconds = time.perf_counter() - t0
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def check_family(family, workdir: Path) -> list[CheckResult]:
    """Every check on one family; a check that raises is reported as failed with its message."""
    from famtune.demo import demo_corpus

    results: list[CheckResult] = []
    tiny = workdir / "tiny"
    tiny.mkdir(parents=True, exist_ok=True)
    try:
        built = family.tiny_checkpoint(str(tiny), demo_corpus())
    except FamtuneError as exc:
        return [CheckResult(family.name, "tiny", FAIL, str(exc))]
    if not built:
        return [CheckResult(family.name, "tiny", SKIPPED, "no tiny checkpoint: skipped")]
    state = _State(family, tiny, workdir)
    for check in (
        state.claim,
        state.template,
        state.supervision,
        state.stop_ids,
        state.targets,
        state.qlora_step,
        state.merge,
        state.packing,
    ):
        name = check.__name__.replace("_", " ")
        try:
            status, detail = check()
        except Exception as exc:  # the report must list every problem, not stop at the first
            message = str(exc).splitlines()[0] if str(exc) else ""
            status, detail = (
                FAIL,
                f"{type(exc).__name__}: {message}" if not isinstance(exc, (FamtuneError, AssertionError)) else message,
            )
        results.append(CheckResult(family.name, name, status, detail))
    return results


class _State:
    """One family's tiny checkpoint and what the checks learn about it on the way."""

    def __init__(self, family, tiny: Path, workdir: Path) -> None:
        from famtune.checkpoint import Checkpoint, read_json

        self.family = family
        self.tiny = tiny
        self.workdir = workdir
        # The very Family under test loads the checkpoint (the claim is checked on its own).
        self.ckpt = Checkpoint(str(tiny), str(tiny), read_json(tiny / "config.json"), family)
        self.tokenizer = self.ckpt.load_tokenizer()
        self.adapter: Path | None = None

    def _encode(self, messages, masking="all_assistant", add_generation_prompt=False):
        return self.family.encode(self.tokenizer, messages, masking, add_generation_prompt)

    # -- checks: each returns (status, detail) or raises ----------------------------------------
    def claim(self):
        from famtune.checkpoint import open_checkpoint

        got = open_checkpoint(str(self.tiny)).family
        assert (got.plugin_name, got.name) == (self.family.plugin_name, self.family.name), (
            f"its own tiny checkpoint is claimed by {got.info.describe()} as {got.name!r}"
        )
        return PASS, "claims its own tiny checkpoint"

    def template(self):
        self.family.conversation_template()  # validated by the facade: a fastchat Conversation
        tok = self.tokenizer
        templates = {"famtune_chat_template": self.family.chat_template()}
        if getattr(tok, "chat_template", None):
            templates["the tokenizer's chat_template"] = tok.chat_template
        n = 0
        for messages in CONVERSATIONS:
            for prompt in (False, True):
                msgs = messages[:-1] if prompt else messages
                ours = self._encode(msgs, add_generation_prompt=prompt).input_ids
                for what, tpl in templates.items():
                    theirs = list(
                        tok.apply_chat_template(
                            msgs, chat_template=tpl, tokenize=True, add_generation_prompt=prompt, return_dict=False
                        )
                    )
                    assert theirs == ours, (
                        f"{what} renders {tok.decode(theirs)!r} but famtune_encode_conversation gives "
                        f"{tok.decode(ours)!r} (add_generation_prompt={prompt})"
                    )
                    n += 1
        return PASS, f"{n} renderings equal ({' and '.join(templates)})"

    def supervision(self):
        gen = self.family.generation_defaults(self.tokenizer)
        self.policies = self.family.masking_policies()
        for messages in CONVERSATIONS:
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            for masking, expected in (("all_assistant", answers), ("last_turn", answers[-1:])):
                enc = self._encode(messages, masking)
                spans = _supervised_spans(enc.labels)
                assert len(spans) == len(expected), (
                    f"{masking}: {len(spans)} supervised span(s) for {len(expected)} assistant turn(s) "
                    f"in {[m['role'] for m in messages]}"
                )
                for (start, end), answer in zip(spans, expected):
                    ids = enc.input_ids[start:end]
                    assert enc.labels[start:end] == ids, f"{masking}: labels differ from the ids they supervise"
                    text = self.tokenizer.decode(ids)
                    assert answer in text, f"{masking}: supervised span {text!r} does not hold the answer {answer!r}"
                    assert ids[-1] in gen.stop_ids, (
                        f"{masking}: the supervised turn {text!r} does not end with a stop id "
                        f"(ends with {self.tokenizer.convert_ids_to_tokens(ids[-1])!r}, stop ids {gen.stop_ids}); "
                        "the end-of-turn token must be supervised and be a stop id"
                    )
            enc = self._encode(messages, "train_on_prompt")
            assert enc.num_supervised == len(enc.input_ids), "train_on_prompt leaves tokens unsupervised"
        extra = [p for p in self.policies if p not in GENERIC_POLICIES]
        return PASS, (
            f"every assistant turn and its end-of-turn token; policies {', '.join(self.policies)}"
            + (f" ({len(extra)} family variant(s))" if extra else "")
        )

    def stop_ids(self):
        gen = self.family.generation_defaults(self.tokenizer)  # the facade checks they exist
        eot = {
            self._encode(m).input_ids[e - 1]
            for m in CONVERSATIONS
            for _, e in _supervised_spans(self._encode(m).labels)
        }
        missing = eot - set(gen.stop_ids)
        assert not missing, f"end-of-turn token(s) {sorted(missing)} the template emits are not stop ids {gen.stop_ids}"
        names = [self.tokenizer.convert_ids_to_tokens(i) for i in gen.stop_ids]
        return PASS, f"{gen.stop_ids} ({', '.join(map(str, names))}); end of turn {sorted(eot)}"

    def targets(self):
        from famtune.plugins import validate_targets

        model = self.ckpt.load_model(quantization="nf4", compute_dtype="fp32")
        found = {}
        for mode in ("default", "all-linear"):
            found[mode] = self.family.lora_target_modules(model, mode)
            # The facade already validates; repeated so the suite states its own rule.
            validate_targets(found[mode], model, AssertionError)
        return PASS, "; ".join(f"{m}: {', '.join(t)}" for m, t in found.items())

    def qlora_step(self):
        from famtune.recipe import load_recipe
        from famtune.train import train

        data = self.workdir / "data.jsonl"
        data.write_text(
            "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS), encoding="utf-8"
        )
        out = self.workdir / "adapter"
        recipe = load_recipe(
            None,
            {
                "model": str(self.tiny),
                "family": self.family.name,
                "data": str(data),
                "output_dir": str(out),
                "quantization": "nf4",
                "compute_dtype": "fp32",
                "max_length": 256,
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "learning_rate": 0.01,
                "warmup_ratio": 0.0,
                "batch_size": 3,
                "max_steps": 1,
                "gradient_checkpointing": False,
                "packing": False,
                "progress": False,
                "logging_steps": 1,
            },
        )
        summary = train(recipe, log=lambda *a, **k: None, overwrite=True)  # a reused --workdir is ours
        loss = summary["final_loss"]
        assert isinstance(loss, float) and math.isfinite(loss), f"QLoRA step loss is {loss!r}"
        self.adapter = out
        return PASS, f"NF4 base, 1 step, loss {loss:.4f}"

    def merge(self):
        import torch
        from peft import PeftModel

        from famtune.checkpoint import open_checkpoint
        from famtune.merge import merge, replace_linear4bit

        if self.adapter is None:
            return SKIPPED, "needs the QLoRA step's adapter"
        merged_dir = self.workdir / "merged"
        merge(str(self.adapter), str(merged_dir), log=lambda *a, **k: None)
        ids = torch.tensor([self._encode(CONVERSATIONS[1]).input_ids])
        base = self.ckpt.load_model(quantization="nf4", compute_dtype="fp32")
        replace_linear4bit(base)  # what the adapter was trained against, as merge uses it
        with torch.no_grad():
            adapted = PeftModel.from_pretrained(base, str(self.adapter))
            want = adapted(input_ids=ids).logits
            with adapted.disable_adapter():
                plain = adapted(input_ids=ids).logits
            reopened = open_checkpoint(str(merged_dir))
            assert reopened.family.name == self.family.name, (
                f"the merged model is claimed as {reopened.family.name!r}, not {self.family.name!r}"
            )
            got = reopened.load_model(quantization="none", compute_dtype="fp32")(input_ids=ids).logits
        moved = (want - plain).abs().max().item()
        assert moved > 0, "the adapter does not change the logits, so the merge cannot be checked"
        diff = (want - got).abs().max().item()
        assert diff <= MERGE_ATOL, f"merged logits differ from base + adapter by {diff:.3g} (max abs)"
        return PASS, f"max |merged - (base+adapter)| = {diff:.2g} (adapter moves logits by {moved:.2g})"

    def packing(self):
        """As strict as famtune's own packing test: several rows, a one-token sample, padding,
        random ids, a row longer than the model's sliding window if it has one, every sample's
        logits equal to its logits alone and the packed loss equal to the sum of the lone losses."""
        import random

        import torch

        from famtune.encoding import EncodedConversation
        from famtune.loss import causal_lm_loss
        from famtune.packing import collate_packed

        if not self.family.supports_packing():
            return SKIPPED, "packing: not declared"
        model = self.ckpt.load_model(quantization="none", compute_dtype="fp32")
        # As in training: without a cache, the model reads sample boundaries from the position ids.
        model.config.use_cache = False
        rng = random.Random(0)
        vocab = len(self.tokenizer)
        lengths = list(PACKING_LENGTHS)
        window = getattr(model.config, "sliding_window", None)
        if isinstance(window, int) and 0 < window < 256:
            lengths[4] = window + 9  # attention beyond the window must stay inside the sample too
        samples = []
        for n in lengths:
            ids = [rng.randrange(vocab) for _ in range(n)]
            samples.append(EncodedConversation(ids, [t if rng.random() < 0.7 else IGNORE_INDEX for t in ids]))
        samples[0] = self._encode(CONVERSATIONS[0])  # a real conversation too
        rows = [samples[0:4], samples[4:6], samples[6:7]]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = collate_packed(rows, pad, torch.device("cpu"))
        worst, excess = 0.0, 0.0
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            alone_loss = torch.zeros(())
            for r, row in enumerate(rows):
                at = 0
                for enc in row:
                    n = len(enc.input_ids)
                    alone = model(input_ids=torch.tensor([enc.input_ids]), use_cache=False).logits[0]
                    diff = (packed[r, at : at + n] - alone).abs()
                    worst = max(worst, diff.max().item())
                    excess = max(excess, (diff - PACKING_ATOL - PACKING_RTOL * alone.abs()).max().item())
                    lone = {
                        "input_ids": torch.tensor([enc.input_ids]),
                        "labels": torch.tensor([enc.labels]),
                        "position_ids": torch.arange(n)[None],
                    }
                    alone_loss = alone_loss + causal_lm_loss(model, lone, 1)
                    at += n
            packed_loss = causal_lm_loss(model, batch, 1)
        assert excess <= 0, (
            f"supports_packing is True, but a packed sample's logits differ from the sample alone by {worst:.3g} "
            f"(max abs, fp32, rows of {[len(r) for r in rows]} samples); declare False for this family"
        )
        loss_gap = abs(packed_loss.item() - alone_loss.item())
        assert loss_gap <= 1e-4 + 1e-5 * abs(alone_loss.item()), (
            f"the packed rows' summed loss {packed_loss.item():.6g} differs from the samples' own losses "
            f"{alone_loss.item():.6g}; declare supports_packing False for this family"
        )
        return PASS, (
            f"{len(samples)} samples in {len(rows)} rows (longest row {batch['input_ids'].shape[1]} tokens): "
            f"max |packed - alone| = {worst:.2g}, loss gap {loss_gap:.2g}"
        )


def _supervised_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans
