"""Device-specific tuning lives in famtune.backends: applied on the CPU only, recorded, no side effects on load."""

from __future__ import annotations

import json
import subprocess
import sys

POLICY = """
import json, sys, torch
from famtune.backends import training_policy
policy = training_policy(torch.device(sys.argv[1]))
assert training_policy(torch.device(sys.argv[1])) is policy  # chosen once per process
print(json.dumps({"policy": policy.as_dict(), "cpu_module": "famtune.backends.cpu" in sys.modules}))
"""


def policy_in_fresh_process(device: str, **env: str) -> dict:
    import os

    res = subprocess.run(
        [sys.executable, "-c", POLICY, device], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cuda_runs_nothing_cpu_specific():
    got = policy_in_fresh_process("cuda")  # a device object needs no GPU; the policy must not look further
    assert got == {
        "policy": {"device": "cuda", "allocator": "default", "nf4_kernel": "dequantize"},
        "cpu_module": False,
    }


def test_cpu_tunes_the_allocator_unless_turned_off():
    assert policy_in_fresh_process("cpu")["policy"]["allocator"] == "glibc-keep-freed"
    assert policy_in_fresh_process("cpu", FAMTUNE_MALLOC_TUNING="0")["policy"]["allocator"] == "default"


def test_loading_a_model_keeps_the_callers_autograd_mode(tiny_qwen25):
    import torch

    from famtune.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(tiny_qwen25))
    with torch.no_grad():
        ckpt.load_model("nf4", "fp32", device=torch.device("cpu"))
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
