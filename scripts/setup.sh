#!/usr/bin/env bash
# Set up mlpgrid in ./.venv on Debian/Ubuntu: the offline default dataset, PyTorch, the package.
#   bash scripts/setup.sh          # to run grids
#   bash scripts/setup.sh --dev    # also the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The default dataset, Fashion-MNIST, comes from Debian's dataset-fashion-mnist package.
if [ -z "${MLPGRID_FASHION_MNIST:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt_install dataset-fashion-mnist
fi
python3 -c "import ensurepip" 2>/dev/null || apt_install python3-venv
[ -x .venv/bin/python ] || python3 -m venv .venv

# Install the pinned PyTorch first: left to the resolver, torch may come as another build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".$extra"
echo "mlpgrid is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
