"""The rules for files mlpgrid writes for the user.

A proposal's grid file is a new file: it never replaces a file that exists (not the grid file it
was proposed from, not a prepared dataset, not a checkpoint, not an earlier output). It is
created only if nothing is at its path (an exclusive create, so two writers cannot both win), and
removed again if writing it fails (a full disk), so no half-written output is left behind.

A figure replaces the one of its name in its folder (an earlier ``frontier`` run's), and says so:
it is written beside it and moved into its place, so that a link planted there is replaced,
never written through (it could point anywhere), and no half-written figure is left.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


class OutputError(Exception):
    """An output that cannot be written, with the reason."""


def _exists(path: Path) -> str:
    return f"{path}: exists; an output never replaces a file (choose another name, or remove it first)"


def check_new(path: Path) -> None:
    """Raise :class:`OutputError` now if ``path`` could not be written as a new file later."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise OutputError(_exists(path))
    if not path.parent.is_dir():
        raise OutputError(f"{path}: no such directory {path.parent}")


def write_new(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, which must not exist yet; raises :class:`OutputError`."""
    path = Path(path)
    check_new(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise OutputError(_exists(path)) from None
    except OSError as e:
        raise OutputError(f"{path}: cannot create it: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write it: {e.strerror}") from None


def replace_file(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write`` into a new file beside it, then move that into its place."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        try:
            write(tmp)
            tmp.close()
            os.chmod(tmp.name, 0o644)
            os.replace(tmp.name, path)
        except BaseException:
            os.unlink(tmp.name)
            raise


def check_folder(path: Path) -> None:
    """Make the folder ``path`` (figures go there) now, or raise :class:`OutputError` saying why:
    before any work, not after a fit."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot make it a directory: {e.strerror}") from None
