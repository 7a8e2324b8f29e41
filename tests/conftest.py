import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path(os.environ.get("MLPGRID_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` (uint8) in the idx layout MNIST and Fashion-MNIST ship in."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


@pytest.fixture
def fashion_mnist() -> Path:
    if not FASHION_MNIST.is_dir():
        pytest.fail(f"Fashion-MNIST not found at {FASHION_MNIST}: install Debian's dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture
def write_grid(tmp_path):
    def write(text: str, name: str = "grid.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def mlpgrid_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlpgrid", *args]
