"""CIFAR-10 and CIFAR-100 in their python-pickle layout, as the authors distribute them.

``cifar-10-batches-py/``: ``data_batch_1`` ... ``data_batch_5``, ``test_batch``, ``batches.meta``.
``cifar-100-python/``: ``train``, ``test``, ``meta`` (the 100 fine labels are used).
Each batch holds ``data``, uint8 rows of 3072 = 3 planes of 32x32, and a list of labels.

The files are pickles; they are read with an unpickler that only builds plain containers and
numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from mlpgrid.data.files import require

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
}  # fmt: skip


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[str, Any]:
    """One pickled batch, keys decoded to str; ValueError naming the file if it is not one."""
    try:
        with path.open("rb") as f:
            raw = _ArraysOnly(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a CIFAR batch ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a CIFAR batch (a {type(raw).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _images_and_labels(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = read_batch(path)
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: a CIFAR batch needs 'data' and '{label_key}'; found {sorted(batch)}")
    data, labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: data {data.shape} and {len(labels)} labels do not make 32x32x3 images")
    return data.reshape(-1, 3, 32, 32), labels


def _names(path: Path, key: str) -> tuple[str, ...]:
    meta = read_batch(path)
    if key not in meta:
        raise ValueError(f"{path}: no '{key}' in the metadata")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[key])


def locate_cifar10(root: Path) -> dict[str, Path]:
    return require(root, (*CIFAR10_TRAIN, "test_batch", "batches.meta"))


def locate_cifar100(root: Path) -> dict[str, Path]:
    return require(root, ("train", "test", "meta"))


def read_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    files = locate_cifar10(root)
    parts = [_images_and_labels(files[name], "labels") for name in CIFAR10_TRAIN]
    test_x, test_y = _images_and_labels(files["test_batch"], "labels")
    train_x = np.concatenate([x for x, _ in parts])
    train_y = np.concatenate([y for _, y in parts])
    return train_x, train_y, test_x, test_y, _names(files["batches.meta"], "label_names")


def read_cifar100(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    files = locate_cifar100(root)
    train_x, train_y = _images_and_labels(files["train"], "fine_labels")
    test_x, test_y = _images_and_labels(files["test"], "fine_labels")
    return train_x, train_y, test_x, test_y, _names(files["meta"], "fine_label_names")
