"""A directory of training checkpoints, written atomically, newest last.

Files are named ``epoch-EEEE-step-SSSSSS.pt`` after the position training continues from,
so the latest is found by name alone. A checkpoint is written to a temporary file and
renamed, so a process killed while saving never leaves a half-written checkpoint behind, and
its SHA-256 is kept beside it (``.sha256``), so one damaged later (a truncated copy, a bad
disk) is recognised: the newest checkpoint that checks out is used, and the ones passed over
are reported. :class:`BackgroundSaver` writes them on a thread, so training does not wait for
the disk.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from mlpgrid import policy
from mlpgrid.data.files import sha256

_NAME = re.compile(r"^epoch-(\d{4})-step-(\d{6})\.pt$")


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A dict of tensors and plain values that mlpgrid wrote with ``torch.save``; ValueError
    saying what is wrong with it.

    Every such file mlpgrid reads back (checkpoints, the probe's feature caches) comes through
    here: ``weights_only=True`` builds tensors and containers only and never runs code from
    the file, and passing it explicitly also holds when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    is set (that variable only changes calls that leave it out).
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a damaged one
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a file mlpgrid wrote (holds a {type(state).__name__})")
    return state


class CheckpointError(OSError):
    """A checkpoint could not be written."""


_NEARLY_FULL = 1 << 20  # bytes free on a disk that just refused a write


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return _NEARLY_FULL


class CheckpointDir:
    def __init__(self, path: str | Path, keep: int = 2):
        self.path = Path(path)
        self.keep = keep
        self.problems: list[str] = []  # checkpoints :meth:`latest` passed over, and why

    def positions(self) -> list[tuple[int, int]]:
        """(epoch, step) of every checkpoint present, oldest first."""
        if not self.path.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.path.iterdir())
        return sorted((int(m[1]), int(m[2])) for m in found if m)

    def file(self, epoch: int, step: int) -> Path:
        return self.path / f"epoch-{epoch:04d}-step-{step:06d}.pt"

    def save(self, state: dict[str, Any], epoch: int, step: int) -> Path:
        """Write a checkpoint; :class:`CheckpointError` (the older ones left intact) if the disk refuses."""
        target = self.file(epoch, step)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._write(state, target)
        except (OSError, RuntimeError) as e:
            # torch.save reports a full disk only as "unexpected pos": ask the disk itself.
            full = getattr(e, "errno", None) == errno.ENOSPC or _free_bytes(self.path) < _NEARLY_FULL
            reason = "no space left on the device" if full else str(e)
            raise CheckpointError(f"{target}: could not write the checkpoint: {reason}. Earlier checkpoints in "
                                  f"{self.path} are intact.") from e  # fmt: skip
        self._keep_newest(self.keep)
        return target

    def keep_final(self) -> None:
        """What a finished trial keeps: its newest checkpoint, its final weights (written without
        optimizer state: they serve stages added later and trials that start from its
        pre-training). Every other checkpoint is removed."""
        self._keep_newest(1)

    def _write(self, state: dict[str, Any], target: Path) -> None:
        """``state`` into ``target``, its SHA-256 beside it, in an order that leaves ``target``
        whole and loadable wherever a kill lands (a file without its checksum loads unchecked):
        both written aside, the old checksum removed, the file replaced, its checksum put in
        place. A failed write leaves nothing aside."""
        tmp, checksum, checksum_tmp = (target.with_suffix(suffix) for suffix in (".tmp", ".sha256", ".sha256tmp"))
        try:
            torch.save(state, tmp)
            checksum_tmp.write_text(sha256(tmp))
            checksum.unlink(missing_ok=True)
            os.replace(tmp, target)
            os.replace(checksum_tmp, checksum)
        finally:
            tmp.unlink(missing_ok=True)
            checksum_tmp.unlink(missing_ok=True)

    def _keep_newest(self, count: int) -> None:
        for old in self.positions()[:-count]:
            self.file(*old).unlink(missing_ok=True)
            self.file(*old).with_suffix(".sha256").unlink(missing_ok=True)

    def adopt(self, source: CheckpointDir) -> tuple[int, int]:
        """Start from ``source``'s newest checkpoint (another trial's finished pre-training): it
        and its checksum are linked in (copied where links cannot be), each arriving whole
        under its own name. Returns its (epoch, step)."""
        epoch, step = source.positions()[-1]
        self.path.mkdir(parents=True, exist_ok=True)
        for suffix in (".sha256", ".pt"):  # the checkpoint last: present means complete
            origin, target = source.file(epoch, step).with_suffix(suffix), self.file(epoch, step).with_suffix(suffix)
            tmp = target.with_suffix(suffix + "tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(origin, tmp)  # the files are never written again, only removed: a link is safe
            except OSError:
                shutil.copyfile(origin, tmp)
            os.replace(tmp, target)
        return epoch, step

    def _load(self, epoch: int, step: int) -> dict[str, Any]:
        """One checkpoint's state; ValueError saying what is wrong with it."""
        path = self.file(epoch, step)
        checksum = path.with_suffix(".sha256")
        if checksum.exists() and sha256(path) != checksum.read_text().strip():
            raise ValueError(f"{path}: damaged (its SHA-256 does not match {checksum.name})")
        return load_tensors(path)

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that checks out, or None when there is none.

        Damaged ones are skipped and listed in :attr:`problems`.
        """
        self.problems = []
        for position in reversed(self.positions()):
            try:
                return self._load(*position)
            except ValueError as e:
                self.problems.append(str(e))
        return None


def _host_copy(value: Any) -> Any:
    """``value`` with every tensor copied to host memory and every container rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return value


class CheckpointWriter(Protocol):
    """What :class:`BackgroundSaver` writes through: a :class:`CheckpointDir`, or several at once."""

    def save(self, state: Any, epoch: int, step: int) -> Any: ...


class BackgroundSaver:
    """Saves to a :class:`CheckpointDir` on a thread while training goes on.

    ``save`` copies the state to host memory at once (training keeps changing the tensors) and
    writes the copy in the background. A checkpoint that is not ``required`` (a trial's last and
    those a grid asks for every K steps are) is skipped rather than waited for while the
    previous one is still being written, and until training since the previous copy has taken
    that copy's time over :data:`mlpgrid.policy.CHECKPOINT_COPY_SHARE`: checkpoints come as
    often as the disk allows and the copies cost at most that share of training. Every checkpoint is a valid place to
    resume from, so which ones exist does not change results. ``wait`` blocks until the write
    in flight is done and raises its error.
    """

    def __init__(self, checkpoints: CheckpointWriter):
        self.checkpoints = checkpoints
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._next_optional = 0.0  # time.monotonic() before which a checkpoint not required is skipped

    def skips(self, required: bool) -> bool:
        """Whether a checkpoint now would be skipped: not ``required``, and a write still in
        flight or the previous copy too recent."""
        busy = self._thread is not None and self._thread.is_alive()
        return not required and (busy or time.monotonic() < self._next_optional)

    def save(self, state: Any, epoch: int, step: int, *, required: bool = False) -> bool:
        """Start writing ``state``; False when skipped (see :meth:`skips`)."""
        if self.skips(required):
            return False
        self.wait()
        copying = time.monotonic()
        snapshot = _host_copy(state)
        copied = time.monotonic()
        self._next_optional = copied + (copied - copying) / policy.CHECKPOINT_COPY_SHARE
        self._thread = threading.Thread(target=self._write, args=(snapshot, epoch, step), daemon=True)
        self._thread.start()
        return True

    def _write(self, state: Any, epoch: int, step: int) -> None:
        try:
            self.checkpoints.save(state, epoch, step)
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# A point a fault test chooses: with MLPGRID_HOLD_AT="E:S" a trial (or group) stops once its
# checkpoint at epoch E, step S (one of ``checkpoint_every_steps``') is on disk, writes ``held``
# into its directory and waits there, to be killed or, once the test removes ``held``, to go on:
# so that the test acts at that point (a kill, a server stopped) and not wherever a timer lands.
HOLD_AT = "MLPGRID_HOLD_AT"
HOLD_S = 600  # then it gives up waiting and fails


def hold_if_asked(saver: BackgroundSaver, epoch: int, step: int, trial_dirs: list[Path]) -> None:
    """Hold here if a fault test asked to (:data:`HOLD_AT`), once this step's checkpoint is on disk."""
    if os.environ.get(HOLD_AT) != f"{epoch}:{step}":
        return
    saver.wait()
    held = [directory / "held" for directory in trial_dirs]
    for path in held:
        path.write_text(f"pid {os.getpid()}")
    deadline = time.monotonic() + HOLD_S
    while all(path.exists() for path in held):
        if time.monotonic() > deadline:
            raise RuntimeError(f"held at epoch {epoch}, step {step} for {HOLD_S} s ({HOLD_AT}) and not let go")
        time.sleep(0.05)
