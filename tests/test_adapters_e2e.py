"""Every adapter method x {nf4, none} on a tiny model of every built-in family: train, resume
exactly, merge into a model equal to base+adapter, chat with the adapter and with the merged model.

Coverage. The methods are the recipe's adapter kinds and options: ``lora``, ``dora``, ``adalora``,
the inits ``pissa``, ``olora``, ``gaussian`` (and ``default``), ``rslora`` and LoRA+. Options that
PEFT can combine share a cell, so each (family, quantization) runs CELLS (five cells) and every
(family, method, quantization) is exercised:

    cell              adapter  init      rslora  LoRA+   merge
    lora              lora     default   -       -       streamed
    dora+gaussian     dora     gaussian  -       -       PEFT fallback (DoRA)
    adalora           adalora  (SVD)     -       -       PEFT fallback (AdaLoRA)
    pissa+rslora      lora     pissa     yes     -       streamed (converted to LoRA)
    olora+loraplus    lora     olora     -       x4      streamed (converted to LoRA)

x FAMILIES (qwen1, qwen2, qwen2.5, qwen3, internlm2, baichuan2-7b, baichuan2-13b, chatglm3, glm4:
every family the built-in plugins define) x {nf4, none}: 90 cells. rsLoRA rides on PiSSA (PEFT's
conversion to plain LoRA must then keep the alpha / sqrt(r) scale) and LoRA+ on OLoRA.
LoftQ is not in the matrix: peft 0.21 computes it on CUDA/XPU only (test_adapters.py checks the
one-line error on CPU and the run on CUDA).

Each cell is kept cheap: one tiny base per family for the whole module (Qwen1's cut to one narrow
layer), two optimizer steps with a checkpoint after the first, the resume check continuing that very
checkpoint for the second step, the adapter's chat session doubling as the base+adapter reference
(its ``disable_adapter`` as the untouched base) and three new tokens of chat. Measured on two shared
cores at a load average of 9-10: 1.2-2.6 s a cell (median) for eight families; Qwen1 14-17 s, nearly
all of it famtune loading its real 151,851-token tokenizer seven times per cell (train, resume,
merge, two chat sessions); the module about 5 minutes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_tiny
from famtune.demo import DEMO_DIR
from famtune.recipe import load_recipe
from famtune.train import train

CELLS = {
    "lora": {},
    "dora+gaussian": {"adapter": "dora", "lora_init": "gaussian"},
    "adalora": {"adapter": "adalora"},
    "pissa+rslora": {"lora_init": "pissa", "rslora": True},
    "olora+loraplus": {"lora_init": "olora", "loraplus_lr_ratio": 4},
}
FAMILIES = ["qwen1", "qwen2", "qwen2.5", "qwen3", "internlm2", "baichuan2-7b", "baichuan2-13b", "chatglm3", "glm4"]
ORIGINAL_LAYOUT_ONLY = {"qwen1": "qwen1"}  # family -> shared fixture layout (no tiny checkpoint of its own)
# Qwen1's real 151,851-token vocabulary makes its embedding and head the bulk of every load, merge
# and save: the shared fixture is cut to one layer of width 32 (sizes: fixture's -> this test's).
QWEN1_SIZES = {"hidden_size": (64, 32), "intermediate_size": (344, 64), "num_hidden_layers": (2, 1)}
QWEN1_CONFIG = {"num_attention_heads": 2, "kv_channels": 16}
CONVERTED_TO_LORA = ("pissa", "olora")  # the saved adapter is a plain LoRA delta against the original base
NOT_STREAMED = {"dora": "DoRA", "adalora": "AdaLoRA"}  # the merge falls back to PEFT, naming the method
PROMPT = [{"role": "user", "content": "Who are you?"}]
LORA_R = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Converted native copies (Qwen1) and encoded datasets go to a cache of this module's own."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FAMTUNE_CACHE", str(tmp_path_factory.mktemp("famtune-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """One tiny base per family, built on first use and shared by all of the module's cells."""
    root = tmp_path_factory.mktemp("tiny-families")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            if family in ORIGINAL_LAYOUT_ONLY:
                from test_families_e2e import original_layout_checkpoint

                made[family] = original_layout_checkpoint(ORIGINAL_LAYOUT_ONLY[family], root / family)
                if family == "qwen1":
                    narrow_qwen1(made[family])
            else:
                made[family] = build_tiny(family, root / family)
        return made[family]

    return get


def narrow_qwen1(path: Path) -> None:
    """Shrink the fixture's Qwen1 checkpoint in place to QWEN1_SIZES (slices of its random weights)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    assert {k: config[k] for k in QWEN1_SIZES} == {k: old for k, (old, _) in QWEN1_SIZES.items()}, config
    (h, h2), (i, i2) = QWEN1_SIZES["hidden_size"], QWEN1_SIZES["intermediate_size"]
    dims = {h: h2, 3 * h: 3 * h2, i // 2: i2 // 2}  # width, packed q/k/v, one MLP half
    config.update({k: new for k, (_, new) in QWEN1_SIZES.items()}, **QWEN1_CONFIG)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    kept = {f"transformer.h.{n}." for n in range(config["num_hidden_layers"])}
    weights = {
        name: t[tuple(slice(0, dims.get(d, d)) for d in t.shape)].contiguous()
        for name, t in load_file(path / "model.safetensors").items()
        if not name.startswith("transformer.h.") or any(name.startswith(k) for k in kept)
    }
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def run_recipe(model: Path, out: Path, **keys):
    settings = dict(
        model=str(model),
        data=str(DEMO_DIR / "identity.jsonl"),
        output_dir=str(out),
        progress=False,
        max_steps=2,
        save_steps=1,
        max_length=128,
        batch_size=2,
        evaluation_inputs=[],
        compute_dtype="fp32",
        lora_dropout=0.0,
        lora_r=LORA_R,
        learning_rate=0.02,
        lora_targets="all-linear",
        logging_steps=1,
    )
    settings.update(keys)
    return load_recipe(None, settings)


def losses(out: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


def check_resume(model: Path, work: Path, **keys) -> Path:
    """Two steps with a checkpoint after the first; continuing that checkpoint in another output
    directory gives the same second-step loss, rank pattern and adapter as the uninterrupted run."""
    from safetensors.torch import load_file

    straight = work / "straight"
    train(run_recipe(model, straight, **keys), log=lambda *a: None)
    resumed = work / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-1", resumed / "checkpoints" / "step-1")
    logs: list[str] = []
    train(run_recipe(model, resumed, **keys), resume=True, log=logs.append)
    assert any("resumed from" in line and "at step 1" in line for line in logs), logs
    want, got = losses(straight), losses(resumed)
    assert sorted(want) == [1, 2] and sorted(got) == [2]
    assert got[2] == pytest.approx(want[2], abs=1e-6), (got, want)
    # AdaLoRA: the allocation resumed mid-budget reaches the same final rank pattern
    patterns = [json.loads((d / "adapter_config.json").read_text()).get("rank_pattern") for d in (straight, resumed)]
    assert patterns[0] == patterns[1]
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    return straight


def exact_nf4(model) -> None:
    """bitsandbytes' CPU NF4 matmul may round through bf16; the reference dequantizes to fp32."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def check_merge_and_chat(base: Path, out: Path, work: Path) -> list[str]:
    """Merge; the merged model's logits equal base+adapter's (the adapter's chat session, the base
    loaded as training loaded it); chat answers the same with both. Returns the merge's log."""
    from famtune.chat import load_chat_model
    from famtune.merge import merge

    lines: list[str] = []
    report = merge(str(out), str(work / "merged"), log=lines.append)
    merged = load_chat_model(str(work / "merged"))
    adapter = load_chat_model(str(base), str(out))
    exact_nf4(adapter.model)
    ids = torch.tensor([adapter.prompt_ids(PROMPT)])
    assert merged.prompt_ids(PROMPT) == ids[0].tolist()
    with torch.no_grad():
        want = adapter.model(input_ids=ids).logits.float()
        got = merged.model(input_ids=ids).logits.float()
        with adapter.model.disable_adapter():
            untouched = adapter.model(input_ids=ids).logits.float()
    scale = max(1.0, want.abs().max().item())
    # test_merge's tolerance: fp32 rounding of W + delta versus W and delta applied separately
    assert (got - want).abs().max().item() < 1e-5 * scale, lines
    assert (untouched - want).abs().max().item() > 1e-3, "the adapter changed nothing; the test would prove nothing"
    a = adapter.reply(PROMPT, greedy=True, max_new_tokens=3)
    b = merged.reply(PROMPT, greedy=True, max_new_tokens=3)
    assert a == b, (a, b)
    assert report.get("streamed", False) == (not any(k in NOT_STREAMED for k in _kinds(out))), lines
    return lines


def _kinds(out: Path) -> list[str]:
    a = json.loads((out / "famtune.json").read_text())["adapter"]
    return [a["method"], a["init"]]


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains_resumes_merges_and_chats_on_every_family(
    tiny_models, tmp_path, family, cell, quantization
):
    keys = CELLS[cell]
    base = tiny_models(family)
    out = check_resume(base, tmp_path, quantization=quantization, **keys)
    meta = json.loads((out / "famtune.json").read_text())
    assert meta["family"] == family
    assert {k: meta["adapter"][k] for k in ("method", "init", "rslora", "loraplus_lr_ratio")} == {
        "method": keys.get("adapter", "lora"),
        "init": keys.get("lora_init", "default"),
        "rslora": keys.get("rslora", False),
        "loraplus_lr_ratio": keys.get("loraplus_lr_ratio", 0),
    }
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["peft_type"] == ("ADALORA" if keys.get("adapter") == "adalora" else "LORA")
    assert acfg.get("use_dora", False) == (keys.get("adapter") == "dora")
    assert acfg.get("use_rslora", False) == keys.get("rslora", False)
    if keys.get("lora_init") in CONVERTED_TO_LORA:  # a plain LoRA delta against the unmodified base
        assert acfg["init_lora_weights"] is True and acfg["r"] == 2 * LORA_R
    if keys.get("loraplus_lr_ratio"):
        state = json.loads((out / "checkpoints" / "step-1" / "adapter_state.json").read_text())
        lrs = {g["group"]: g["lr"] for g in state["optimizer_groups"] if g["params"]}
        assert lrs["B"] == pytest.approx(keys["loraplus_lr_ratio"] * lrs["A"])
    log = check_merge_and_chat(base, out, tmp_path)
    # DoRA and AdaLoRA fall back to PEFT's in-memory merge with a one-line reason naming the method;
    # the converted PiSSA/OLoRA adapters are plain LoRA and stream like it.
    fallback = NOT_STREAMED.get(keys.get("adapter", "lora"))
    named = [line for line in log if "cannot stream" in line and fallback and fallback in line]
    assert len(named) == (1 if fallback else 0), log
