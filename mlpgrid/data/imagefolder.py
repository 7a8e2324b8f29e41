"""Image-folder trees: ``train/<class>/*.jpg|png`` and ``val/<class>/...`` (or ``test/``).

This is how TinyImageNet, ImageNet-1k and ImageNet-21k are usually kept. TinyImageNet's
validation split, ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``, is read too.
Class names are the training folder's subfolders, sorted; a class is its index in that order.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TEST_SPLIT_NAMES = ("val", "test")


@dataclass(frozen=True)
class ImageList:
    """The images of one split, in a fixed order: files and their class indices."""

    files: list[Path]
    labels: np.ndarray  # int64
    passed_over: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of what was not read


# Why a path under a class folder is passed over without being read.
LINKED_DIRECTORY = "a link to a directory: not entered (it could loop, or list the same images again)"
NOT_A_FILE = "not a regular file (a broken link, or a link that loops)"


def _images_in(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under ``folder``, and the paths passed over with the reason: directories
    linked in are not entered, and links to nothing (or to themselves) are no images."""
    found, passed_over = [], []
    for directory, subdirectories, files in os.walk(folder, followlinks=False):
        passed_over += [(str(Path(directory) / d), LINKED_DIRECTORY) for d in subdirectories
                        if (Path(directory) / d).is_symlink()]  # fmt: skip
        for path in (Path(directory) / f for f in files if Path(f).suffix.lower() in EXTENSIONS):
            if path.is_file():
                found.append(path)
            else:
                passed_over.append((str(path), NOT_A_FILE))
    return sorted(found), sorted(passed_over)


def classes(root: Path) -> tuple[str, ...]:
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{root}: no train/ folder (an image-folder source holds train/<class>/*.jpg)")
    names = tuple(sorted(p.name for p in train.iterdir() if p.is_dir()))
    if not names:
        raise FileNotFoundError(f"{train}: no class folders (expected train/<class>/*.jpg)")
    return names


def _class_folders(split: Path, names: tuple[str, ...]) -> ImageList:
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(p.name for p in split.iterdir() if p.is_dir() and p.name not in index)
    if unknown:
        raise ValueError(f"{split}: class folders not in train/: {', '.join(unknown[:5])}")
    for name in names:
        folder = split / name
        if folder.is_symlink() and split.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"{folder}: links to {folder.resolve()}, which holds the split itself: its images "
                             "would come again under this class")  # fmt: skip
    files, labels, passed_over = [], [], []
    for name in names:
        if (split / name).is_dir():
            found, passed = _images_in(split / name)
            files += found
            labels += [index[name]] * len(found)
            passed_over += passed
    return ImageList(files, np.asarray(labels, dtype=np.int64), passed_over)


def _annotated(split: Path, names: tuple[str, ...]) -> ImageList:
    """TinyImageNet's validation layout: one folder of images and a tab-separated label file."""
    index = {name: i for i, name in enumerate(names)}
    files, labels = [], []
    annotations = split / "val_annotations.txt"
    for n, line in enumerate(annotations.read_text().splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise ValueError(f"{annotations}: line {n}: expected 'FILE<TAB>CLASS' with a class of train/")
        files.append(split / "images" / parts[0])
        labels.append(index[parts[1]])
    return ImageList(files, np.asarray(labels, dtype=np.int64))


def list_images(root: Path) -> tuple[tuple[str, ...], dict[str, ImageList]]:
    """Class names and ``{"train": ..., "test": ...}`` (no "test" when the tree has no such split)."""
    names = classes(root)
    splits = {"train": _class_folders(root / "train", names)}
    for name in TEST_SPLIT_NAMES:
        folder = root / name
        if folder.is_dir():
            if (folder / "val_annotations.txt").is_file():
                splits["test"] = _annotated(folder, names)
            else:
                splits["test"] = _class_folders(folder, names)
            break
    for split, images in splits.items():
        if not images.files:
            raise FileNotFoundError(f"{root}: the {split} split holds no images ({', '.join(sorted(EXTENSIONS))})")
    return names, splits


def read_image(path: Path, resolution: int, channels: int) -> np.ndarray:
    """One image as uint8 (channels, resolution, resolution); the whole image, not a crop.

    Downsampling averages boxes of pixels (area resampling, as Chrabaszcz et al. did for
    ImageNet 64x64); upsampling is bilinear. Raises ValueError saying why an image is unreadable.
    """
    try:
        with warnings.catch_warnings():
            # Over Image.MAX_IMAGE_PIXELS (89M) Pillow warns, over twice that it refuses: either
            # is an image no dataset of small images holds (a decompression bomb, say).
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                img = opened.convert("RGB" if channels == 3 else "L")  # decodes every pixel: truncation shows here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # fmt: skip
        raise ValueError(f"{type(e).__name__}: {e}") from None
    shrinking = img.width >= resolution and img.height >= resolution
    img = img.resize((resolution, resolution), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    return array.transpose(2, 0, 1) if channels == 3 else array[None]
