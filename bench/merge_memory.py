#!/usr/bin/env python
"""Peak RSS of ``famtune merge`` on a ~1 GB model in several shards, against the largest shard.

Writes a random-weight Qwen2-architecture model (float32, ~1 GB, 500 MB shards by default) with the shared
fixture's tokenizer and a random LoRA adapter (r=16, every decoder linear layer) with the
famtune.json that training writes, then runs, each in a fresh process:
  - ``famtune merge`` (streaming, the default);
  - the same merge loading the whole model (``stream=False``), which is what other tools do;
  - a process that only imports what the merge imports, to show the fixed cost of the libraries.
Peak RSS is the child's VmHWM. Usage: python bench/merge_memory.py [--workdir DIR]
Prints one line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
MIB = 2**20

CHILD = r"""
import sys, time
mode, adapter, out = sys.argv[1:4]
import famtune.merge, torch, transformers, peft, bitsandbytes  # what every mode pays for
t0 = time.perf_counter()
if mode != "imports":
    famtune.merge.merge(adapter, out, stream=(mode == "stream"), log=lambda line: print(line, file=sys.stderr))
# VmHWM is this process's own peak; ru_maxrss would carry over the parent's peak across exec.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(hwm / 1024, time.perf_counter() - t0)
"""


def build(workdir: Path, fixture: Path, shard_size: str) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base, adapter = workdir / "base", workdir / "adapter"
    if (adapter / "famtune.json").exists():
        return base, adapter
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=8000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=9,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(base, max_shard_size=shard_size)
    for f in (fixture / "model").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy2(f, base / f.name)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tensors = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in targets:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(16, module.in_features) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, 16) * 0.01
    del model
    adapter.mkdir(parents=True, exist_ok=True)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.0,
                "target_modules": targets,
                "bias": "none",
                "base_model_name_or_path": str(base),
            }
        )
    )
    from famtune.checkpoint import open_checkpoint
    from famtune.metadata import build_metadata, write_metadata

    ckpt = open_checkpoint(str(base))
    tok = ckpt.load_tokenizer()
    write_metadata(
        adapter,
        build_metadata(
            family=ckpt.family,
            template_name=ckpt.family.conversation_template().name,
            generation=ckpt.family.generation_defaults(tok),
            base_model=str(base),
            base_path=str(base),
            quantization="nf4",
            compute_dtype="fp32",
            masking="all_assistant",
            max_length=512,
            system=None,
        ),
    )
    return base, adapter


def run(mode: str, adapter: Path, out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(adapter), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if res.returncode != 0:
        raise SystemExit(f"{mode} merge failed:\n{res.stderr[-3000:]}")
    rss, seconds = map(float, res.stdout.split()[-2:])
    return rss, seconds


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        return {k: p for p in d.glob("*.safetensors") for k in safe_open(str(p), "pt").keys()}

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for k in ia:
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/famtune-merge-bench")
    ap.add_argument("--fixture", default="/tmp/famtune-bench-fixture")
    ap.add_argument("--shard-size", default="500MB", help="shard size of the synthetic base (default 500MB)")
    args = ap.parse_args()
    fixture = Path(args.fixture)
    if not (fixture / "model").exists():
        subprocess.run(
            [sys.executable, str(SHARED_BENCH / "make_fixture.py"), str(fixture)], check=True, stdout=subprocess.DEVNULL
        )
    workdir = Path(args.workdir)
    base, adapter = build(workdir, fixture, args.shard_size)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / MIB
    adapter_mib = (adapter / "adapter_model.safetensors").stat().st_size / MIB
    imports_rss, _ = run("imports", adapter, workdir / "none")
    stream_rss, stream_s = run("stream", adapter, workdir / "merged-stream")
    memory_rss, memory_s = run("memory", adapter, workdir / "merged-memory")
    same = same_tensors(workdir / "merged-stream", workdir / "merged-memory")
    bound = 1.5 * largest + adapter_mib
    result = {
        "model_mib": round(sum(p.stat().st_size for p in shards) / MIB),
        "shards": len(shards),
        "largest_shard_mib": round(largest),
        "adapter_mib": round(adapter_mib, 1),
        "bound_mib": round(bound),
        "imports_only_rss_mib": round(imports_rss),
        "stream_peak_rss_mib": round(stream_rss),
        "stream_s": round(stream_s, 1),
        "in_memory_peak_rss_mib": round(memory_rss),
        "in_memory_s": round(memory_s, 1),
        "stream_within_bound": stream_rss <= bound,
        "stream_above_imports_mib": round(stream_rss - imports_rss),
        "stream_rss_over_largest_shard": round(stream_rss / largest, 2),
        "in_memory_over_stream": round(memory_rss / stream_rss, 2),
        "weights_identical": same,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
