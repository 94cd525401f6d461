#!/usr/bin/env bash
# Run HeadScope's test suite on a fresh machine: installs the Debian packages the tests use
# (headless chromium + driver, redis-server, Fashion-MNIST), the Python environment, then the import
# contract (lint-imports) and pytest.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_debian.sh --test
bash scripts/setup_env.sh --test
# The import contract (pyproject.toml [tool.importlinter], ARCHITECTURE.md "Layers") fails CI on an upward import.
.venv/bin/lint-imports --no-cache
# A full run writes about 1 GB under the temporary directory (runs, models, browser profiles).
tmp=${TMPDIR:-/tmp}
free_gb=$(( $(df -Pk "$tmp" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
if [ "$free_gb" -lt 2 ]; then
  echo "test.sh: only $free_gb GB free in $tmp; the tests write about 1 GB there." \
       "Free some space (or point TMPDIR at a larger disk) and run this again." >&2
  exit 1
fi
exec .venv/bin/python -m pytest -q "$@"
