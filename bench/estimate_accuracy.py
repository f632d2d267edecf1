#!/usr/bin/env python
"""How close ``famtune estimate`` comes to the measured peak tensor memory of QLoRA training.

For three random-weight Qwen2-architecture models (8 M to 130 M parameters), runs two real QLoRA
steps on the CPU set up as ``famtune train`` does (NF4 double quant, fp32 compute, LoRA r=16 on all
linear layers, dropout 0.05, gradient checkpointing) and counts live tensor storage bytes during
the second step (``famtune.estimate.LiveTensorBytes``), then compares with the estimate.
A fourth row is a small Gemma-2 model whose logits are soft-capped (64k vocabulary), so famtune's
fused head loss cannot be used and the full logits make the peak. Then answers the headline
question for InternLM2-7B (config only, nothing downloaded): does a QLoRA run fit in 8 GB, and why.

``--wide`` adds the shared bench's wide fixture (``make_fixture.py OUT --shape wide``: 172.5 M
parameters, a 151,936-row head) at batch 8 x 512, as the training benchmark runs it. It is heavy:
about 4 GB of memory and a few minutes on two cores.

Usage: python bench/estimate_accuracy.py [--wide [--wide-fixture DIR]].  Prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20
SHARED_BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
SIZES = [  # hidden, intermediate, layers, vocab, batch, seq
    (256, 704, 4, 8000, 2, 256),  # the shared bench fixture's shape: the loss peak dominates
    (1024, 2816, 4, 4000, 2, 256),  # one recomputed layer dominates
    (2048, 5632, 2, 4000, 2, 256),  # wide layers: the dequantized weight matters too
]
# InternLM2-7B (internlm/internlm2-chat-7b config.json).
INTERNLM2_7B = {
    "model_type": "internlm2",
    "architectures": ["InternLM2ForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 92544,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000,
    "bias": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
}


def _row(model: Path, *, batch: int, seq: int, family: str | None = None, label: str = "") -> dict:
    from famtune.estimate import estimate_recipe, measure_cpu_peak
    from famtune.recipe import Recipe

    recipe = dataclasses.replace(
        Recipe(),
        model=str(model),
        family=family,
        data="unused",
        compute_dtype="fp32",
        lora_r=16,
        lora_alpha=32,
        lora_targets="all-linear",
        max_length=seq,
        batch_size=batch,
    )
    est = estimate_recipe(recipe)
    got = measure_cpu_peak(str(model), seq_len=seq, batch=batch, family=family)
    row = {
        "model": label,
        "params_m": round(est.details["params"] / 1e6, 1),
        "hidden": est.details["hidden"],
        "layers": est.details["layers"],
        "vocab": est.details["vocab"],
        "batch": batch,
        "seq": seq,
        "fused_head": est.details["fused_head"],
        "estimate_mib": round(est.total / MIB, 1),
        "measured_mib": round(got["total"] / MIB, 1),
        "error_pct": round(100 * (est.total / got["total"] - 1), 1),
        "peak": est.details["activation_peak"],
    }
    print(json.dumps(row), flush=True)
    return row


def accuracy(root: Path) -> list[dict]:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    rows = []
    for i, (hidden, inter, layers, vocab, batch, seq) in enumerate(SIZES):
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
        path = root / f"m{i}"
        Qwen2ForCausalLM(config).save_pretrained(path)
        rows.append(_row(path, batch=batch, seq=seq, label="qwen2"))
    torch.manual_seed(0)
    capped = Gemma2Config(
        vocab_size=64000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        final_logit_softcapping=5.0,
    )
    Gemma2ForCausalLM(capped).save_pretrained(root / "softcap")
    # No plugin claims Gemma-2; a family is named so the checkpoint opens (its loader is the default one).
    rows.append(_row(root / "softcap", batch=2, seq=512, family="qwen2", label="gemma2 soft-capped"))
    return rows


def wide(fixture: Path) -> dict:
    if not (fixture / "model" / "config.json").exists():
        subprocess.run(
            [sys.executable, str(SHARED_BENCH / "make_fixture.py"), str(fixture), "--shape", "wide"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return _row(fixture / "model", batch=8, seq=512, label="wide fixture")


def internlm2_7b(root: Path) -> dict:
    from famtune.estimate import estimate_recipe, parse_size
    from famtune.recipe import Recipe
    from famtune_internlm2.convert import to_native_config

    path = root / "internlm2-7b"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(to_native_config(INTERNLM2_7B)))
    budget = parse_size("8GB")
    out = {}
    for seq in (512, 2048):
        recipe = dataclasses.replace(Recipe(), model=str(path), data="unused", lora_r=8, batch_size=1, max_length=seq)
        est = estimate_recipe(recipe)
        print(f"\nInternLM2-7B QLoRA, max_length {seq}, batch 1, r=8, default targets, budget 8GB:")
        for line in est.lines(budget):
            print("  " + line)
        out[f"internlm2_7b_seq{seq}_gib"] = round(est.total / 1024**3, 2)
        out[f"internlm2_7b_seq{seq}_fits_8gb"] = est.total <= budget
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wide", action="store_true", help="add the wide fixture (heavy: ~4 GB, a few minutes)")
    ap.add_argument(
        "--wide-fixture", default="/tmp/famtune-bench-wide", help="where the wide fixture is (built if absent)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="famtune-estimate-") as tmp:
        rows = accuracy(Path(tmp))
        if args.wide:
            rows.append(wide(Path(args.wide_fixture)))
        headline = internlm2_7b(Path(tmp))
    result = {"sizes": rows, "max_abs_error_pct": max(abs(r["error_pct"]) for r in rows), **headline}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
