#!/usr/bin/env bash
# One command on a fresh machine: create the environment, build the default run if it is missing
# (every optional stage, --all-stages, so every page has content; progress shown), then serve the
# dashboard on http://127.0.0.1:8050 (no Redis, no worker: online queries run in-process). Fast when
# everything exists already.
# Usage: bash scripts/run_local.sh [options of `python -m app`, e.g. --port 8051]
# Env: HEADSCOPE_CACHE (runs directory, default ./cache), PYTHON (interpreter for the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_debian.sh
bash scripts/setup_env.sh
run="${HEADSCOPE_CACHE:-cache}/default"
if [ ! -f "$run/manifest.json" ]; then
  echo "Building the default run into $run (first time only)..."
  .venv/bin/python scripts/build_cache.py --out "$run" --all-stages
elif ! grep -q '"status": "complete"' "$run/manifest.json"; then
  echo "Resuming the unfinished build of $run..."
  .venv/bin/python scripts/build_cache.py --out "$run" --resume
elif ! grep -q '"all_stages": true' "$run/manifest.json"; then
  echo "Note: $run was built without --all-stages, so some pages (Taylor, mean ablation, curves, circuits)" \
       "are empty. To rebuild it with everything: rm -rf $run && bash scripts/run_local.sh" >&2
fi
exec .venv/bin/python -m app "$@"
