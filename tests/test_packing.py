"""Packing: the best-fit packer, the packed batch, and that packed samples never see each other."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from conftest import famtune_cli
from famtune.encoding import IGNORE_INDEX
from famtune.errors import FamtuneError
from famtune.loss import causal_lm_loss
from famtune.packing import best_fit_decreasing, collate_packed, epoch_rows
from famtune.plugins import get_plugins
from famtune.recipe import Recipe
from famtune.samples import Sample
from famtune.train import resolve_packing

DEMO_DIR = Path(__file__).resolve().parents[1] / "core" / "famtune" / "demo_data"

# The native transformers architecture each family loads as (see the plugins' convert modules).
NATIVE_ARCH = {
    "qwen1": "qwen2",
    "qwen2": "qwen2",
    "qwen2.5": "qwen2",
    "qwen3": "qwen3",
    "internlm2": "llama",
    "baichuan2-7b": "llama",
    "chatglm3": "glm",
    "glm4": "glm",
}


def all_families():
    plugins = get_plugins()
    return [plugins.claim({}, "", family=f) for name in plugins.infos for f in plugins.families_of(name)]


def tiny_native_model(arch: str):
    import transformers

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        use_cache=False,
        attn_implementation="sdpa",
        # large weights make attention sharp, so a leak or a wrong position shows in the logits
        initializer_range=0.3,
    )
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(head_dim=8, **common)
    elif arch == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        config = transformers.GlmConfig(head_dim=8, partial_rotary_factor=0.5, **common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def random_samples(lengths, vocab=97, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        labels = [t if rng.random() < 0.7 else IGNORE_INDEX for t in ids]
        out.append(Sample(ids, labels, "mem", len(out) + 1))
    return out


# -- the packer -------------------------------------------------------------------------------
def reference_best_fit_decreasing(lengths, capacity):
    """Straightforward O(n^2) best fit decreasing: the tightest open bin, else a new one."""
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def test_packer_puts_each_item_in_the_tightest_bin():
    # 5 -> A(3 free), 4 -> B(4 free), 3 -> A (exact fit), 3 -> B(1 free), 2 -> C(6 free), 1 -> B (tightest)
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    rng = random.Random(7)
    for _ in range(20):
        lengths = [rng.randint(1, 512) for _ in range(rng.randint(1, 300))]
        assert best_fit_decreasing(lengths, 512) == reference_best_fit_decreasing(lengths, 512)


def test_packing_loses_no_sample_and_no_token():
    rng = random.Random(3)
    lengths = [rng.randint(1, 64) for _ in range(150)]
    samples = random_samples(lengths)
    rows = epoch_rows(lengths, 64, seed=42, epoch=1)
    assert sorted(i for row in rows for i in row) == list(range(len(samples)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    batch = collate_packed([[samples[i] for i in row] for row in rows], pad_id=0, device="cpu")
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            assert batch["input_ids"][r, at : at + n].tolist() == samples[i].input_ids
            assert batch["position_ids"][r, at : at + n].tolist() == list(range(n))
            # the first token is never predicted from the previous sample; the rest keep their labels
            assert batch["labels"][r, at].item() == IGNORE_INDEX
            assert batch["labels"][r, at + 1 : at + n].tolist() == samples[i].labels[1:]
            at += n
        assert (batch["labels"][r, at:] == IGNORE_INDEX).all()
    assert epoch_rows(lengths, 64, 42, 1) == rows and epoch_rows(lengths, 64, 42, 2) != rows


def test_oversized_sample_is_an_error():
    with pytest.raises(FamtuneError, match="70 tokens does not fit a packed row of 64"):
        best_fit_decreasing([10, 70], 64)


# -- nothing leaks ----------------------------------------------------------------------------
def packing_families():
    fams = [f for f in all_families() if f.supports_packing()]
    assert fams, "no installed family supports packing"
    return fams


@pytest.mark.parametrize("family", [f.name for f in packing_families()])
def test_packed_samples_match_their_logits_alone(family):
    assert family in NATIVE_ARCH, f"add {family}'s native architecture to NATIVE_ARCH"
    model = tiny_native_model(NATIVE_ARCH[family])
    samples = random_samples([9, 17, 1, 5, 30, 4, 11])
    rows = [[samples[0], samples[1], samples[2], samples[3]], [samples[4], samples[5]], [samples[6]]]
    batch = collate_packed(rows, pad_id=0, device="cpu")
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for r, row in enumerate(rows):
            at = 0
            for s in row:
                alone = model(input_ids=torch.tensor([s.input_ids])).logits[0]
                n = len(s.input_ids)
                torch.testing.assert_close(packed[r, at : at + n], alone, rtol=0, atol=1e-5)
                at += n
        # The summed loss over a packed batch is the sum of each sample's own loss.
        loss = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            num_items_in_batch=torch.tensor(1),
        ).loss
        alone_sum = sum(
            model(
                input_ids=torch.tensor([s.input_ids]),
                labels=torch.tensor([s.labels]),
                num_items_in_batch=torch.tensor(1),
            ).loss
            for s in samples
        )
        # ... and so is the loss famtune trains with (the output head on supervised rows only)
        ours = causal_lm_loss(model, batch, 1)
    torch.testing.assert_close(loss, alone_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours, alone_sum, rtol=1e-5, atol=1e-4)


def test_family_that_cannot_keep_samples_apart_refuses_packing():
    refusing = [f for f in all_families() if not f.supports_packing()]
    assert refusing, "every installed family packs; nothing to refuse"
    for fam in refusing:
        with pytest.raises(FamtuneError, match=f"{fam.info.distribution}.*{fam.name} cannot keep packed samples apart"):
            resolve_packing(True, fam)
        assert resolve_packing("auto", fam) is False
    fam = packing_families()[0]
    assert resolve_packing("auto", fam) and resolve_packing(True, fam) and not resolve_packing(False, fam)


# -- training packed ----------------------------------------------------------------------------
def test_packing_is_on_by_default_and_a_packed_run_learns(tiny_qwen25, tmp_path):
    assert Recipe().packing == "auto"
    recipe = yaml.safe_load((DEMO_DIR / "demo.yaml").read_text())
    recipe.pop("family")
    recipe.update(
        model=str(tiny_qwen25),
        data=str(DEMO_DIR / "identity.jsonl"),
        output_dir=str(tmp_path / "out"),
        progress=False,
        evaluation_inputs=[],
        max_steps=12,
        batch_size=2,
        max_length=256,
        learning_rate=2e-3,
        logging_steps=1,
        eval_steps=0,
        save_steps=0,
    )
    recipe.pop("packing", None)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    res = famtune_cli("train", path)
    assert "packing: " in res.stdout + res.stderr and "packing: off" not in res.stdout + res.stderr
    losses = [
        r["loss"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # packed rows of 256 hold several samples each: far fewer pad tokens than samples x longest
    assert summary["tokens_nonpad"] / summary["tokens_total"] > 0.8
    # ... and each packed sample attended on its own (no dense block-diagonal mask)
    assert summary["attention"]["path"] == "varlen-sdpa"
    assert "attention: varlen-sdpa" in res.stdout + res.stderr
