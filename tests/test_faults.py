"""Fault injection on real `famtune train` processes: SIGKILL inside checkpoint writes and the final
save, corrupted checkpoints, SIGTERM, concurrent runs, NaN losses, a full disk, a changed recipe on
--resume. Every case ends bit-exact with an uninterrupted run, or with one line and rc != 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faultkit import (
    flip_bit,
    has_traceback,
    kill_randomly_until_done,
    run_train,
    start_train,
    steps_logged,
    wait_for,
    write_recipe,
)

from famtune import durable, run_state
from famtune.demo import DEMO_DIR

pytestmark = pytest.mark.slow


def one_line_error(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode not in (0, -9) and not has_traceback(res.stderr), res.stderr
    assert lines and lines[-1].startswith("famtune: error: "), res.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def reference(tiny_qwen25, tmp_path_factory):
    """An uninterrupted run, during which a second run into the same directory is refused."""
    work = tmp_path_factory.mktemp("faults")
    recipe = write_recipe(work / "ref.yaml", tiny_qwen25, work / "ref")
    proc = start_train(recipe)
    wait_for(lambda: (work / "ref" / "run.json").exists(), proc)
    second = run_train(recipe, "--overwrite")  # even --overwrite must not take a directory in use
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return {
        "work": work,
        "model": tiny_qwen25,
        "out": work / "ref",
        "second": second,
        "adapter": (work / "ref" / "adapter_model.safetensors").read_bytes(),
        "losses": losses(work / "ref"),
    }


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_as_reference(out: Path, reference) -> None:
    assert (out / "adapter_model.safetensors").read_bytes() == reference["adapter"]
    assert losses(out) == reference["losses"]


def test_concurrent_run_into_the_same_directory_is_refused(reference):
    line = one_line_error(reference["second"])
    assert "is in use by another famtune train" in line
    assert sorted(losses(reference["out"])) == [1, 2, 3, 4, 5, 6]


def test_kills_inside_checkpoint_writes_and_final_save_then_corruption_resume_bit_exact(reference, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", reference["model"], tmp_path / "out")
    out = tmp_path / "out"
    # killed between the optimizer and scheduler files of step-4's checkpoint: step-4.tmp is left
    res = run_train(recipe, crash_at="checkpoint_write:5")
    assert res.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4.tmp"]
    (out / "checkpoints" / "step-4.tmp" / "trainer_state.json").write_text('{"step": 4}')  # issue 12 item 6
    # a new run must not silently start over a run that has checkpoints
    line = one_line_error(run_train(recipe))
    assert "holds an earlier run's 1 checkpoint(s)" in line and "--resume" in line and "--overwrite" in line
    # resumed from step-2 (the stale .tmp is removed), killed inside the final save
    res = run_train(recipe, "--resume", crash_at="final_save")
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert "removed" in res.stdout and "step-4.tmp" in res.stdout and "resumed from" in res.stdout
    assert not (out / "adapter_model.safetensors").exists()  # the adapter never appears half-written
    # the newest checkpoint is now corrupted by one flipped bit: detected, the one before is used
    flip_bit(out / "checkpoints" / "step-4" / "optimizer.pt", seed=4)
    res = run_train(recipe, "--resume")
    assert res.returncode == 0, res.stderr
    assert "skipping damaged checkpoint" in res.stdout and "optimizer.pt does not match its SHA-256" in res.stdout
    assert "at step 2 " in res.stdout
    assert_same_as_reference(out, reference)


@pytest.mark.parametrize(
    "damage",
    [
        "bitflip_adapter",
        "truncate_optimizer",
        "delete_rng",
        "delete_manifest",
        "garbage_manifest",
        "empty_trainer_state",
    ],
)
def test_every_corruption_of_the_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    newest = out / "checkpoints" / "step-4"
    assert durable.verify_manifest(newest) is None
    if damage == "bitflip_adapter":
        flip_bit(newest / "adapter_model.safetensors", seed=7)
    elif damage == "truncate_optimizer":
        data = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "delete_rng":
        (newest / "rng.pt").unlink()
    elif damage == "delete_manifest":
        (newest / "manifest.json").unlink()
    elif damage == "garbage_manifest":
        (newest / "manifest.json").write_text("{not json")
    elif damage == "empty_trainer_state":
        (newest / "trainer_state.json").write_text("")
    warnings: list[str] = []
    assert run_state.find_checkpoint(out, True, log=warnings.append) == out / "checkpoints" / "step-2"
    assert len(warnings) == 1 and "skipping damaged checkpoint" in warnings[0] and "step-4" in warnings[0]
    with pytest.raises(Exception, match="damaged checkpoint"):
        run_state.find_checkpoint(out, str(newest))


def test_new_run_into_a_finished_run_and_changed_recipe_on_resume_are_refused(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    recipe = write_recipe(tmp_path / "r.yaml", reference["model"], out)
    line = one_line_error(run_train(recipe))
    assert "holds a finished run" in line and "--resume" in line and "--overwrite" in line
    line = one_line_error(run_train(recipe, "--resume", "--learning_rate", "1e-3", "--lora_r", "16"))
    assert "learning_rate 0.0002 -> 0.001, lora_r 8 -> 16" in line
    data = tmp_path / "other.jsonl"
    shutil.copy(DEMO_DIR / "identity.jsonl", data)
    with data.open("a") as f:
        f.write(
            json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n"
        )
    line = one_line_error(run_train(recipe, "--resume", "--data", str(data)))
    assert "changed since step-4: data" in line
    # checkpoints of another run (another run.json) are never resumed (issue 12 item 1)
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "run_id": "someone-else"}))
    assert "belongs to another run" in one_line_error(run_train(recipe, "--resume"))
    (out / "run.json").write_text(json.dumps(run))
    # the earlier run is untouched by every refusal
    assert (out / "adapter_model.safetensors").read_bytes() == reference["adapter"]
    # a longer step budget is allowed; the rate continues down from where it was, no jump
    res = run_train(recipe, "--resume", "--max_steps", "8")
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and "at step 4 " in res.stdout and "step budget 6 -> 8" in res.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lr) == list(range(1, 9))
    assert all(lr[s] >= lr[s + 1] for s in range(2, 8)) and lr[8] > 0, lr
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_sigterm_saves_a_checkpoint_and_resume_is_bit_exact(reference, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", reference["model"], tmp_path / "out", save_steps=0)
    out = tmp_path / "out"
    proc = start_train(recipe)
    wait_for(lambda: steps_logged(out) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "interrupted at step" in err and "(SIGTERM)" in err and not has_traceback(err)
    stopped = int(err.split("at step ")[1].split("/")[0])
    assert (out / "checkpoints" / f"step-{stopped}" / "manifest.json").exists()
    res = run_train(recipe, "--resume")
    assert res.returncode == 0, res.stderr
    assert_same_as_reference(out, reference)


def test_a_second_signal_ends_at_once():
    stop = run_state.StopOnInterrupt()
    with pytest.raises(KeyboardInterrupt):
        with stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.requested and stop.signal_name == "SIGTERM"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_nan_loss_stops_with_the_step_and_samples_or_skips_the_update(reference, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", reference["model"], tmp_path / "out", learning_rate=1e20, max_steps=3)
    line = one_line_error(run_train(recipe))
    assert "non-finite" in line and "identity.jsonl:" in line and "lower learning_rate" in line
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    res = run_train(recipe, "--overwrite", "--nan_policy", "skip_step")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_steps"] and "update skipped (nan_policy: skip_step)" in res.stdout
    from safetensors.torch import load_file

    assert all(bool(t.isfinite().all()) for t in load_file(tmp_path / "out" / "adapter_model.safetensors").values())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 48 KB tmpfs: room for the run's logs, not for its adapter (69 KB)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; run this test as root to check ENOSPC")
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_at_the_final_save_keeps_the_trained_state(reference, tmp_path, small_tmpfs):
    out = small_tmpfs / "out"
    recipe = write_recipe(tmp_path / "r.yaml", reference["model"], out, save_steps=0)
    line = one_line_error(run_train(recipe))
    assert f"final save to {out} failed (disk full)" in line and "--resume" in line
    rescue = line.split("--resume ")[1].strip()
    assert durable.verify_manifest(rescue) is None
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)  # space freed
    res = run_train(recipe, "--resume", rescue)
    assert res.returncode == 0, res.stderr
    assert_same_as_reference(out, reference)
    shutil.rmtree(Path(rescue).parents[1], ignore_errors=True)


def test_disk_full_at_a_periodic_checkpoint_is_one_line(reference, tmp_path, small_tmpfs):
    out = small_tmpfs / "out"  # 48 KB: the run's logs fit, a 270 KB checkpoint does not
    recipe = write_recipe(tmp_path / "r.yaml", reference["model"], out)
    line = one_line_error(run_train(recipe))
    assert f"disk full at {out}/checkpoints (" in line and "MB free); the checkpoint of step 2 could not" in line
    assert list((out / "checkpoints").iterdir()) == []  # no partial step-2.tmp left behind


def test_seeded_random_kills_resume_bit_exact(reference, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", reference["model"], out)
    figures = kill_randomly_until_done(
        recipe,
        out,
        seed=int(os.environ.get("FAMTUNE_FAULT_SEED", "12")),
        max_kills=int(os.environ.get("FAMTUNE_FAULT_KILLS", "2")),
        log=lambda _: None,
    )
    assert figures["rc"] == 0 and figures["tracebacks"] == 0, figures
    assert_same_as_reference(out, reference)
