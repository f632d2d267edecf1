#!/usr/bin/env bash
# Write requirements/lock.txt from .venv: run after the suite passed on the versions installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# famtune's lock: the exact versions CI and scripts/setup.sh install (pip constraints)."
  echo "# Regenerate after testing newer ones: scripts/setup.sh --latest && scripts/lock.sh"
  .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^-e ' | sed 's/+[a-z0-9.]*$//' | sort -f
} > requirements/lock.txt
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) pinned packages"
