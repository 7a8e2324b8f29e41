"""Every path mlpgrid writes under its storage directory, in one place.

::

    <storage>/
      mlflow.db                 the default MLflow store (SQLite)
      mlflow.lock               held by the driver creating or opening a grid in a local store
      mlartifacts/              its artifacts
      ray/                      Ray Tune's own files
      ray-session/              a local Ray instance's logs and sockets
      data-checks/              what the last check of each prepared dataset found
      torch-compile/            torch.compile's cache, shared by the trials of a shape (on every node)
      <grid>/<trial id>/
        lock                    held by the one process writing this trial
        checkpoints/            see mlpgrid.training.checkpoint
        stages/                 results of the stages after pre-training, feature caches, pictures

A :class:`StorageLayout` is made once from ``--storage``; it hands out a :class:`GridLayout`
per grid and a :class:`TrialLayout` per trial. They are frozen plain data, so a trial's layout
travels to its worker as it is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrialLayout:
    """One trial's directory."""

    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def stages(self) -> Path:
        return self.root / "stages"


@dataclass(frozen=True)
class GridLayout:
    """One grid's directory: a directory per trial."""

    root: Path

    def trial(self, trial_id: str) -> TrialLayout:
        return TrialLayout(self.root / trial_id)


@dataclass(frozen=True)
class StorageLayout:
    """The storage directory (``--storage``), as an absolute path: workers on other nodes and
    Ray's own processes do not share this process's working directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def tracking_lock(self) -> Path:
        return self.root / "mlflow.lock"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def ray_files(self) -> Path:
        """A local Ray instance's own files: its logs (a failed worker's among them) and sockets."""
        return self.root / "ray-session"

    @property
    def compile_cache(self) -> Path:
        return self.root / "torch-compile"

    def data_check(self, dataset: Path) -> Path:
        """What the last check of the prepared dataset at ``dataset`` found its files to be."""
        name = hashlib.sha256(str(Path(dataset).resolve()).encode()).hexdigest()[:16]
        return self.root / "data-checks" / f"{name}.json"

    def grid(self, name: str) -> GridLayout:
        return GridLayout(self.root / name)
