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
exec .venv/bin/python -m pytest -q "$@"
