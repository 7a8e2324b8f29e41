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

import hashlib
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
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else manifest
        raise ValueError(f"{path}: manifest format {found!r}, this mlpgrid reads {FORMAT_VERSION}")
    problems = _manifest_problems(manifest)
    if problems:
        raise ValueError(f"{path}: damaged manifest ({'; '.join(problems)}); re-prepare the dataset")
    return manifest


# What every manifest holds, and of which type (what ``mlpgrid data prepare`` writes).
MANIFEST_FIELDS = {"name": str, "format": str, "resolution": int, "channels": int, "classes": list, "mean": list,
                   "std": list, "splits": dict, "skipped": list, "settings": dict}  # fmt: skip


def _manifest_problems(manifest: dict[str, Any]) -> list[str]:
    problems = []
    for key, kind in MANIFEST_FIELDS.items():
        if key not in manifest:
            problems.append(f"{key}: missing")
        elif not isinstance(manifest[key], kind):
            problems.append(f"{key}: expected {kind.__name__}, got {type(manifest[key]).__name__}")
    for split, entry in manifest["splits"].items() if isinstance(manifest.get("splits"), dict) else ():
        listed = entry.get("files") if isinstance(entry, dict) else None
        well_formed = (
            isinstance(listed, dict)
            and isinstance(entry.get("count"), int)
            and all(
                isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("bytes"), int)
                for f in listed.values()
            )
        )
        if not well_formed:
            problems.append(f"splits.{split}: expected a count and files with sha256 and bytes")
    return problems


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


def checksum(manifest: dict[str, Any]) -> str:
    """The dataset's identity: a SHA-256 over its files' names and checksums as its manifest lists
    them (what a trial's MLflow run records as ``data.<name>.sha256``)."""
    listed = sorted((name, entry["sha256"]) for name, entry in files(manifest).items())
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def verify(root: Path, record: Path | None = None) -> list[str]:
    """Files whose checksum differs from the manifest's (empty when all match).

    With ``record`` (a file of mlpgrid's storage), a file is hashed again only when its size,
    inode, modification or status-change time changed since ``record`` saw it match, and
    ``record`` is updated: the first check of a 10 GB dataset reads it all (SHA-256 at 1.2 GB/s
    here, from the page cache), later ones cost a ``stat`` per file. Any write changes the
    status-change time, which (unlike the modification time) no program can set back.
    """
    manifest = read_manifest(root)
    listed = files(manifest)
    locate(root)
    problems = _shape_problems(root, manifest)
    seen = _read_record(record)
    matched = {}
    for name, entry in listed.items():
        stat = (root / name).stat()
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, entry["sha256"]]
        if seen.get(name) != signature and sha256(root / name) != entry["sha256"]:
            problems.append(f"{root / name}: checksum differs from {MANIFEST}")
            continue
        matched[name] = signature
    if record is not None and matched != seen:
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f".{record.name}.{os.getpid()}")
        partial.write_text(json.dumps(matched))
        partial.replace(record)
    return problems


def _shape_problems(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Where the arrays' shapes contradict the manifest (an edited resolution or channel count)."""
    problems = []
    side, depth = manifest["resolution"], manifest["channels"]
    for split, entry in manifest["splits"].items():
        count = entry["count"]
        expected = {f"{split}_images.npy": (count, depth, side, side), f"{split}_labels.npy": (count,)}
        for name, shape in expected.items():
            if name in entry["files"]:
                found = np.load(root / name, mmap_mode="r").shape
                if found != shape:
                    problems.append(f"{root / name}: shape {found}, {MANIFEST} says {shape}; re-prepare it")
    return problems


def _read_record(record: Path | None) -> dict[str, Any]:
    try:
        seen = json.loads(record.read_text()) if record is not None and record.is_file() else {}
    except (OSError, ValueError):
        return {}  # damaged: check every file again
    return seen if isinstance(seen, dict) else {}


def load_split(root: Path, split: str) -> tuple[np.ndarray | None, np.ndarray]:
    """(images or None for a .beton split, labels) of a split; images memory-mapped."""
    labels = np.load(root / f"{split}_labels.npy")
    images_file = root / f"{split}_images.npy"
    images = np.load(images_file, mmap_mode="r") if images_file.is_file() else None
    return images, labels


def find_all(directory: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """Every prepared dataset directly under ``directory`` (or ``directory`` itself), sorted by
    name; and what is wrong with those whose manifest cannot be read (one line each)."""
    candidates = [directory] + (sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else [])
    found, unreadable = [], []
    for path in candidates:
        if (path / MANIFEST).is_file():
            try:
                found.append((path, read_manifest(path)))
            except ValueError as e:  # half-written, edited, of another version: the others still count
                unreadable.append(str(e))
    return found, unreadable
