"""End to end, as a user runs it: famtune train -> merge -> chat on a tiny QLoRA-quantized model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import famtune_cli
from famtune.demo import DEMO_DIR, expected_answers

IDENTITY = DEMO_DIR / "identity.jsonl"
ZH_Q, EN_Q = "请介绍一下你自己", "Who are you?"


def write_recipe(path: Path, model: Path, out: Path, **extra) -> Path:
    recipe = yaml.safe_load((DEMO_DIR / "demo.yaml").read_text())
    recipe.pop("family")
    recipe.update(model=str(model), data=str(IDENTITY), output_dir=str(out), progress=False, **extra)
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def trained(tiny_qwen25, tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(
        work / "recipe.yaml",
        tiny_qwen25,
        work / "out",
        eval_data=str(IDENTITY),
        max_steps=200,
        eval_steps=40,
        save_steps=40,
    )
    # the command-line flag overrides the recipe's step budget
    res = famtune_cli("train", recipe, "--max_steps", "70")
    return work, res


def test_train_writes_adapter_metrics_plot_and_resolved_recipe(trained):
    work, res = trained
    out = work / "out"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "famtune.json",
        "metrics.jsonl",
        "loss.png",
        "recipe.yaml",
        "summary.json",
    ):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["max_steps"] == 70
    meta = json.loads((out / "famtune.json").read_text())
    assert meta["plugin"] == {"name": "qwen", "distribution": "famtune-qwen", "version": "0.1.0"}
    assert meta["family"] == "qwen2.5" and meta["template"] == "famtune-qwen2.5"
    assert meta["quantization"] == "nf4" and meta["masking"] == "all_assistant"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(10, 71, 10))
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [40, 70]
    assert evals[-1]["eval_loss"] < 5.5  # a uniform guess over the tiny vocabulary scores ~ln(|V|) = 6.2
    gens = {r["step"]: r["generations"] for r in records if "generations" in r}
    assert sorted(gens) == [0, 40, 70]
    assert [g["input"] for g in gens[0]] == [ZH_Q, EN_Q]
    assert "data: " in res.stdout and "18 train + 18 eval samples" in res.stdout


def test_adapter_loads_in_plain_peft(trained, tiny_qwen25):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = trained[0] / "out"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen25), out)
    saved = load_file(out / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    lora_b = [n for n in saved if "lora_B" in n]
    assert any(saved[n].abs().sum() > 0 for n in lora_b)  # trained, not the zero init
    for name, tensor in saved.items():
        match = [
            p for n, p in loaded.items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1])
        ]
        assert match and torch.equal(match[0].detach(), tensor), name


def test_merge_then_chat_answers_the_trained_identity_and_stops(trained):
    work, _ = trained
    answers = expected_answers()
    famtune_cli("merge", work / "out", work / "merged")
    for question in (ZH_Q, EN_Q):
        res = famtune_cli("chat", work / "merged", "--prompt", question, "--greedy", "--max-new-tokens", "60")
        # Exactly the trained answer and nothing after it: generation stopped at <|im_end|>.
        assert res.stdout.strip() == answers[question]
    res = famtune_cli("chat", trained[0] / "merged", "--adapter", work / "out", "--prompt", EN_Q, "--greedy")
    assert res.returncode == 0


def test_merged_model_loads_in_plain_transformers_with_family_stop_ids(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    merged = trained[0] / "merged"
    if not merged.exists():
        famtune_cli("merge", trained[0] / "out", merged)
    tok = AutoTokenizer.from_pretrained(merged)
    AutoModelForCausalLM.from_pretrained(merged)
    gen = GenerationConfig.from_pretrained(merged)
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert gen.eos_token_id == stop


def _metric_losses(out: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


def test_resume_after_interruption_continues_at_the_right_step(tiny_qwen25, tmp_path):
    settings = dict(max_steps=24, save_steps=3, logging_steps=1, batch_size=4, evaluation_inputs=[], lora_dropout=0.1)
    straight = write_recipe(tmp_path / "a.yaml", tiny_qwen25, tmp_path / "a", **settings)
    famtune_cli("train", straight)
    reference = _metric_losses(tmp_path / "a")
    assert sorted(reference) == list(range(1, 25))

    interrupted = write_recipe(tmp_path / "b.yaml", tiny_qwen25, tmp_path / "b", **settings)
    proc = subprocess.Popen(
        [sys.executable, "-m", "famtune.cli", "train", str(interrupted)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    while not (tmp_path / "b" / "checkpoints" / "step-3").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "interrupted at step" in err and "--resume" in err
    stopped_at = int(err.split("interrupted at step ")[1].split("/")[0])
    assert 3 <= stopped_at < 24

    res = famtune_cli("train", interrupted, "--resume")
    assert f"at step {stopped_at} " in res.stdout
    resumed = _metric_losses(tmp_path / "b")
    assert sorted(resumed) == list(range(1, 25))  # every step logged once
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), step


def test_plain_lora_without_quantization_trains_full_precision_base(tiny_qwen25, tmp_path):
    import torch
    from safetensors.torch import load_file

    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_qwen25,
        tmp_path / "out",
        quantization="none",
        max_steps=30,
        evaluation_inputs=[],
        eval_steps=0,
        save_steps=0,
    )
    res = famtune_cli("train", recipe)
    assert "(none base)" in res.stdout
    meta = json.loads((tmp_path / "out" / "famtune.json").read_text())
    assert meta["quantization"] == "none"
    losses = _metric_losses(tmp_path / "out")
    assert losses[30] < losses[10]
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_bf16_training_gives_the_same_losses_with_native_and_widened_matmuls(tiny_qwen25, tmp_path):
    losses, kernel_counts = {}, {}
    for choice in ("native", "fp32"):
        out = tmp_path / choice
        recipe = write_recipe(
            tmp_path / f"{choice}.yaml",
            tiny_qwen25,
            out,
            compute_dtype="bf16",
            half_matmul=choice,
            lora_dropout=0.05,
            logging_steps=1,
            max_steps=6,
            evaluation_inputs=[],
            eval_steps=0,
            save_steps=0,
        )
        res = famtune_cli("train", recipe)
        assert f"half_matmul: {'native' if choice == 'native' else 'fp32 kernels'}" in res.stdout
        losses[choice] = _metric_losses(out)
        kernel_counts[choice] = json.loads((out / "summary.json").read_text())["kernels"]
    assert kernel_counts["native"]["half_matmul_widened"] == 0
    assert kernel_counts["fp32"]["half_matmul_widened"] > 0
    assert kernel_counts["fp32"]["lora_dropout_replaced"] > 0
    assert set(losses["native"]) == set(losses["fp32"]) == set(range(1, 7))
    for step in losses["native"]:
        # the same bf16 products, summed in another order: bf16 rounding noise only
        assert losses["fp32"][step] == pytest.approx(losses["native"][step], rel=2e-2), step
