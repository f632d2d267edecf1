#!/usr/bin/env python
"""LLaMA-Factory on the shared benchmark fixture, with the shared settings, for side-by-side figures.

Runs LLaMA-Factory's own SFT entry point (``llamafactory.train.tuner.run_exp``) with the settings of
../shared/bench/README.md: bitsandbytes NF4 + double quant, bf16 compute, LoRA r=16/alpha=32/dropout
0.05 on every linear layer of the decoder, cutoff ``--max-length``, batch ``--batch``, lr 2e-4 cosine
with 3% warmup, gradient checkpointing, seed 42, sdpa attention, loss on assistant tokens only. The
data is the fixture's OpenAI ``messages`` file read as LLaMA-Factory's sharegpt format with the
``chatml`` template (no default system prompt, as the fixture's own chat template). ``--mode``:

  neat_packing  packing with per-row block-diagonal attention (samples never see each other)
  nopack        one conversation per row, padded to the longest in the batch

Prints one line ``RESULT {json}`` with the fields of ../shared/bench/baseline_trl.py (tokens are
counted from the batches the trainer receives; wall time covers the training steps only).

LLaMA-Factory 0.9.5 pins transformers<=5.6 and peft<=0.18.1, so it lives in its own virtualenv:

    python3 -m venv /tmp/lfvenv && /tmp/lfvenv/bin/pip install torch==2.13.0 llamafactory bitsandbytes
    /tmp/lfvenv/bin/pip uninstall -y torchvision torchaudio   # builds for another torch; unused here
    /tmp/lfvenv/bin/python bench/baseline_llamafactory.py --fixture FIXTURE_DIR --mode neat_packing

LLaMA-Factory imports torchaudio at start-up for its audio plugin; without a torchaudio built for
this torch, this script registers an empty ``torchaudio`` module (text training never calls it).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import resource
import sys
import tempfile
import time
import types
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", required=True, help="output dir of ../shared/bench/make_fixture.py")
    ap.add_argument("--mode", choices=["neat_packing", "nopack"], default="neat_packing")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench-llamafactory-out"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    try:
        import torchaudio  # noqa: F401
    except Exception:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub

    import llamafactory
    import torch
    import transformers
    from llamafactory.train.tuner import run_exp
    from transformers import Trainer, TrainerCallback

    torch.set_num_threads(args.threads)
    work = Path(args.workdir) / args.mode
    work.mkdir(parents=True, exist_ok=True)
    fixture = Path(args.fixture).resolve()
    (work / "dataset_info.json").write_text(
        json.dumps(
            {
                "bench": {
                    "file_name": str(fixture / "data" / "train.jsonl"),
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages"},
                    "tags": {
                        "role_tag": "role",
                        "content_tag": "content",
                        "user_tag": "user",
                        "assistant_tag": "assistant",
                        "system_tag": "system",
                    },
                }
            }
        )
    )

    pad_id = transformers.AutoTokenizer.from_pretrained(str(fixture / "model")).pad_token_id
    counters = {"micro_batches": 0, "tokens_total": 0, "tokens_nonpad": 0, "tokens_supervised": 0, "shapes": []}
    original_step = Trainer.training_step

    def counting_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs["input_ids"]
        counters["micro_batches"] += 1
        counters["tokens_total"] += int(ids.numel())
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # 0 is padding (neat_packing numbers samples 1, 2, ...)
            counters["tokens_nonpad"] += int((mask != 0).sum())
        else:  # a 4-D block-diagonal mask: the fixture's pad id never occurs inside its data
            counters["tokens_nonpad"] += int((ids != pad_id).sum())
        counters["tokens_supervised"] += int((inputs["labels"] != -100).sum())
        if len(counters["shapes"]) < 3:
            counters["shapes"].append(list(ids.shape))
        return original_step(self, model, inputs, num_items_in_batch)

    Trainer.training_step = counting_step

    class Timer(TrainerCallback):
        t_begin = 0.0
        step_ends: list[float] = []
        losses: list[float] = []

        def on_train_begin(self, a, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.step_ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    timer = Timer()
    settings = {
        "model_name_or_path": str(fixture / "model"),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "quantization_bit": 4,
        "quantization_method": "bnb",
        "quantization_type": "nf4",
        "double_quantization": True,
        "dataset": "bench",
        "dataset_dir": str(work),
        "template": "chatml",
        "cutoff_len": args.max_length,
        "overwrite_cache": True,
        "packing": args.mode == "neat_packing",
        "neat_packing": args.mode == "neat_packing",
        "flash_attn": "sdpa",
        "output_dir": str(work / "out"),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4,
        "max_steps": args.steps,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "bf16": True,
        "use_cpu": not torch.cuda.is_available(),
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 42,
        "dataloader_num_workers": 0,
    }
    t0 = time.perf_counter()
    run_exp(settings, callbacks=[timer])
    total_s = time.perf_counter() - t0
    if not timer.step_ends or counters["micro_batches"] == 0:
        raise SystemExit(
            "LLaMA-Factory ran no counted training step; its trainer no longer calls Trainer.training_step"
        )
    wall = timer.step_ends[-1] - timer.t_begin
    res = {
        "framework": "llamafactory",
        "mode": args.mode,
        "steps": len(timer.step_ends),
        "wall_s": round(wall, 3),
        "tokens_total": counters["tokens_total"],
        "tokens_nonpad": counters["tokens_nonpad"],
        "tokens_supervised": counters["tokens_supervised"],
        "nonpad_tok_per_s": round(counters["tokens_nonpad"] / wall, 1),
        "total_tok_per_s": round(counters["tokens_total"] / wall, 1),
        "supervised_tok_per_s": round(counters["tokens_supervised"] / wall, 1),
        "pad_fraction": round(1 - counters["tokens_nonpad"] / max(1, counters["tokens_total"]), 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_loss": timer.losses[-1] if timer.losses else None,
        "first_loss": timer.losses[0] if timer.losses else None,
        "first_batch_shapes": counters["shapes"],
        "batch": args.batch,
        "max_length": args.max_length,
        "torch_threads": torch.get_num_threads(),
        "total_run_s": round(total_s, 1),
        "versions": {
            "llamafactory": llamafactory.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": __import__("peft").__version__,
            "bitsandbytes": __import__("bitsandbytes").__version__,
        },
    }
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
