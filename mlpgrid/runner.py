"""Run a grid's trials and keep their outcomes under a storage directory.

Layout: ``<storage>/<grid name>/<trial id>/`` holds ``checkpoints/`` and, once the trial has
ended, ``result.json``. A trial with a ``result.json`` saying finished or diverged is never
run again (a diverged trial is deterministic and would diverge again); a failed one is
retried on the next run; one without a result resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlpgrid import data
from mlpgrid.checkpoint import CheckpointDir
from mlpgrid.spec import GridSpec, Trial
from mlpgrid.train import TrialDiverged, run_trial

DONE = ("finished", "diverged")


def trial_dir(storage: Path, grid: GridSpec, trial: Trial) -> Path:
    return storage / grid.name / trial.id


def read_result(storage: Path, grid: GridSpec, trial: Trial) -> dict[str, Any] | None:
    path = trial_dir(storage, grid, trial) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_data(grid: GridSpec) -> None:
    """Fail before any trial starts when a dataset the grid uses cannot be found."""
    for name in sorted({t.config.dataset for t in grid.trials}):
        info = data.info(name)
        root = info.root(grid.data_roots.get(name))
        try:
            info.locate(root)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"dataset {name}: {e}. Set data.{name} in {grid.path} or {info.env_var}.") from None


def describe(trial: Trial) -> dict[str, Any]:
    """The trial's identity and size, as recorded next to its result."""
    cfg = trial.config
    return {
        "trial_id": trial.id,
        "model": cfg.model,
        "params": trial.params,
        "examples": cfg.num_examples,
        "epochs": cfg.epochs,
        "forward_flops": trial.forward_flops,
        "compute": trial.compute,
        "config": dataclasses.asdict(cfg),
    }


def run_one(
    grid: GridSpec, trial: Trial, storage: Path, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run (or resume) one trial in this process and record how it ended."""
    directory = trial_dir(storage, grid, trial)
    try:
        outcome = run_trial(
            trial.config,
            CheckpointDir(directory / "checkpoints"),
            data_root=grid.data_roots.get(trial.config.dataset),
            checkpoint_every_steps=grid.run.checkpoint_every_steps,
            on_epoch=on_epoch,
        )
    except TrialDiverged as e:
        outcome = {"status": "diverged", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - one broken trial must not sink the grid
        outcome = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result = {**describe(trial), **outcome}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, directory / "result.json")
    return result


def run_in_process(
    grid: GridSpec,
    storage: Path,
    on_start: Callable[[int, Trial], None] | None = None,
    on_epoch: Callable[[Trial, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every trial not yet done, one after another; returns every trial's result."""
    check_data(grid)
    results = []
    for i, trial in enumerate(grid.trials):
        previous = read_result(storage, grid, trial)
        if previous and previous["status"] in DONE:
            results.append(previous)
            continue
        if on_start:
            on_start(i, trial)
        results.append(run_one(grid, trial, storage, None if on_epoch is None else lambda m, t=trial: on_epoch(t, m)))
    return results
