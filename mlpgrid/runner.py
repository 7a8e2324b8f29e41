"""Run a grid's trials: the tasks still to do, one trial with its MLflow run, and the trials
one after another in this process (:mod:`mlpgrid.ray_runner` runs them on Ray).

Either way a trial runs through :func:`execute`, which opens the trial's MLflow run, trains
(resuming from the trial's checkpoint directory) and records how the trial ended.

Resuming a grid needs no Ray state: MLflow says which trials are done, and each trial's
checkpoint directory (under ``--storage``, which must be shared by all nodes of a cluster)
says where an unfinished one stands. Re-running a grid file therefore also picks up trials
added to it since.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlpgrid import data
from mlpgrid.checkpoint import exclusive
from mlpgrid.hardware import default_data_budget, pick_device
from mlpgrid.layout import StorageLayout, TrialLayout
from mlpgrid.progress import Progress
from mlpgrid.spec import GridSpec, RunOptions, Trial
from mlpgrid.tracking import DIVERGED, DONE, FAILED, FINISHED, GridRun, TrialRun, trial_runs
from mlpgrid.train import Hooks, TrialDiverged, TrialOptions, run_trial


@dataclass(frozen=True)
class TrialTask:
    """Everything a worker needs to run one trial, as plain picklable data."""

    trial: Trial
    layout: TrialLayout
    data_roots: dict[str, str]  # every dataset the trial reads
    options: RunOptions
    grid_run: GridRun


def check_data(grid: GridSpec) -> None:
    """Fail before any trial starts when a dataset the grid uses cannot be found."""
    for name in sorted({ds for t in grid.trials for ds in t.config.datasets}):
        info = data.info(name)
        try:
            info.locate(grid.data_root(name))
        except (FileNotFoundError, ValueError) as e:
            where = f"Set data.{name} in {grid.path}" + (f" or {info.env_var}" if info.env_var else "")
            raise FileNotFoundError(f"dataset {name}: {e}. {where}.") from None


def pending_tasks(grid: GridSpec, storage: StorageLayout, grid_run: GridRun) -> list[TrialTask]:
    """Tasks for the trials MLflow does not show as done, in grid order."""
    runs = trial_runs(grid_run)
    done = {tid for tid, run in runs.items() if run.data.tags.get("status") in DONE}
    directory = storage.grid(grid.name)
    return [
        TrialTask(
            trial=t,
            layout=directory.trial(t.id),
            # Resolved here: on a cluster, workers do not see this process's environment.
            data_roots={ds: str(grid.data_root(ds)) for ds in t.config.datasets},
            options=grid.run,
            grid_run=grid_run,
        )
        for t in grid.trials
        if t.id not in done
    ]


def execute(
    task: TrialTask,
    *,
    report: Callable[[dict[str, Any]], None] | None = None,
    tags: dict[str, str] | None = None,
    device: Any = None,
    launched_at: float | None = None,
    arrays: data.ImageArrays | None = None,
    gpu_share: float = 1.0,
) -> str:
    """Run one trial with its MLflow run; returns finished or diverged, raises on failure.

    ``tags`` are set on the trial's run for this attempt (where it runs). ``launched_at`` (a
    ``time.time()``) is when the runner asked for the trial; the time from then to the first
    training step is logged as ``startup_seconds``. ``arrays`` are the pre-training data when
    the runner shares it; ``gpu_share`` is the part of the GPU the trial has (its default data
    budget scales with it).
    """
    launched_at = launched_at or time.time()
    device = device or pick_device()
    cfg, run_options = task.trial.config, task.options
    chosen_budget = run_options.data_budget_gb
    options = TrialOptions(
        checkpoint_every_steps=run_options.checkpoint_every_steps,
        data_budget_bytes=default_data_budget(device, gpu_share) if chosen_budget is None else chosen_budget * 2**30,
        compile=run_options.compile,
    )
    datasets = data.Datasets(task.data_roots)  # a worker process knows only what the task says
    if arrays is not None:
        datasets.keep(cfg.dataset, cfg.resolution, cfg.channels, arrays)
    run = TrialRun.open(task.grid_run, task.trial, tags)
    first = True

    def on_epoch(metrics: dict[str, Any]) -> None:
        nonlocal first
        if first:
            metrics = {**metrics, "startup_seconds": time.time() - metrics["epoch_seconds"] - launched_at}
            run.log_attempt(metrics)
            first = False
        run.log_epochs([metrics])
        if report:
            report(metrics)

    hooks = Hooks(resumed=run.log_epochs, epoch=on_epoch, stages=run.log_stages)
    try:
        with exclusive(task.layout.lock):
            result = run_trial(cfg, task.layout, options, datasets=datasets, hooks=hooks, device=device)
    except TrialDiverged as e:
        run.finish(DIVERGED, error=str(e))
        return DIVERGED
    except Exception:
        run.finish(FAILED, error=traceback.format_exc())
        raise
    run.log_file(result.first_layer)
    run.finish(FINISHED, checkpoint=str(task.layout.checkpoints), problems=result.checkpoint_problems)
    return FINISHED


def run_in_process(tasks: list[TrialTask], progress: Progress) -> None:
    """Run the tasks one after another in this process; a failed trial does not stop the rest."""
    for task in tasks:
        progress.start(task.trial)
        try:
            status = execute(task, report=lambda m, t=task.trial: progress.epoch(t, m))
        except Exception as e:  # noqa: BLE001 - recorded in MLflow; the grid goes on
            status = FAILED
            progress.note(f"{task.trial.id} failed: {type(e).__name__}: {e}")
        progress.end(task.trial, status)
