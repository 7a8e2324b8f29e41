"""Locks between processes: a trial claimed by the one process that writes it, the tracking
store created by one driver at a time.

Each lock is an OS file lock (``flock``) on a file under storage, released when its process
dies however it dies, so a killed driver or worker never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def claim(path: str | Path, wait_s: float = 0.0) -> Iterator[str | None]:
    """Hold the lock file ``path`` (a trial's :attr:`~mlpgrid.grid.layout.TrialLayout.lock`) while a
    trial writes its directory and its MLflow run, so two attempts of one trial never overlap,
    whichever drivers they come from.

    Yields None while this process holds the lock; if another process holds it for longer
    than ``wait_s``, yields who holds it (``pid 123 on host``) and holds nothing. The lock is
    an OS file lock, released when its process dies however it dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_lock(path) as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    yield f.read().strip() or "another process"
                    return
                time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield None


def _open_lock(path: Path) -> TextIO:
    """The lock file, created if need be, never through a link: one planted at its place would
    have this process empty and write the file it points to, wherever that is."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(
                e.errno, f"{path} is a symbolic link; mlpgrid writes no lock through one: remove it"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file; remove it (mlpgrid makes its locks)")
    return os.fdopen(fd, "r+")


@contextmanager
def exclusive(path: str | Path, wait_s: float = 60.0) -> Iterator[None]:
    """:func:`claim` the lock file ``path``, waiting up to ``wait_s``; RuntimeError if another
    process holds it longer."""
    with claim(path, wait_s) as holder:
        if holder is not None:
            raise RuntimeError(f"{path}: held by another process ({holder})")
        yield


def holder(path: str | Path) -> str | None:
    """Who holds the lock file ``path`` now (``pid 123 on host``), or None if no process does;
    takes nothing and writes nothing."""
    path = Path(path)
    try:
        f = open(path)  # noqa: SIM115 - closed below, lock or not
    except FileNotFoundError:
        return None  # never claimed
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
