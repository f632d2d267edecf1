"""`famtune merge` publishes a merged model atomically: a killed merge never leaves OUT mixed or
partial, its staging directory never loads, and a full disk is one line with OUT unchanged."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build_base_and_adapter
from famtune import durable
from famtune.errors import FamtuneError
from famtune.merge import merge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    _, base, adapter = build_base_and_adapter(root, steps=2)
    out = root / "merged"
    merge(str(adapter), str(out), log=lambda _: None)
    return {"root": root, "base": base, "adapter": adapter, "out": out}


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def merge_cmd(adapter: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "famtune.cli", "merge", str(adapter), str(out)]


def test_merge_killed_before_publishing_leaves_the_earlier_merge_and_an_unloadable_staging_dir(merged):
    before = snapshot(merged["out"])
    assert durable.verify_manifest(merged["out"]) is None
    res = subprocess.run(
        merge_cmd(merged["adapter"], merged["out"]),
        capture_output=True,
        text=True,
        env={**os.environ, "FAMTUNE_CRASH_AT": "merge_publish"},
        timeout=600,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert snapshot(merged["out"]) == before  # the earlier merge, whole and untouched
    staging = [p for p in merged["root"].iterdir() if p.name.startswith("merged.tmp-")]
    assert len(staging) == 1 and (staging[0] / "INCOMPLETE").exists()
    assert not (staging[0] / "config.json").exists()
    from transformers import AutoModelForCausalLM

    with pytest.raises((OSError, ValueError)):  # plain transformers refuses the leftover
        AutoModelForCausalLM.from_pretrained(str(staging[0]))
    res = subprocess.run(merge_cmd(merged["adapter"], merged["out"]), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "left by an interrupted merge" in res.stdout and not staging[0].exists()
    assert snapshot(merged["out"]) == before  # the same merge, written again, bit for bit


def test_merge_killed_at_a_random_moment_leaves_out_complete(merged):
    rng, kills = random.Random(3), 0
    for _ in range(2):
        before = snapshot(merged["out"])
        proc = subprocess.Popen(
            merge_cmd(merged["adapter"], merged["out"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.time() + 300
        while proc.poll() is None and not (merged["root"] / f"merged.tmp-{proc.pid}").exists():
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the write
        proc.kill()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode in (0, -signal.SIGKILL), err
        kills += proc.returncode == -signal.SIGKILL
        assert durable.verify_manifest(merged["out"]) is None  # old or new, but whole
        assert snapshot(merged["out"]) == before  # and a merge of the same inputs is the same bytes
    assert kills >= 1  # at least one kill landed inside a merge (the other may have finished first)
    res = subprocess.run(merge_cmd(merged["adapter"], merged["out"]), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and not [p for p in merged["root"].iterdir() if ".tmp-" in p.name], res.stderr


def test_disk_full_during_merge_is_one_line_and_leaves_out_unchanged(merged, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; run this test as root to check ENOSPC")
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(FamtuneError, match=r"^disk full at .*; the merge was not written \(.* is unchanged\)"):
            merge(str(merged["adapter"]), str(mnt / "m"), log=lambda _: None)
        assert os.listdir(mnt) == []  # the staging directory is gone too
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
