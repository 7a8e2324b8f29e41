"""Run a grid's trials, on Ray or one after another in this process.

On Ray, each grid trial is one Ray Tune trial: a function that builds and fits a Ray Train
``TorchTrainer`` with a single worker, which trains the trial on one GPU (or CPU cores). Train
metrics reach Tune through ``TuneReportCallback``. Either way a trial runs through
:func:`execute`, which opens the trial's MLflow run, trains (resuming from the trial's
checkpoint directory) and records how the trial ended.

Trials share GPUs: by default two (eight when small) trials run on each GPU at once, so the
start-up of one (worker processes, CUDA, data, compilation: half a minute) overlaps the
training of others, and small models, which cannot keep a GPU busy alone, fill it together.
A grid with too few trials to fill every GPU that way gets larger shares (see
:func:`gpu_shares`). The most expensive trials start first, so that the grid does not end
with one long trial on an otherwise idle cluster. The driver loads each in-memory dataset once
and hands it to every trial through Ray's object store.

Resuming a grid needs no Ray state: MLflow says which trials are done, and each trial's
checkpoint directory (under ``--storage``, which must be shared by all nodes of a cluster)
says where an unfinished one stands. Re-running a grid file therefore also picks up trials
added to it since.
"""

from __future__ import annotations

import collections
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlpgrid import data, models
from mlpgrid.checkpoint import CheckpointDir, exclusive
from mlpgrid.progress import Progress
from mlpgrid.spec import GridSpec, RunOptions, Trial
from mlpgrid.tracking import DIVERGED, DONE, FAILED, FINISHED, GridRun, TrialRun, trial_runs
from mlpgrid.train import TrialDiverged, default_data_budget, pick_device, run_trial

# A step of fewer hardware FLOPs than this (about 5 ms of an H100) leaves a GPU waiting for
# kernel launches, and idle through a trial's start-up: eight such trials share a GPU by
# default, larger ones two. On a grid of 32 such trials on an H100, eight to a GPU did 27% more
# training per second than four (two for its largest models) did (benchmarks/grid_scaling.py).
SMALL_STEP_FLOPS = 4e12


@dataclass(frozen=True)
class TrialTask:
    """Everything a worker needs to run one trial, as plain picklable data."""

    trial: Trial
    checkpoint_dir: str
    data_roots: dict[str, str]  # every dataset the trial reads
    options: RunOptions
    grid_run: GridRun


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local Ray instance (or RAY_ADDRESS)
    max_concurrent: int | None = None  # None: as many as the resources allow
    gpus_per_trial: float | None = None  # fractions pack trials on one GPU; None: the grid's, else by model size
    cpus_per_trial: float = 1.0  # used when the cluster has no GPU
    retries: int = 2  # a failed trial restarts from its last checkpoint this many times


def gpu_share(trial: Trial) -> float:
    """The share of a GPU ``trial`` runs on by default, by the size of its step."""
    step_flops = models.hardware_training_flops(trial.config.model_config(), trial.config.batch_size)
    return 0.125 if step_flops < SMALL_STEP_FLOPS else 0.5


def gpu_shares(trials: list[Trial], gpus: float, chosen: float | None = None) -> dict[str, float]:
    """Each trial's share of a GPU on a cluster of ``gpus`` GPUs: ``chosen`` if given.

    Otherwise :func:`gpu_share`, raised where the trials are too few to put one on every GPU:
    Ray places fractional shares on as few GPUs as it can, so eight quarter-GPU trials on eight
    GPUs would all run on two of them. With at least ``k`` trials per GPU no share is below
    ``1/k``, so the shares add up to every GPU.
    """
    if chosen is not None:
        return {t.id: chosen for t in trials}
    per_gpu = max(1, math.floor(len(trials) / gpus + 1e-9)) if gpus > 0 else 1
    return {t.id: max(gpu_share(t), 1 / per_gpu) for t in trials}


def launch_order(trials: list[Trial]) -> list[Trial]:
    """The trials, largest training compute first (grid order among equals).

    Started last, a long trial would keep one GPU busy after the rest of the grid is done.
    """
    return sorted(trials, key=lambda trial: -trial.compute)


def check_data(grid: GridSpec) -> None:
    """Fail before any trial starts when a dataset the grid uses cannot be found."""
    for name in sorted({ds for t in grid.trials for ds in t.config.datasets}):
        info = data.info(name)
        try:
            info.locate(grid.data_root(name))
        except (FileNotFoundError, ValueError) as e:
            where = f"Set data.{name} in {grid.path}" + (f" or {info.env_var}" if info.env_var else "")
            raise FileNotFoundError(f"dataset {name}: {e}. {where}.") from None


def checkpoint_dir(storage: Path, grid: GridSpec, trial: Trial) -> Path:
    return storage.resolve() / grid.name / trial.id / "checkpoints"


def pending_tasks(grid: GridSpec, storage: Path, grid_run: GridRun) -> list[TrialTask]:
    """Tasks for the trials MLflow does not show as done, in grid order."""
    runs = trial_runs(grid_run)
    done = {tid for tid, run in runs.items() if run.data.tags.get("status") in DONE}
    return [
        TrialTask(
            trial=t,
            checkpoint_dir=str(checkpoint_dir(storage, grid, t)),
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
    options = task.options
    chosen_budget = options.data_budget_gb
    budget = default_data_budget(device, gpu_share) if chosen_budget is None else chosen_budget * 2**30
    for name, root in task.data_roots.items():  # a worker process knows only what the task says
        data.register(name, root)
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

    try:
        with exclusive(Path(task.checkpoint_dir).parent):
            result = run_trial(
                task.trial.config,
                CheckpointDir(task.checkpoint_dir),
                data_roots=task.data_roots,
                checkpoint_every_steps=options.checkpoint_every_steps,
                data_budget_bytes=budget,
                compile=options.compile,
                arrays=arrays,
                on_epoch=on_epoch,
                on_resume=run.log_epochs,
                on_stages=run.log_stages,
                device=device,
            )
    except TrialDiverged as e:
        run.finish(DIVERGED, error=str(e))
        return DIVERGED
    except Exception:
        run.finish(FAILED, error=traceback.format_exc())
        raise
    run.client.log_artifact(run.run_id, result["first_layer"])
    if result["checkpoint_problems"]:
        run.client.set_tag(run.run_id, "checkpoint_problems", "\n".join(result["checkpoint_problems"])[-4000:])
    run.finish(FINISHED, checkpoint=task.checkpoint_dir)
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


# --- Ray --------------------------------------------------------------------------------


def _train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: one trial on the device Ray assigned."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    context = ray.get_runtime_context()
    granted = context.get_assigned_resources()
    # As many threads as cores granted: CPU results depend on the thread count, so a trial is
    # reproducible given its config and its --cpus-per-trial.
    torch.set_num_threads(max(1, int(granted.get("CPU", 1))))
    shared = config["arrays"]
    status = execute(
        config["task"],
        report=ray.train.report,
        tags={
            "data_from": "object store" if shared is not None else "loaded by the trial",
            "ray_trial_id": config["ray_trial_id"],
            "worker_pid": str(os.getpid()),
            "ray_node_id": context.get_node_id(),
            "torch_threads": str(torch.get_num_threads()),
        },
        device=ray.train.torch.get_device(),
        launched_at=config["launched_at"],
        arrays=None if shared is None else ray.get(shared),
        gpu_share=granted.get("GPU", 1.0),
    )
    ray.train.report({"status": status})  # lets the live view tell finished from diverged


def _tune_trial(config: dict[str, Any], tasks: dict[str, TrialTask], workers: dict[str, dict[str, float]],
                arrays: dict[tuple, Any], storage: str) -> None:  # fmt: skip
    """The Tune trial: builds and fits a one-worker TorchTrainer for one grid trial.

    ``workers`` holds each trial's worker resources, ``arrays`` the object-store references of
    the datasets the driver shares, by :func:`_dataset_key`.
    """
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    task = tasks[config["trial_id"]]
    resources = workers[task.trial.id]
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "task": task,
            "ray_trial_id": tune.get_context().get_trial_id(),
            "launched_at": time.time(),
            "arrays": arrays.get(_dataset_key(task.trial)),
        },
        scaling_config=ScalingConfig(num_workers=1, use_gpu="GPU" in resources, resources_per_worker=resources),
        # Retries happen at the Tune level (a new trainer resumes from the trial's checkpoint),
        # which also covers losing the node this function runs on.
        run_config=RunConfig(name=f"trial-{task.trial.id}", storage_path=storage, callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _slots(resources: dict[str, float], workers: list[dict[str, float]]) -> int:
    """How many workers fit at once: per resource they ask for, the cluster's total over the
    smallest request; the scarcest resource decides."""
    fits = [math.floor(resources.get(r, 0) / min(w[r] for w in workers) + 1e-9) for r in workers[0]]
    return max(1, min(fits))


def _dataset_key(trial: Trial) -> tuple[str, int | None, int | None]:
    cfg = trial.config
    return cfg.dataset, cfg.resolution, cfg.channels


def _share_datasets(tasks: list[TrialTask]) -> dict[tuple, Any]:
    """Load each in-memory pre-training dataset once and put it in Ray's object store.

    Workers on a node then read one shared copy instead of each loading (and resizing) the
    dataset again. Memory-mapped (prepared) datasets are left out: the page cache already
    shares them, and the store is no place for datasets larger than memory. So is a dataset
    that would take more than a quarter of the store.
    """
    import ray

    room = ray.available_resources().get("object_store_memory", 0) / 4
    shared = {}
    for task in tasks:
        key = _dataset_key(task.trial)
        if key in shared:
            continue
        name, resolution, channels = key
        info = data.info(name)
        side, depth = resolution or info.resolution, channels or info.channels
        if (info.train_size + info.test_size) * depth * side**2 > room:
            continue
        arrays = data.load(name, task.data_roots[name], resolution, channels)
        if arrays.beton is None and not isinstance(arrays.train_images, np.memmap):
            shared[key] = ray.put(arrays)
    return shared


def run_on_ray(tasks: list[TrialTask], grid: GridSpec, storage: Path, opts: RayOptions, progress: Progress) -> None:
    """Run the tasks as one Ray Tune experiment."""
    import ray
    from ray import tune

    # Health checks every 0.2 s instead of the default: each report otherwise waits ~1.7 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Tune's own console reporter would print beside our progress view; verbose=0 silences
    # only the older reporter.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        # Workers of a `ray start` cluster do not inherit this environment: send along what
        # configures MLflow (credentials included, never printed) and mlpgrid.
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "MLPGRID_", "RAY_TRAIN_"))}
        ray.init(
            address=opts.address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
            runtime_env={"env_vars": forwarded},
        )
    resources = ray.cluster_resources()
    kind = "GPU" if resources.get("GPU", 0) > 0 else "CPU"
    chosen = opts.gpus_per_trial if opts.gpus_per_trial is not None else grid.run.gpus_per_trial
    if kind == "GPU":
        shares = gpu_shares([t.trial for t in tasks], resources["GPU"], chosen)
        # And a core each: a trial's host thread launches its kernels, so trials beyond the
        # node's cores would only wait for each other (and take a few GB of RAM each).
        workers = {trial_id: {"GPU": share, "CPU": 1} for trial_id, share in shares.items()}
        if chosen is not None and len(tasks) * chosen < resources["GPU"]:
            progress.note(
                f"{len(tasks)} trials on {chosen:g} GPU each fill {math.ceil(len(tasks) * chosen - 1e-9)} of "
                f"{resources['GPU']:g} GPUs: Ray packs shares onto as few GPUs as it can"
            )
    else:
        workers = {t.trial.id: {"CPU": opts.cpus_per_trial} for t in tasks}
    # The Tune function only waits on its trainer: it takes no CPU, else on a CPU-only
    # cluster the Tune trials would hold every CPU and the Train workers could never start.
    trainable = tune.with_resources(
        tune.with_parameters(
            _tune_trial,
            tasks={t.trial.id: t for t in tasks},
            workers=workers,
            arrays=_share_datasets(tasks),
            storage=str(storage.resolve() / "ray"),
        ),
        {"cpu": 0, "memory": 1},
    )
    # Enough Tune trials at once to fill every slot; Ray starts each worker when its share is free.
    slots = _slots(resources, list(workers.values()))
    counts = collections.Counter(w[kind] for w in workers.values())
    concurrent = min(opts.max_concurrent or slots, slots, len(tasks))
    each = ", ".join(f"{n} on {share:.3g} {kind}" for share, n in sorted(counts.items()))
    progress.note(
        f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; up to {concurrent} trials at a "
        f"time ({each})"
    )
    by_id = {t.trial.id: t.trial for t in tasks}
    tuner = tune.Tuner(
        trainable,
        param_space={"trial_id": tune.grid_search([t.id for t in launch_order([t.trial for t in tasks])])},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage.resolve() / "ray"),
            failure_config=tune.FailureConfig(max_failures=opts.retries),
            callbacks=[progress.tune_callback(by_id)],
            verbose=0,
        ),
    )
    tuner.fit()
