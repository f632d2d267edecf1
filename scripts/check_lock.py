"""Check that every installed package listed in requirements/lock.txt has its locked version (run by setup.sh)."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def main() -> int:
    lock = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
    wrong = []
    for line in lock.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if not m:
            continue
        name, want = m.groups()
        if name == "torch":  # installed first, on its own (a CUDA build may be there already)
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:  # a constraint for an extra that is not installed
            continue
        if have.split("+")[0] != want:
            wrong.append(f"{name}: {have} installed, lock: {want}")
    for w in wrong:
        print(f"{lock}: {w}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
