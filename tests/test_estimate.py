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


# google/gemma-2-2b config.json, as published (tie_word_embeddings is not in it: it defaults to true).
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 256000,
}


def _recipe(model, **kw):
    # No plugin claims Gemma-2: a family is named so the checkpoint opens; only its loader is used.
    base = dict(model=str(model), family="qwen2", data="unused", lora_r=16, lora_alpha=32, lora_targets="all-linear")
    return dataclasses.replace(Recipe(), **{**base, **kw})


def test_tied_head_is_counted_once_and_a_soft_capped_head_is_not_fused(tmp_path):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(GEMMA2_2B))
    with torch.device("meta"):
        truth = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    est = estimate_recipe(_recipe(tmp_path, max_length=512, batch_size=1))
    assert est.details["params"] == sum(p.numel() for p in truth.parameters())
    assert est.details["fused_head"] is False
    # The full logits (fp32 under QLoRA) are part of the peak.
    assert est.activations > 512 * GEMMA2_2B["vocab_size"] * 4


@pytest.mark.parametrize("softcap", [5.0, None])
def test_estimate_of_a_soft_capped_head_is_within_bound(tmp_path, softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=16000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        final_logit_softcapping=softcap,
    )
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    est = estimate_recipe(_recipe(tmp_path, compute_dtype="fp32", max_length=128, batch_size=2))
    measured = measure_cpu_peak(str(tmp_path), seq_len=128, batch=2, family="qwen2")
    assert est.details["fused_head"] is (softcap is None)
    error = est.total / measured["total"] - 1
    assert abs(error) <= MAX_ERROR, (est.total, measured, est.details["activation_peak"])
