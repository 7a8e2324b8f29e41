#!/usr/bin/env bash
# Set up mlpgrid in ./.venv on Debian/Ubuntu: the offline default dataset, PyTorch, the package.
#   bash scripts/setup.sh                # to run grids
#   bash scripts/setup.sh --dev          # also the test tools (and Debian's Chromium for the browser test)
#   bash scripts/setup.sh --dev --ffcv   # also FFCV (.beton datasets), built against system libraries
set -euo pipefail
cd "$(dirname "$0")/.."
extras=()
ffcv=0
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev); dev=1 ;;
    --ffcv) extras+=(ffcv); ffcv=1 ;;
    *) echo "unknown option $arg (use --dev, --ffcv)" >&2; exit 2 ;;
  esac
done
extra=""
[ ${#extras[@]} -gt 0 ] && extra="[$(IFS=,; echo "${extras[*]}")]"

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
# The browser test drives Debian's Chromium (Playwright's own browser download is not used).
if [ "$dev" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  apt_install chromium
fi
# FFCV compiles a C extension against libjpeg-turbo and OpenCV.
if [ "$ffcv" = 1 ] && ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
  apt_install pkg-config libturbojpeg0-dev libopencv-dev
fi
[ -x .venv/bin/python ] || python3 -m venv .venv

# Install the pinned PyTorch first: left to the resolver, torch may come as another build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".$extra"
echo "mlpgrid is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
