#!/usr/bin/env bash
# Run HeadScope's test suite on a fresh machine: installs the Debian packages the tests use
# (headless chromium + driver, redis-server, Fashion-MNIST), the Python environment, then pytest.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v redis-server >/dev/null || need+=(redis-server)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q "$@"
