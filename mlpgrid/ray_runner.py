"""Run a grid's tasks on Ray: one Ray Tune trial per grid trial.

Each Tune trial is a function that builds and fits a Ray Train ``TorchTrainer`` with a single
worker, which runs the trial through :func:`mlpgrid.runner.execute` on its share of a GPU (or
CPU cores); Train metrics reach Tune through ``TuneReportCallback``. Where trials run and how
many at once is :mod:`mlpgrid.placement`'s policy. The driver loads each in-memory dataset
once and hands it to every trial through Ray's object store.

This module imports only what a worker needs: Ray imports it to find the worker's function.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlpgrid import data
from mlpgrid.groups import describe
from mlpgrid.layout import StorageLayout
from mlpgrid.placement import Placement, launch_order, place, workers_at_once
from mlpgrid.progress import Progress
from mlpgrid.runner import GroupTask, TrialTask, execute_group, group_tasks
from mlpgrid.spec import GridSpec, Trial


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local Ray instance (or RAY_ADDRESS)
    max_concurrent: int | None = None  # None: as many as the resources allow
    gpus_per_trial: float | None = None  # fractions pack trials on one GPU; None: the grid's, else by model size
    cpus_per_trial: float = 1.0  # used when the cluster has no GPU
    retries: int = 2  # a failed trial restarts from its last checkpoint this many times


def _train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: one group of trials (often of one) on the device Ray assigned."""
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
    statuses = execute_group(
        config["group"],
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
    ray.train.report({"statuses": statuses})  # lets the live view tell finished from diverged


def _tune_trial(config: dict[str, Any], groups: dict[str, GroupTask], workers: dict[str, dict[str, float]],
                arrays: dict[tuple, Any], storage: str) -> None:  # fmt: skip
    """The Tune trial: builds and fits a one-worker TorchTrainer for one group of grid trials.

    ``workers`` holds each trial's worker resources, ``arrays`` the object-store references of
    the datasets the driver shares, by :func:`_dataset_key`.
    """
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    group = groups[config["group_id"]]
    resources = workers[group.id]
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "group": group,
            "ray_trial_id": tune.get_context().get_trial_id(),
            "launched_at": time.time(),
            "arrays": arrays.get(_dataset_key(group.trials[0])),
        },
        scaling_config=ScalingConfig(num_workers=1, use_gpu="GPU" in resources, resources_per_worker=resources),
        # Retries happen at the Tune level (a new trainer resumes from the trial's checkpoint),
        # which also covers losing the node this function runs on.
        run_config=RunConfig(name=f"trial-{group.id}", storage_path=storage, callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _dataset_key(trial: Trial) -> tuple[str, int | None, int | None]:
    cfg = trial.config
    return cfg.dataset, cfg.resolution, cfg.channels


def _share_datasets(groups: list[GroupTask]) -> dict[tuple, Any]:
    """Load each in-memory pre-training dataset once and put it in Ray's object store.

    Workers on a node then read one shared copy instead of each loading (and resizing) the
    dataset again. Memory-mapped (prepared) datasets are left out: the page cache already
    shares them, and the store is no place for datasets larger than memory. So is a dataset
    that would take more than a quarter of the store.
    """
    import ray

    room = ray.available_resources().get("object_store_memory", 0) / 4
    shared = {}
    for task in (group.members[0] for group in groups):
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


def start_ray(address: str | None) -> dict[str, float]:
    """Connect to the Ray cluster at ``address`` (None: a local instance) unless already
    connected; returns its resources."""
    import ray

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
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
            runtime_env={"env_vars": forwarded},
        )
    return ray.cluster_resources()


def make_tuner(groups: list[GroupTask], grid: GridSpec, storage: StorageLayout, placement: Placement,
               retries: int, progress: Progress) -> Any:  # fmt: skip
    """The Ray Tune experiment of the groups: one Tune trial each, largest compute first."""
    from ray import tune

    # The Tune function only waits on its trainer: it takes no CPU, else on a CPU-only
    # cluster the Tune trials would hold every CPU and the Train workers could never start.
    trainable = tune.with_resources(
        tune.with_parameters(
            _tune_trial,
            groups={g.id: g for g in groups},
            workers=placement.workers,
            arrays=_share_datasets(groups),
            storage=str(storage.ray),
        ),
        {"cpu": 0, "memory": 1},
    )
    return tune.Tuner(
        trainable,
        param_space={"group_id": tune.grid_search([g.id for g in launch_order(groups)])},
        tune_config=tune.TuneConfig(max_concurrent_trials=placement.concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage.ray),
            failure_config=tune.FailureConfig(max_failures=retries),
            callbacks=[progress.tune_callback({g.id: g.trials for g in groups})],
            verbose=0,
        ),
    )


def run_on_ray(tasks: list[TrialTask], group_size: int | None, grid: GridSpec, storage: StorageLayout,
               opts: RayOptions, progress: Progress) -> None:  # fmt: skip
    """Run the tasks as one Ray Tune experiment, in groups of at most ``group_size`` (see
    :func:`mlpgrid.runner.group_tasks`; None: as many as can, 1: each alone)."""
    resources = start_ray(opts.address)
    workers = workers_at_once(resources, opts.cpus_per_trial, opts.max_concurrent)
    groups = group_tasks(tasks, group_size, workers)
    progress.note(describe(groups))
    chosen = opts.gpus_per_trial if opts.gpus_per_trial is not None else grid.run.gpus_per_trial
    placement = place(groups, resources, gpus_per_trial=chosen, cpus_per_trial=opts.cpus_per_trial,
                      max_concurrent=opts.max_concurrent)  # fmt: skip
    for note in placement.notes:
        progress.note(note)
    make_tuner(groups, grid, storage, placement, opts.retries, progress).fit()
