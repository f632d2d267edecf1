"""What famtune does differently per device, in one place, chosen once per process and recorded.

The training, merge and chat code is one code path for every device. The few choices that only
pay off on one kind of device live here (CPU: ``backends.cpu``); on CUDA none of them runs. The
4-bit kernel path is device-independent and lives in ``famtune.quantization``; the half-precision
matmul choice is a measured probe in ``famtune.kernels``. ``summary.json`` records the policy a run
used (``device_policy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from famtune.quantization import NF4_KERNEL


@dataclass(frozen=True)
class DevicePolicy:
    device: str
    #: "glibc-keep-freed" when freed buffers stay mapped between steps (CPU, glibc), else "default"
    allocator: str
    nf4_kernel: str = NF4_KERNEL

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_CHOSEN: dict[str, DevicePolicy] = {}


def training_policy(device: Any) -> DevicePolicy:
    """The policy for training on ``device`` (a ``torch.device``), applied on first use in this
    process and the same object afterwards."""
    kind = getattr(device, "type", str(device))
    if kind not in _CHOSEN:
        allocator = "default"
        if kind == "cpu":
            from famtune.backends import cpu

            if cpu.keep_freed_memory():
                allocator = "glibc-keep-freed"
        _CHOSEN[kind] = DevicePolicy(device=kind, allocator=allocator)
    return _CHOSEN[kind]
