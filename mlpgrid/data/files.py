"""File checks shared by the dataset layouts, prepared datasets and checkpoints, and the
files a user names (grid files, CSVs)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path


def regular_file(path: Path, most_bytes: int, what: str) -> None:
    """Raise ValueError unless ``path`` is a regular file of at most ``most_bytes``: reading a
    FIFO would wait forever for a writer, and a device (``/dev/zero``) never ends."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a directory" if stat.S_ISDIR(info.st_mode) else "a device"
        raise ValueError(f"{path}: {kind}, not a regular file: {what} must be one")
    if info.st_size > most_bytes:
        raise ValueError(f"{path}: {info.st_size:,} bytes, more than {most_bytes:,}: not {what}")


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


# Less free space than this on a disk that just failed a write: it is full. (numpy's writes to a
# full disk raise an OSError without its errno: "N requested and M written".)
_NEARLY_FULL_BYTES = 64 << 20


def disk_full(error: BaseException, path: Path) -> bool:
    """Whether ``error``, or an error it was raised from, is the disk holding ``path`` being full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or "No space left on device" in str(seen):
            return True  # the message also where a library wrapped the OSError in an error of its own
        if isinstance(seen, OSError) and seen.errno is None and _free_bytes(path) < _NEARLY_FULL_BYTES:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _free_bytes(path: Path) -> float:
    try:
        return shutil.disk_usage(path).free
    except OSError:  # the path went away: say nothing about its disk
        return float("inf")
