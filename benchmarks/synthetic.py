"""Datasets of random pixels in the real datasets' own file layouts, for benchmarks: CIFAR-10
(python pickles) and Fashion-MNIST (idx files).

Speed does not depend on pixel values, and the real data cannot be downloaded everywhere; the
layout is the real one, so trials read it exactly as they read CIFAR-10.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from mlpgrid import data
from mlpgrid.data import cifar


def write_cifar10(root: Path, train: int = 50_000, test: int = 10_000, seed: int = 0) -> Path:
    """``root`` filled like ``cifar-10-batches-py`` (five training batches, a test batch, the meta file)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    sizes = {name: train // 5 + (i < train % 5) for i, name in enumerate(cifar.CIFAR10_TRAIN)} | {"test_batch": test}
    for name, n in sizes.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_mnist(root: Path, train: int = 60_000, test: int = 10_000, seed: int = 0) -> Path:
    """``root`` filled like Debian's ``dataset-fashion-mnist`` (the four idx files, uncompressed)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        _idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return root
