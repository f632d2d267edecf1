#!/usr/bin/env bash
# Create .venv with famtune and its built-in family plugins (editable), on CPU or CUDA machines.
#
#   scripts/setup.sh            the locked versions (requirements/lock.txt): what CI tested
#   scripts/setup.sh --latest   the newest versions pyproject.toml allows (then: pytest, and
#                               scripts/lock.sh to record them if the suite passes)
#
# torch is installed first and pinned: an unpinned `torch` requirement would pull multi-GB CUDA
# wheels. On a GPU machine install your CUDA torch into .venv beforehand, or set FAMTUNE_TORCH_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
latest=0
for arg in "$@"; do
  case "$arg" in
    --latest) latest=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (expected --latest)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip setuptools wheel
torch_version=${FAMTUNE_TORCH_VERSION:-2.13.0}
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==$torch_version"
# Whatever torch is installed now stays (the CPU build above, or a CUDA build installed beforehand):
# an upgrade would pull a multi-GB CUDA build.
installed_torch=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$installed_torch" > .venv/lock-constraints.txt
if [ "$latest" = 0 ]; then grep -v '^torch==' requirements/lock.txt >> .venv/lock-constraints.txt; fi
constraints=(-c .venv/lock-constraints.txt)
plugins=()
for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && plugins+=(-e "$p"); done
if [ "$latest" = 1 ]; then
  "${pip[@]}" "${constraints[@]}" --upgrade --upgrade-strategy eager -e ".[test]" "${plugins[@]}"
else
  "${pip[@]}" "${constraints[@]}" -e ".[test]" "${plugins[@]}"
fi
if [ "$latest" = 0 ]; then
  .venv/bin/python scripts/check_lock.py
fi
.venv/bin/famtune plugins
