"""File checks shared by the dataset layouts, prepared datasets and checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    """The file's SHA-256, hex, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def require(root: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """``{name: path}`` of the files a layout needs in ``root``; FileNotFoundError naming the missing."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (expected {', '.join(names)})")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)}")
    return {n: root / n for n in names}
