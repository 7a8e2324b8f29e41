"""A CIFAR-10-sized dataset of random pixels in CIFAR-10's own file layout, for benchmarks.

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
