#!/usr/bin/env bash
# Install the Debian packages HeadScope uses that are missing here (as root, or with sudo).
# Usage: bash scripts/install_debian.sh [--test]
#   always: dataset-fashion-mnist (the default run's images; without it the build downloads
#           Fashion-MNIST with torchvision, which needs internet)
#   --test: also chromium + chromium-driver (browser tests), redis-server (worker tests) and nodejs
#           (scripts/load_test.py runs the page's clientside callbacks in Node.js)
set -euo pipefail
need=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || [ -n "${HEADSCOPE_FASHION_MNIST_DIR:-}" ] \
  || need+=(dataset-fashion-mnist)
if [ "${1:-}" = "--test" ]; then
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v node >/dev/null || need+=(nodejs)
fi
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; else
    echo "Missing Debian packages: ${need[*]}. Install them with: sudo apt-get install ${need[*]}" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "Missing Debian packages: ${need[*]} (no apt-get here: install the equivalents by hand)." >&2
  exit 0
fi
echo "Installing Debian packages: ${need[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
