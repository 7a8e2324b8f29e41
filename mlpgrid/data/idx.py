"""Reader for the idx format of MNIST and Fashion-MNIST (plain or gzipped)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an idx file; ``.gz`` files are decompressed on the fly."""
    raw = _read(path)
    ndim = _dimensions(raw, path)
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"{path}: idx header promises {expected} bytes for shape {shape}, file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def idx_length(path: Path) -> int:
    """How many items an idx file holds (its first dimension), from its header alone."""
    head = _read(path, 8)
    if _dimensions(head, path) < 1 or len(head) < 8:
        raise ValueError(f"{path}: an idx file of no items")
    return int.from_bytes(head[4:8], "big")


def _read(path: Path, size: int = -1) -> bytes:
    """The first ``size`` bytes of an idx file (all with -1), decompressed if it is ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(size)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read idx file ({e})") from e


def _dimensions(head: bytes, path: Path) -> int:
    """The number of dimensions an idx file's magic number gives; ValueError if it has none."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != _UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte idx file (bad magic number)")
    return head[3]


def find_idx(root: Path, stem: str) -> Path:
    """``root/stem`` or ``root/stem.gz``, whichever exists."""
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: missing {stem} (or {stem}.gz)")
