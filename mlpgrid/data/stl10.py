"""STL-10 in its binary layout (``stl10_binary/``): ``train_X.bin``, ``train_y.bin``,
``test_X.bin``, ``test_y.bin``, ``class_names.txt``. Images are 96x96x3 uint8 stored
channel by channel, each channel column-major; labels are bytes 1..10. The unlabelled split is
not used."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpgrid.data.files import require

SIDE = 96
_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")


def locate(root: Path) -> dict[str, Path]:
    return require(root, _FILES)


def _split(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.fromfile(images, dtype=np.uint8), np.fromfile(labels, dtype=np.uint8)
    per_image = 3 * SIDE * SIDE
    if x.size % per_image or x.size // per_image != y.size:
        raise ValueError(f"{images}: {x.size} bytes are not {y.size} images of 96x96x3 (as {labels} says)")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"{labels}: labels must be 1..10, found {y.min()}..{y.max()}")
    # Stored column-major per channel: swap to rows first.
    return x.reshape(-1, 3, SIDE, SIDE).transpose(0, 1, 3, 2).copy(), y.astype(np.int64) - 1


def read(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    files = locate(root)
    train_x, train_y = _split(files["train_X.bin"], files["train_y.bin"])
    test_x, test_y = _split(files["test_X.bin"], files["test_y.bin"])
    classes = tuple(line.strip() for line in files["class_names.txt"].read_text().splitlines() if line.strip())
    if len(classes) != 10:
        raise ValueError(f"{files['class_names.txt']}: {len(classes)} class names, expected 10")
    return train_x, train_y, test_x, test_y, classes
