"""Identity end to end for every original layout: QLoRA train -> merge -> chat, through each family plugin.

Each checkpoint is made at test time in the family's ORIGINAL layout (the reference fixture's
config.json with auto_map and its original weight names) but with the vocabulary of the real
tokenizer, whose files come from the reference fixture too. So the run exercises the plugin's
no-remote-code loading and conversion, its real tokenizer, template, labels and stop ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import SHARED, famtune_cli
from famtune.demo import DEMO_DIR, expected_answers

REFERENCE = SHARED / "fixtures" / "reference"
LAYOUTS = ["internlm2", "baichuan2_7b", "baichuan2_13b", "chatglm3", "qwen1"]
VOCAB_KEYS = ("vocab_size", "padded_vocab_size")
ZH_Q, EN_Q = "请介绍一下你自己", "Who are you?"


def original_layout_checkpoint(layout: str, out: Path, seed: int = 0) -> Path:
    """The fixture's tiny original-layout model, re-sized to the real tokenizer's vocabulary."""
    import torch
    from safetensors.torch import load_file, save_file

    from famtune.checkpoint import open_checkpoint

    src = REFERENCE / layout
    out.mkdir(parents=True)
    for f in (src / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    config = json.loads((src / "tiny" / "config.json").read_text())
    old_vocab = next(config[k] for k in VOCAB_KEYS if k in config)
    (out / "config.json").write_text(json.dumps(config))
    tokenizer = open_checkpoint(str(out)).load_tokenizer()
    vocab = -(-len(tokenizer) // 64) * 64
    for key in VOCAB_KEYS:
        if key in config:
            config[key] = vocab
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (src / "tiny" / "generation_config.json").exists():
        shutil.copy(src / "tiny" / "generation_config.json", out / "generation_config.json")
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, t in load_file(src / "tiny" / "model.safetensors").items():
        if t.dim() < 2:
            weights[name] = t.clone()  # norms, biases and rotary buffers keep their reference values
            continue
        shape = [vocab if d == old_vocab else d for d in t.shape]
        # A wide init gives the frozen head confident logits, so a short LoRA run can fit the answers.
        weights[name] = torch.randn(shape, generator=gen) * 0.25
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identity_train_merge_chat(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("FAMTUNE_CACHE", str(tmp_path / "cache"))
    env = {"FAMTUNE_CACHE": str(tmp_path / "cache")}
    base = original_layout_checkpoint(layout, tmp_path / "base")
    recipe = yaml.safe_load((DEMO_DIR / "demo.yaml").read_text())
    recipe.pop("family")
    recipe.update(
        model=str(base),
        data=str(DEMO_DIR / "identity.jsonl"),
        output_dir=str(tmp_path / "out"),
        progress=False,
        evaluation_inputs=[],
        eval_steps=0,
        save_steps=0,
        max_steps=100,
        batch_size=6,
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    famtune_cli("train", tmp_path / "r.yaml", env=env)
    meta = json.loads((tmp_path / "out" / "famtune.json").read_text())
    assert meta["plugin"]["distribution"] == f"famtune-{meta['plugin']['name']}"
    famtune_cli("merge", tmp_path / "out", tmp_path / "merged", env=env)

    from famtune.chat import load_chat_model

    session = load_chat_model(str(tmp_path / "merged"))
    assert list(session.stop_ids) == meta["stop_ids"]
    answers = expected_answers()
    for question in (ZH_Q, EN_Q):
        res = famtune_cli(
            "chat", tmp_path / "merged", "--prompt", question, "--greedy", "--max-new-tokens", "80", env=env
        )
        # exactly the trained answer: generation stopped on one of the family's stop ids
        assert res.stdout.strip() == answers[question], (layout, res.stdout)
