"""Shared fixtures: tiny checkpoints built at test time through the installed family plugins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist the workers share the cores: each one (and the commands it starts) gets its
# share of threads instead of one per core each, which would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


def famtune_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 900):
    """Run the famtune command as a user would, in a subprocess."""
    res = subprocess.run(
        [sys.executable, "-m", "famtune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"famtune {' '.join(map(str, args))} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def build_tiny(family: str, out_dir: Path) -> Path:
    from famtune.demo import demo_corpus
    from famtune.plugins import get_plugins

    fam = get_plugins().claim({}, "", family=family)
    assert fam.tiny_checkpoint(str(out_dir), demo_corpus())
    return out_dir


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory) -> Path:
    return build_tiny("qwen2.5", tmp_path_factory.mktemp("tiny-qwen25"))


# A tiny Qwen2.5 base and a real QLoRA adapter trained to give known answers (merge and chat tests).
ADAPTER_FAMILY = "qwen2.5"
ADAPTER_CORPUS = [
    "hello there, how are you today?",
    "I am fine, thank you. The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Tell me a story about a small robot who learned to paint.",
] * 10
ADAPTER_ANSWERS = {"hi": "I am fine, thank you.", "What is the capital of France?": "Paris is the capital of France."}


@pytest.fixture(scope="module")
def one_torch_thread():
    """bitsandbytes' CPU kernels use torch's OpenMP pool; on a busy 2-core machine each NF4 call then
    waits ~12 ms for threads (measured) instead of taking microseconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_base_and_adapter(root: Path, steps: int = 80):
    """A tiny base, and a QLoRA adapter (non-zero from the start, then trained for ``steps`` steps to
    give ADAPTER_ANSWERS) with its famtune.json."""
    import torch
    from peft import LoraConfig, get_peft_model

    from famtune.checkpoint import open_checkpoint
    from famtune.metadata import build_metadata, write_metadata
    from famtune.plugins import get_plugins

    family = get_plugins().claim({}, "", family=ADAPTER_FAMILY)
    base, adapter = root / "base", root / "adapter"
    assert family.tiny_checkpoint(str(base), ADAPTER_CORPUS)
    ckpt = open_checkpoint(str(base), family=ADAPTER_FAMILY)
    tokenizer = ckpt.load_tokenizer()
    torch.manual_seed(0)
    model = ckpt.load_model(quantization="nf4", compute_dtype="fp32")
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        target_modules=family.lora_target_modules(model, "default"),
    )
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [
        family.encode(
            tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], masking="all_assistant"
        )
        for q, a in ADAPTER_ANSWERS.items()
    ]
    for step in range(steps):
        enc = batches[step % len(batches)]
        model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([enc.labels])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(adapter))
    write_metadata(
        adapter,
        build_metadata(
            family=family,
            template_name=family.conversation_template().name,
            generation=family.generation_defaults(tokenizer),
            base_model=str(base),
            base_path=str(base),
            quantization="nf4",
            compute_dtype="fp32",
            masking="all_assistant",
            max_length=256,
            system=None,
        ),
    )
    return family, base, adapter
