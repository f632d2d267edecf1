#!/usr/bin/env bash
# Create .venv with famtune and its built-in family plugins (editable), on CPU or CUDA machines.
# torch is pinned to the CPU build first: an unpinned `torch` requirement would pull multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==${FAMTUNE_TORCH_VERSION:-2.13.0}"
plugins=()
for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && plugins+=(-e "$p"); done
.venv/bin/python -m pip install -q -e ".[test]" "${plugins[@]}"
.venv/bin/famtune plugins
