"""Prepared datasets: what ``mlpgrid data prepare`` writes, read back.

A prepared dataset is a directory::

    manifest.json        source, layout, resolution, channels, classes, counts, mean/std, checksums
    train_images.npy     uint8 (N, C, R, R), memory-mapped when read
    train_labels.npy     int64 (N,)
    test_images.npy      (and test_labels.npy; absent when the source had no test split)

or, in FFCV format, ``train.beton`` / ``test.beton`` in place of the ``*_images.npy`` files.
The manifest is written last, so a directory with one is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mlpgrid.data.files import sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_HOME = "data/prepared"


def home() -> Path:
    """Where prepared datasets live unless a grid says otherwise: ``$MLPGRID_DATA`` or ./data/prepared."""
    return Path(os.environ.get("MLPGRID_DATA") or DEFAULT_HOME)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a prepared dataset (no {MANIFEST}; make one with `mlpgrid data prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: manifest format {manifest.get('format_version')!r}, this mlpgrid reads {FORMAT_VERSION}"
        )
    return manifest


def files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256", "bytes"}}`` of every data file the manifest lists."""
    return {name: entry for split in manifest["splits"].values() for name, entry in split["files"].items()}


def locate(root: Path) -> dict[str, Path]:
    """The dataset's files, checked to exist with the sizes the manifest gives."""
    listed = files(read_manifest(root))
    found = {}
    for name, entry in listed.items():
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{root}: missing {name} (listed in {MANIFEST})")
        if path.stat().st_size != entry["bytes"]:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {entry['bytes']}; re-prepare it")
        found[name] = path
    return found


def verify(root: Path) -> list[str]:
    """Files whose checksum differs from the manifest's (empty when all match)."""
    listed = files(read_manifest(root))
    locate(root)
    return [
        f"{root / name}: checksum differs from {MANIFEST}"
        for name, e in listed.items()
        if sha256(root / name) != e["sha256"]
    ]


def load_split(root: Path, split: str) -> tuple[np.ndarray | None, np.ndarray]:
    """(images or None for a .beton split, labels) of a split; images memory-mapped."""
    labels = np.load(root / f"{split}_labels.npy")
    images_file = root / f"{split}_images.npy"
    images = np.load(images_file, mmap_mode="r") if images_file.is_file() else None
    return images, labels


def find_all(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every prepared dataset directly under ``directory`` (or ``directory`` itself), sorted by name."""
    candidates = [directory] + (sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else [])
    found = []
    for path in candidates:
        if (path / MANIFEST).is_file():
            found.append((path, read_manifest(path)))
    return found
