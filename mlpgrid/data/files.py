"""Checks shared by the dataset layouts."""

from __future__ import annotations

from pathlib import Path


def require(root: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """``{name: path}`` of the files a layout needs in ``root``; FileNotFoundError naming the missing."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (expected {', '.join(names)})")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: missing {', '.join(missing)}")
    return {n: root / n for n in names}
