"""Every adapter method end to end on tiny models: train (2-3 steps), resume exactly, merge into a
model equal to base+adapter, chat with the adapter and with the merged model.

The full method matrix runs here on Qwen2.5 with and without NF4 (about a minute on two shared
cores); test_adapters_families.py runs one method per quantization on every other built-in family.
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

METHODS = {
    "lora": {},
    "dora": {"adapter": "dora"},
    "adalora": {"adapter": "adalora"},
    "pissa": {"lora_init": "pissa"},
    "olora": {"lora_init": "olora"},
    "rslora-gaussian-loraplus": {"rslora": True, "lora_init": "gaussian", "loraplus_lr_ratio": 4},
}
ORIGINAL_LAYOUT_ONLY = {"qwen1": "qwen1"}  # family -> shared fixture layout
PROMPT = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-families")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            if family in ORIGINAL_LAYOUT_ONLY:  # the plugin builds no tiny checkpoint of its own
                from test_families_e2e import original_layout_checkpoint

                made[family] = original_layout_checkpoint(ORIGINAL_LAYOUT_ONLY[family], root / family)
            else:
                made[family] = build_tiny(family, root / family)
        return made[family]

    return get


def run_recipe(model: Path, out: Path, **keys):
    settings = dict(
        model=str(model),
        data=str(DEMO_DIR / "identity.jsonl"),
        output_dir=str(out),
        progress=False,
        max_steps=3,
        max_length=128,
        batch_size=2,
        evaluation_inputs=[],
        compute_dtype="fp32",
        lora_dropout=0.0,
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


def base_plus_adapter(base: Path, adapter: Path, family: str, quantization: str):
    """The reference: PeftModel on the base as training loaded it, computing in fp32."""
    import bitsandbytes as bnb
    from peft import PeftModel

    from famtune.checkpoint import open_checkpoint

    model = open_checkpoint(str(base), family=family).load_model(quantization=quantization, compute_dtype="fp32")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def check_merge_and_chat(base: Path, out: Path, family: str, quantization: str, work: Path) -> dict:
    """Merge; the merged model's logits equal base+adapter's; chat answers the same with both."""
    from famtune.chat import load_chat_model
    from famtune.checkpoint import open_checkpoint
    from famtune.merge import merge

    lines: list[str] = []
    merged_dir = work / "merged"
    report = merge(str(out), str(merged_dir), log=lines.append)
    merged_session = load_chat_model(str(merged_dir))
    adapter_session = load_chat_model(str(base), str(out))
    ckpt = open_checkpoint(str(base), family=family)
    tokenizer = ckpt.load_tokenizer()
    ids = torch.tensor(
        [ckpt.family.encode(tokenizer, PROMPT, masking="all_assistant", add_generation_prompt=True).input_ids]
    )
    reference = base_plus_adapter(base, out, family, quantization)
    plain = ckpt.load_model(quantization="none", compute_dtype="fp32")
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = merged_session.model(input_ids=ids).logits.float()
        untouched = plain(input_ids=ids).logits
    scale = max(1.0, want.abs().max().item())
    # test_merge's tolerance: fp32 rounding of W + delta versus W and delta applied separately
    assert (got - want).abs().max().item() < 1e-5 * scale, (family, quantization, lines)
    assert (untouched - want).abs().max().item() > 1e-3, "the adapter changed nothing; the test would prove nothing"
    a = adapter_session.reply(PROMPT, greedy=True, max_new_tokens=6)
    b = merged_session.reply(PROMPT, greedy=True, max_new_tokens=6)
    assert a == b, (a, b)
    return {"report": report, "log": lines}


def check_resume(model: Path, work: Path, quantization: str, **keys) -> Path:
    """Resuming from a mid-run checkpoint gives the same losses and adapter as the uninterrupted run."""
    from safetensors.torch import load_file

    straight = run_recipe(model, work / "straight", quantization=quantization, max_steps=4, save_steps=2, **keys)
    train(straight, log=lambda *a: None)
    resumed_out = work / "resumed"
    shutil.copytree(work / "straight" / "checkpoints" / "step-2", resumed_out / "checkpoints" / "step-2")
    again = run_recipe(model, resumed_out, quantization=quantization, max_steps=4, save_steps=2, **keys)
    logs: list[str] = []
    train(again, resume=True, log=logs.append)
    assert any("resumed from" in line and "at step 2" in line for line in logs), logs
    want, got = losses(work / "straight"), losses(resumed_out)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got, want)
    # AdaLoRA: the allocation resumed mid-budget reaches the same final rank pattern
    patterns = [
        json.loads((d / "adapter_config.json").read_text()).get("rank_pattern")
        for d in (work / "straight", resumed_out)
    ]
    assert patterns[0] == patterns[1]
    a = load_file(work / "straight" / "adapter_model.safetensors")
    b = load_file(resumed_out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    return work / "straight"


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_resumes_merges_and_chats_on_qwen25(tiny_models, tmp_path, method, quantization):
    base = tiny_models("qwen2.5")
    out = check_resume(base, tmp_path, quantization, **METHODS[method])
    meta = json.loads((out / "famtune.json").read_text())
    assert meta["adapter"]["method"] == METHODS[method].get("adapter", "lora")
    acfg = json.loads((out / "adapter_config.json").read_text())
    if method in ("pissa", "olora"):  # converted to a plain LoRA delta against the unmodified base
        assert acfg["init_lora_weights"] is True and acfg["r"] == 16
    result = check_merge_and_chat(base, out, "qwen2.5", quantization, tmp_path)
    # DoRA and AdaLoRA fall back to PEFT's in-memory merge with a one-line reason naming the method;
    # the converted PiSSA/OLoRA adapters are plain LoRA and stream like it (and still equal base+adapter).
    reason = [line for line in result["log"] if "cannot stream" in line]
    named = [line for line in reason if "DoRA" in line or "AdaLoRA" in line]
    assert len(named) == (1 if method in ("dora", "adalora") else 0), result["log"]
    assert result["report"].get("streamed", False) == (method not in ("dora", "adalora")), result["log"]
