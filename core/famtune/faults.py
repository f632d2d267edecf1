"""Named crash points for fault-injection tests: ``FAMTUNE_CRASH_AT=NAME[:N]`` SIGKILLs the process
the N-th time (default: first) it reaches NAME, e.g. between two files of a checkpoint write.

A real kill at a chosen instant, which random timing alone reaches too rarely to test.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("FAMTUNE_CRASH_AT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
