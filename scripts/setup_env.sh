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
  echo "Installing Python packages from $req into .venv (first run takes a few minutes)..."
  .venv/bin/pip install -q -r "$req"
  .venv/bin/pip install -q --no-deps -r requirements-data.txt
  # HeadScope itself; offline with the venv's own setuptools when it has one (>= 64), else isolated
  .venv/bin/pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi
