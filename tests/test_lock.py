"""The lock and pyproject.toml agree: each lower bound is the version the lock (and CI) tested."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def requirements(pyproject) -> list[str]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(data.get("dependencies", []))
    for extra in data.get("optional-dependencies", {}).values():
        reqs += extra
    return reqs


def test_every_lower_bound_is_the_locked_version():
    pins = lock()
    files = [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]
    checked = 0
    for f in files:
        for req in requirements(f):
            m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", req)
            if not m:
                continue
            name, bound = m.group(1).lower().replace("_", "-"), m.group(2)
            if name.startswith("famtune"):
                continue
            assert name in pins, f"{f.name}: {req} is not in requirements/lock.txt"
            locked = pins[name]
            assert locked == bound or locked.startswith(bound + "."), (
                f"{f.relative_to(ROOT)}: {req} claims versions older than the locked {locked}, which no test ran"
            )
            checked += 1
    assert checked >= 13


def test_lock_pins_every_requirement_exactly_once():
    lines = [ln for ln in (ROOT / "requirements" / "lock.txt").read_text().splitlines() if "==" in ln]
    names = [ln.split("==")[0].lower().replace("_", "-") for ln in lines]
    assert len(names) == len(set(names)), "a package is pinned twice"
    assert "torch" in names and "transformers" in names
