"""famtune estimate: the predicted peak matches measured peak tensor memory of real QLoRA steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import famtune_cli
from famtune.errors import FamtuneError
from famtune.estimate import estimate_recipe, measure_cpu_peak, parse_size
from famtune.recipe import Recipe

#: The bound the estimate is held to (bench/estimate_accuracy.py reports the errors on larger models).
MAX_ERROR = 0.10


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


def qwen2_dir(path, hidden, inter, layers, vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


# Three sizes: the loss peak dominates the first, one recomputed layer the second, the third is mixed.
@pytest.mark.parametrize(
    "hidden, inter, layers, vocab, batch, seq",
    [
        (128, 344, 2, 3000, 2, 64),
        (512, 1536, 2, 256, 2, 64),
        (256, 704, 3, 1000, 1, 128),
    ],
)
def test_estimate_is_within_bound_of_measured_peak(tmp_path, hidden, inter, layers, vocab, batch, seq):
    model = qwen2_dir(tmp_path / "m", hidden, inter, layers, vocab)
    recipe = dataclasses.replace(
        Recipe(),
        model=str(model),
        data="unused",
        compute_dtype="fp32",
        lora_r=16,
        lora_alpha=32,
        lora_targets="all-linear",
        max_length=seq,
        batch_size=batch,
    )
    est = estimate_recipe(recipe)
    measured = measure_cpu_peak(str(model), seq_len=seq, batch=batch)
    assert abs(est.weights + est.lora + est.optimizer - measured["static"]) <= 0.05 * measured["static"]
    error = est.total / measured["total"] - 1
    assert abs(error) <= MAX_ERROR, (est.total, measured, est.details["activation_peak"])


def test_cli_prints_the_breakdown_and_judges_the_budget(tmp_path):
    model = qwen2_dir(tmp_path / "m", 128, 344, 2, 3000)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\nlora_r: 8\nmax_length: 256\nbatch_size: 2\n")
    res = famtune_cli("estimate", recipe, "--budget", "8GB")
    for part in ("weights", "LoRA", "optimizer", "activations", "total", "fits in"):
        assert part in res.stdout
    small = famtune_cli("estimate", recipe, "--budget", "1MB", "--max_length", "1024", check=False)
    assert small.returncode == 1 and "does not fit in" in small.stdout and "1024 tokens" in small.stdout


def test_bad_budget_is_a_one_line_error():
    with pytest.raises(FamtuneError, match="'lots'"):
        parse_size("lots")
    assert parse_size("8GB") == parse_size("8GiB") == 8 * 1024**3 and parse_size("500MB") == 500 * 1024**2
