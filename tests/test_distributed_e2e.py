"""Two processes on CPU (gloo), launched as users launch them: `famtune train --nproc 2`, plain
`torchrun -m famtune`, two "nodes" on localhost, a killed worker, an elastic restart.

Every run trains the same tiny QLoRA model on 17 samples for 12 steps with a global batch of 8
(1 process x 8 or 2 processes x 4): a global micro-batch of one sample ends each epoch, so one rank
runs a stand-in batch there. The reference is one process; the tolerances are float32 summation
order (the two ranks pad their halves of a batch to different lengths).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import famtune_cli
from famtune.demo import DEMO_DIR

pytestmark = pytest.mark.slow

STEPS = 12
LOSS_RTOL = 1e-5  # per-step training loss, relative (measured: ~1e-7)
ADAPTER_ATOL = 5e-5  # final LoRA weights, absolute (measured: ~8e-6 on weights up to ~0.15 after Adam at lr 1e-2)
FAIL_FAST_S = 60  # a killed worker stops the whole run within this


def _recipe(path: Path, model: Path, data: Path, out: Path, **extra) -> Path:
    recipe = dict(
        model=str(model),
        data=str(data),
        eval_data=str(DEMO_DIR / "identity.jsonl"),
        quantization="nf4",
        compute_dtype="fp32",
        max_length=128,
        masking="all_assistant",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_targets="all-linear",
        learning_rate=0.01,
        warmup_ratio=0.0,
        batch_size=8,
        max_steps=STEPS,
        logging_steps=1,
        save_steps=2,
        eval_steps=0,
        evaluation_inputs=[],
        packing=False,
        progress=False,
        output_dir=str(out),
    )
    recipe.update(extra)
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"  # one writer only
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_same_training(out: Path, ref: Path, steps=range(1, STEPS + 1)) -> None:
    import torch
    from safetensors.torch import load_file

    got, want = _losses(out), _losses(ref)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), step
    a, b = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=ADAPTER_ATOL, msg=name)


@pytest.fixture(scope="module")
def setup(tiny_qwen25, tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    data = work / "train17.jsonl"
    data.write_text("".join((DEMO_DIR / "identity.jsonl").read_text().splitlines(keepends=True)[:17]))
    return work, tiny_qwen25, data


@pytest.fixture(scope="module")
def one_process(setup):
    work, model, data = setup
    famtune_cli("train", _recipe(work / "one.yaml", model, data, work / "one"))
    return work / "one"


@pytest.fixture(scope="module")
def two_processes(setup):
    work, model, data = setup
    recipe = _recipe(
        work / "two.yaml",
        model,
        data,
        work / "two",
        batch_size=4,
        eval_steps=6,
        evaluation_inputs=["Who are you?"],
        max_new_tokens=4,
    )
    res = famtune_cli("train", recipe, "--nproc", "2")
    return work / "two", res


def test_two_processes_train_like_one_with_twice_the_batch(one_process, two_processes):
    two, res = two_processes
    _assert_same_training(two, one_process)
    assert "distributed: 2 processes x batch 4 (MULTI_CPU, ddp, cpu)" in res.stdout
    assert res.stdout.count("done: 12 steps") == 1  # only rank 0 reports
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one_process, two))
    assert (s1["processes"], s2["processes"]) == (1, 2)
    # Counted over both ranks: every sample trained once per epoch, as in one process.
    assert s2["tokens_supervised"] == s1["tokens_supervised"] > 0
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=LOSS_RTOL)
    # Evaluation and sample generations ran mid-run and at the end without a hang, logged once.
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
    assert [r["step"] for r in records if "generations" in r] == [0, 6, 12]
    # Only rank 0 wrote: the same files as one process, complete checkpoints, nothing half-written.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one_process.iterdir())
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [f"step-{n}" for n in (10, 2, 4, 6, 8)]


def test_checkpoints_resume_across_process_counts(setup, one_process, two_processes):
    work, model, data = setup
    two, _ = two_processes
    # Saved by 2 processes at step 4 (mid-epoch), resumed by 1 process with twice the batch.
    res = famtune_cli(
        "train", _recipe(work / "c.yaml", model, data, work / "two-to-one"), "--resume", two / "checkpoints" / "step-4"
    )
    assert "at step 4 (epoch 1, sample 8)" in res.stdout
    _assert_same_training(work / "two-to-one", one_process, steps=range(5, STEPS + 1))
    # Saved by 1 process, resumed by 2 started with plain torchrun and `-m famtune`.
    recipe = _recipe(work / "d.yaml", model, data, work / "one-to-two", batch_size=4)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "famtune",
            "train",
            str(recipe),
            "--resume",
            str(one_process / "checkpoints" / "step-4"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr
    assert "at step 4 (epoch 1, sample 8)" in res.stdout
    _assert_same_training(work / "one-to-two", one_process, steps=range(5, STEPS + 1))


def test_packed_two_processes_train_like_one(setup):
    work, model, data = setup
    runs = {}
    for nproc, batch in ((1, 2), (2, 1)):
        out = work / f"packed-{nproc}"
        recipe = _recipe(
            work / f"packed-{nproc}.yaml", model, data, out, packing=True, batch_size=batch, max_steps=4, save_steps=0
        )
        runs[nproc] = famtune_cli("train", recipe, *(["--nproc", "2"] if nproc == 2 else []))
        assert "packing: 17 samples into" in runs[nproc].stdout
    _assert_same_training(work / "packed-2", work / "packed-1", steps=range(1, 5))


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the launcher's child processes."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher.pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _kill_rank_after_checkpoint(launcher: subprocess.Popen, out: Path, rank: int = 1) -> None:
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-2").exists():
        assert launcher.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    pid = _worker_pid(launcher, rank)
    assert pid is not None and launcher.poll() is None, "the run ended before a worker could be killed"
    os.kill(pid, signal.SIGKILL)


def _launch(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "famtune.cli", "train", str(recipe), "--nproc", "2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_killed_worker_fails_the_run_fast_and_resume_continues(setup, one_process):
    work, model, data = setup
    out = work / "killed"
    recipe = _recipe(work / "killed.yaml", model, data, out, batch_size=4)
    launcher = _launch(recipe)
    _kill_rank_after_checkpoint(launcher, out)
    killed_at = time.time()
    _, err = launcher.communicate(timeout=FAIL_FAST_S)
    assert time.time() - killed_at < FAIL_FAST_S
    assert launcher.returncode == 2
    last = err.strip().splitlines()[-1]  # one line, naming the killed rank first
    assert (
        last.startswith("famtune: error: worker rank 1 failed (signal SIGKILL)") and "all workers were stopped" in last
    )
    assert "continue with: famtune train RECIPE --nproc 2 --resume" in err
    saved = sorted(
        int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()
    )
    assert saved and saved[-1] < STEPS
    res = famtune_cli("train", recipe, "--nproc", "2", "--resume")
    assert f"resumed from {out / 'checkpoints' / f'step-{saved[-1]}'} at step {saved[-1]} " in res.stdout
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))
    _assert_same_training(out, one_process)


def test_an_elastic_restart_resumes_from_the_last_checkpoint(setup, one_process):
    work, model, data = setup
    out = work / "elastic"
    recipe = _recipe(work / "elastic.yaml", model, data, out, batch_size=4)
    launcher = _launch(recipe, "--max-restarts", "1")
    _kill_rank_after_checkpoint(launcher, out)
    stdout, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err
    assert "resumed from" in stdout and "done: 12 steps" in stdout
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))
    _assert_same_training(out, one_process)


def test_two_nodes_on_localhost_train_like_one_process(setup, one_process):
    work, model, data = setup
    out = work / "nodes"
    recipe = _recipe(work / "nodes.yaml", model, data, out, batch_size=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "famtune.cli",
                "train",
                str(recipe),
                "--nproc",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--master",
                f"127.0.0.1:{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = [node.communicate(timeout=600) for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], results
    assert "done: 12 steps" in results[0][0] and "done:" not in results[1][0]
    _assert_same_training(out, one_process)


def test_fsdp_preset_trains_lora_on_a_full_precision_base_like_one_process(setup):
    work, model, data = setup
    settings = dict(quantization="none", max_steps=4, save_steps=0)
    famtune_cli("train", _recipe(work / "fsdp-ref.yaml", model, data, work / "fsdp-ref", **settings))
    res = famtune_cli(
        "train",
        _recipe(work / "fsdp.yaml", model, data, work / "fsdp", batch_size=4, distributed="fsdp", **settings),
        "--nproc",
        "2",
    )
    assert "distributed: 2 processes x batch 4 (FSDP, fsdp, cpu)" in res.stdout
    _assert_same_training(work / "fsdp", work / "fsdp-ref", steps=range(1, 5))


def test_compare_trains_each_model_in_several_processes(tmp_path):
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": ["tiny:qwen2.5"],
                "data": str(DEMO_DIR / "identity.jsonl"),
                "quantization": "nf4",
                "compute_dtype": "fp32",
                "max_length": 128,
                "lora_r": 8,
                "lora_alpha": 16,
                "batch_size": 2,
                "max_steps": 2,
                "evaluation_inputs": [],
                "progress": False,
            }
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    famtune_cli("compare", recipe, "--output", out, "--nproc", "2", env={"FAMTUNE_CACHE": str(tmp_path / "cache")})
    summary = json.loads((out / "tiny-qwen2.5" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert "distributed: 2 processes x batch 2" in (out / "tiny-qwen2.5" / "train.log").read_text()
    res = famtune_cli("compare", recipe, "--output", out, "--nproc", "0", check=False)
    assert res.returncode == 2 and "famtune compare: error: argument --nproc: 0 is out of range" in res.stderr
