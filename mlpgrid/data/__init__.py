"""Datasets: where they live, how to read them, and their shape before anything is loaded.

A dataset is one of the built-in sources (:data:`DATASETS`, read from their distribution
layout) or a prepared dataset (see :mod:`mlpgrid.data.prepared`) known by its name: found
under ``$MLPGRID_DATA`` (default ``data/prepared``) or where a grid's ``data:`` section says.
It loads into an :class:`ImageArrays`: uint8 images (N, C, H, W) and int64 labels for the
train and test split, plus per-channel mean and std of the training images.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlpgrid.data import cifar, prepared, stl10
from mlpgrid.data.idx import find_idx, idx_length, read_idx


@dataclass(frozen=True)
class ImageArrays:
    train_images: np.ndarray | None  # uint8 (N, C, H, W), possibly memory-mapped; None when in .beton files
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray | None
    test_labels: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...] = ()  # per channel, 0..1 scale, of the training images
    std: tuple[float, ...] = ()
    beton: dict[str, Path] | None = None  # split -> FFCV file, for datasets prepared in that format

    def images(self, split: str) -> np.ndarray:
        """The uint8 images of ``split`` ("train" or "test"); an error for a dataset in .beton files."""
        images = self.train_images if split == "train" else self.test_images
        if images is None:
            raise ValueError("this dataset is stored as FFCV .beton files: only FFCV reads its images")
        return images

    def with_stats(self) -> ImageArrays:
        mean, std = channel_stats(self.images("train"))
        return dataclasses.replace(self, mean=tuple(mean), std=tuple(std))


@dataclass(frozen=True)
class DatasetInfo:
    """What the grid validator needs to know about a dataset without reading it."""

    name: str
    classes: tuple[str, ...]
    channels: int
    resolution: int
    train_size: int
    test_size: int
    default_root: str
    env_var: str | None  # overrides default_root
    locate: Callable[[Path], dict[str, Path]]  # the files a root must hold; FileNotFoundError if not
    read: Callable[[Path], ImageArrays]
    # How many training images the located files hold, read from their headers or sizes: a copy
    # of part of the dataset serves trials of up to that many examples. None: the layout fixes it.
    train_count: Callable[[dict[str, Path]], int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def root(self, configured: str | None = None) -> Path:
        """Where to read from: the grid's setting, else the environment, else the default."""
        return Path(configured or (self.env_var and os.environ.get(self.env_var)) or self.default_root)


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_CLASSES = (  # the fine labels, in label order
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm"
)  # fmt: skip
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def _locate_idx_files(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (the four MNIST-style idx files expected)")
    return {
        f"{split}-{kind}": find_idx(root, f"{split}-{kind}-idx{dims}-ubyte")
        for split in ("train", "t10k")
        for kind, dims in (("images", 3), ("labels", 1))
    }


def _read_fashion_mnist(root: Path) -> ImageArrays:
    files = _locate_idx_files(root)

    def split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(files[f"{prefix}-images"])
        labels = read_idx(files[f"{prefix}-labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{root}: {prefix} images {images.shape} do not match labels {labels.shape}")
        return images[:, None], labels.astype(np.int64)

    train_x, train_y = split("train")
    test_x, test_y = split("t10k")
    return ImageArrays(train_x, train_y, test_x, test_y, FASHION_MNIST_CLASSES)


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        classes=FASHION_MNIST_CLASSES,
        channels=1,
        resolution=28,
        train_size=60_000,
        test_size=10_000,
        default_root="/usr/share/datasets/fashion-mnist",
        env_var="MLPGRID_FASHION_MNIST",
        locate=_locate_idx_files,
        read=_read_fashion_mnist,
        train_count=lambda files: idx_length(files["train-images"]),
    ),
    "cifar-10": DatasetInfo(
        name="cifar-10",
        classes=CIFAR10_CLASSES,
        channels=3,
        resolution=32,
        train_size=50_000,
        test_size=10_000,
        default_root="data/cifar-10-batches-py",
        env_var="MLPGRID_CIFAR10",
        locate=cifar.locate_cifar10,
        read=lambda root: ImageArrays(*cifar.read_cifar10(root)),
    ),
    "cifar-100": DatasetInfo(
        name="cifar-100",
        classes=CIFAR100_CLASSES,
        channels=3,
        resolution=32,
        train_size=50_000,
        test_size=10_000,
        default_root="data/cifar-100-python",
        env_var="MLPGRID_CIFAR100",
        locate=cifar.locate_cifar100,
        read=lambda root: ImageArrays(*cifar.read_cifar100(root)),
    ),
    "stl-10": DatasetInfo(
        name="stl-10",
        classes=STL10_CLASSES,
        channels=3,
        resolution=96,
        train_size=5_000,
        test_size=8_000,
        default_root="data/stl10_binary",
        env_var="MLPGRID_STL10",
        locate=stl10.locate,
        read=lambda root: ImageArrays(*stl10.read(root)),
        train_count=lambda files: files["train_y.bin"].stat().st_size,  # one byte a label
    ),
}


_PREPARED: dict[str, DatasetInfo] = {}


def _prepared_dataset(name: str, root: Path, classes: tuple[str, ...], facts: dict[str, int]) -> DatasetInfo:
    """A dataset read from a prepared directory, described by ``facts`` (see :data:`DECLARED_FACTS`)."""
    return DatasetInfo(
        name=name,
        classes=classes,
        channels=facts.get("channels", 3),
        resolution=facts["resolution"],
        train_size=facts["train"],
        test_size=facts["test"],
        default_root=str(root),
        env_var=None,
        locate=prepared.locate,
        read=_read_prepared,
    )


def _prepared_info(name: str, root: Path) -> DatasetInfo:
    manifest = prepared.read_manifest(root)
    if manifest["name"] != name:
        raise ValueError(f"{root}: holds the prepared dataset {manifest['name']!r}, not {name!r}")
    splits = manifest["splits"]
    if "test" not in splits:
        raise ValueError(f"{root}: {name} has no test split; prepare it with --holdout to carve one from train")
    facts = {"classes": len(manifest["classes"]), "train": splits["train"]["count"], "test": splits["test"]["count"],
             "resolution": manifest["resolution"], "channels": manifest["channels"]}  # fmt: skip
    return _prepared_dataset(name, root, tuple(manifest["classes"]), facts)


def _read_prepared(root: Path) -> ImageArrays:
    manifest = prepared.read_manifest(root)
    prepared.locate(root)
    (train_x, train_y), (test_x, test_y) = (prepared.load_split(root, s) for s in ("train", "test"))
    beton = {s: root / f"{s}.beton" for s in ("train", "test")} if manifest["format"] == "beton" else None
    return ImageArrays(
        train_x, train_y, test_x, test_y, tuple(manifest["classes"]), tuple(manifest["mean"]), tuple(manifest["std"]),
        beton,
    )  # fmt: skip


def register(name: str, root: str | Path) -> None:
    """Make the prepared dataset in ``root`` known as ``name`` (built-in names need no registering;
    one already known at ``root`` is not read again)."""
    known = _PREPARED.get(name)
    if name not in DATASETS and (known is None or known.default_root != str(root)):
        _PREPARED[name] = _prepared_info(name, Path(root))


DECLARED_FACTS = ("classes", "train", "test", "resolution", "channels")
# What a declared dataset may state, inclusive: ImageNet-21k has 21,841 classes; a million class
# names is some 60 MB, a billion would not fit (a declared 10^9 classes ran out of memory).
DECLARED_RANGES = {"classes": (1, 1_000_000), "train": (1, 10**10), "test": (0, 10**10), "resolution": (1, 4096),
                   "channels": (1, 3)}  # fmt: skip


def declare(name: str, root: str | Path, facts: dict[str, int]) -> None:
    """Make ``name`` known from the facts a grid file states about it (``classes``, ``train``,
    ``test``, ``resolution``, ``channels``), so its trials can be planned before it is prepared.
    Once prepared at ``root``, its manifest must agree with them."""
    for fact, value in facts.items():
        low, high = DECLARED_RANGES[fact]
        if not low <= value <= high:
            raise ValueError(f"{fact} must be from {low:,} to {high:,}, got {value:,}")
    root = Path(root)
    if not (root / prepared.MANIFEST).is_file():
        _PREPARED[name] = _prepared_dataset(name, root, tuple(str(i) for i in range(facts["classes"])), facts)
        return
    register(name, root)
    found = _PREPARED[name]
    actual = {"classes": found.num_classes, "train": found.train_size, "test": found.test_size,
              "resolution": found.resolution, "channels": found.channels}  # fmt: skip
    wrong = [f"{k} {facts[k]} (it has {actual[k]})" for k in DECLARED_FACTS if facts.get(k, actual[k]) != actual[k]]
    if wrong:
        raise ValueError(f"{root}: the prepared dataset differs from what is declared: {', '.join(wrong)}")


def info(name: str) -> DatasetInfo:
    """A built-in dataset, a registered prepared one, or one prepared under :func:`prepared.home`."""
    if name in DATASETS:
        return DATASETS[name]
    if name not in _PREPARED:
        root = prepared.home() / name
        if not (root / prepared.MANIFEST).is_file():
            found = [m["name"] for _, m in prepared.find_all(prepared.home())[0]]
            raise ValueError(
                f"unknown dataset {name!r}; built in: {', '.join(DATASETS)}; prepared in {prepared.home()}: "
                f"{', '.join(found) or 'none'} (make one with `mlpgrid data prepare`)"
            )
        register(name, root)
    return _PREPARED[name]


class Datasets:
    """The datasets one trial reads, each from where ``roots`` says (the others from their
    defaults), each read once at a resolution and channel count.

    ``roots`` holds a directory per dataset name, as a grid file's ``data:`` section resolves
    them; the prepared ones among them are registered once here, in the process that trains.
    """

    def __init__(self, roots: Mapping[str, str | Path] | None = None):
        self.roots = {name: str(root) for name, root in (roots or {}).items()}
        for name, root in self.roots.items():
            register(name, root)
        self._kept: dict[tuple[str, int, int], ImageArrays] = {}

    @staticmethod
    def _key(name: str, resolution: int | None, channels: int | None) -> tuple[str, int, int]:
        dataset = info(name)
        return name, resolution or dataset.resolution, channels or dataset.channels

    def keep(self, name: str, resolution: int | None, channels: int | None, arrays: ImageArrays) -> None:
        """Hold ``arrays`` (read elsewhere, e.g. shared by the runner) as ``name`` at that shape."""
        self._kept[self._key(name, resolution, channels)] = arrays

    def load(self, name: str, resolution: int | None = None, channels: int | None = None, *,
             keep: bool = True) -> ImageArrays:  # fmt: skip
        """``name`` at ``resolution`` and ``channels`` (None: the dataset's own), read on first use;
        with ``keep`` false it is handed over and not held here any longer."""
        key = self._key(name, resolution, channels)
        arrays = self._kept.get(key) or load(name, self.roots.get(name), resolution, channels)
        if keep:
            self._kept[key] = arrays
        else:
            self._kept.pop(key, None)
        return arrays


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images on the 0..1 scale (float64, in chunks)."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(images), 4096):
        chunk = np.asarray(images[start : start + 4096], dtype=np.float64) / 255
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk**2).sum(axis=(0, 2, 3))
    n = len(images) * images.shape[2] * images.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0) * n / max(1, n - 1))
    return mean.tolist(), std.tolist()


def resize(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (N, channels, resolution, resolution).

    Downsampling averages areas (as Chrabaszcz et al. did for 64x64 ImageNet); upsampling is
    bilinear. A single channel is repeated to make three.
    """
    n, c, h, w = images.shape
    if c != channels:
        if c != 1:
            raise ValueError(f"cannot turn {c}-channel images into {channels} channels")
        images = np.repeat(images, channels, axis=1)
    if (h, w) == (resolution, resolution):
        return images  # unchanged, so a memory-mapped array stays mapped
    # torch only here: the dataset catalogue above is read by `status` and `frontier`, which
    # never touch pixels and start about 2 s sooner without torch.
    import torch
    import torch.nn.functional as F

    mode = "area" if resolution < min(h, w) else "bilinear"
    out = np.empty((n, channels, resolution, resolution), dtype=np.uint8)
    for start in range(0, n, 4096):  # bounded memory for large sets
        chunk = torch.from_numpy(images[start : start + 4096]).float()
        scaled = F.interpolate(chunk, size=(resolution, resolution), mode=mode)
        out[start : start + 4096] = scaled.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def load(name: str, root: str | None = None, resolution: int | None = None, channels: int | None = None) -> ImageArrays:
    """Read a dataset and bring it to the requested resolution and channel count."""
    dataset = info(name)
    arrays = dataset.read(dataset.root(root))
    for split, labels in (("train", arrays.train_labels), ("test", arrays.test_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= dataset.num_classes):
            raise ValueError(
                f"{dataset.root(root)}: {split} labels span {labels.min()}..{labels.max()};"
                f" {name} has {dataset.num_classes} classes"
            )
    if arrays.beton is not None:
        if (resolution or dataset.resolution, channels or dataset.channels) != (dataset.resolution, dataset.channels):
            raise ValueError(
                f"{name} is stored as FFCV files at {dataset.resolution}px; it cannot be resized per trial"
            )
        return arrays
    resolution = resolution or dataset.resolution
    channels = channels or dataset.channels
    resized = dataclasses.replace(
        arrays,
        train_images=resize(arrays.images("train"), resolution, channels),
        test_images=resize(arrays.images("test"), resolution, channels),
    )
    unchanged = resized.train_images is arrays.train_images and arrays.mean
    return resized if unchanged else resized.with_stats()
