"""Run a grid's tasks on Ray: one Ray Tune trial per group of grid trials (often a trial alone).

Each Tune trial is a function that trains one group (:func:`mlpgrid.execution.runner.execute_group`)
on its share of a GPU (or CPU cores), in a Ray actor that Tune reuses from one group to the next.
A data-parallel trial's Tune trial instead fits a Ray Train ``TorchTrainer`` of its workers (one
process per GPU, DDP; :mod:`mlpgrid.training.parallel`) and relays the lead worker's events; so
does every group's with ``run.ray_train`` (one worker each).
Where groups run and how many at once is :mod:`mlpgrid.execution.placement`'s policy. The driver
loads each in-memory dataset once and hands it to every trial through Ray's object store.

This module imports only what a worker needs: Ray imports it to find the worker's function.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlpgrid import data, policy
from mlpgrid.execution.events import GroupEnded
from mlpgrid.execution.groups import describe
from mlpgrid.execution.placement import Placement, PlacementError, launch_order, parallel_units, place
from mlpgrid.execution.progress import Progress
from mlpgrid.execution.runner import GroupTask, TrialTask, execute_group, group_tasks
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.grid.spec import GridSpec, Trial
from mlpgrid.system import waits
from mlpgrid.training.parallel import Workers


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: a local Ray instance (or RAY_ADDRESS)
    max_concurrent: int | None = None  # None: as many as the resources allow
    gpus_per_trial: float | None = None  # fractions pack trials on one GPU, k > 1 is k workers; None: the grid's
    workers: int | None = None  # data-parallel workers per trial; None: the grid's, else the tails get several
    ray_train: bool | None = None  # every trial through Ray Train; None: the grid's, else the data-parallel ones
    cpus_per_trial: float = 1.0  # used when the cluster has no GPU
    retries: int = 2  # a failed trial restarts from its last checkpoint this many times
    wait_s: float = 600.0  # give up when no trial has run for this long (resources that do not come)


class ResourcesError(RuntimeError):
    """The grid stopped because Ray could place none of its trials for too long, or asks for
    more than the cluster has."""


class _Stall:
    """Watches a Tune experiment (as a callback) and stops it (as a stopper) once no trial has
    run for ``wait_s`` seconds: Tune itself waits forever for resources that never come, e.g.
    trials asking for more cores than any node has, or a node lost with the only GPU. It also
    stops it when ``asked`` says so (the run caught Ctrl-C or SIGTERM)."""

    def __init__(self, wait_s: float, asked: Callable[[], bool]) -> None:
        from ray import tune

        stall = self
        self.wait_s, self.running, self.since, self.stopped = wait_s, 0, time.monotonic(), False

        class Watch(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
                stall.change(+1)

            def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
                stall.change(-1)

            def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
                stall.change(-1)

            def on_trial_recover(self, iteration, trials, trial, **info):  # noqa: ANN001
                stall.change(-1)

        class Stop(tune.Stopper):
            def __call__(self, trial_id: str, result: dict) -> bool:
                return False

            def stop_all(self) -> bool:
                stall.stopped = stall.running == 0 and time.monotonic() - stall.since > stall.wait_s
                return stall.stopped or asked()

        self.callback, self.stopper = Watch(), Stop()

    def change(self, running: int) -> None:
        self.running = max(0, self.running + running)
        self.since = time.monotonic()


def _run_group(config: dict[str, Any], groups: dict[str, GroupTask], arrays: dict[tuple, Any],
               ray_train: dict[str, tuple[int, dict[str, float]]], train_storage: str) -> None:  # fmt: skip
    """The Tune trial: one group of grid trials (often of one), trained in this Ray actor on the
    share of a GPU (or the CPU cores) Tune placed it on.

    Tune reuses the actor for the next group that asks for the same resources, so a worker
    process imports torch and MLflow and sets up CUDA once, not once per group. (A one-worker
    Ray Train job in each Tune trial, as before, made a one-epoch trial's start-up 24 s on 2
    CPU cores, against 6.4 s now in a fresh worker.) ``arrays`` are
    the object-store references of the datasets the driver shares, by :func:`_dataset_key`.
    A group in ``ray_train`` (with its workers and each one's resources) trains through
    :func:`_fit_ray_train` instead, its Ray Train files under ``train_storage``.
    """
    import ray
    import torch
    from ray import tune

    group = groups[config["group_id"]]
    if group.id in ray_train:
        count, resources = ray_train[group.id]
        _fit_ray_train(group, count, resources, train_storage)
        return
    context = ray.get_runtime_context()
    granted = context.get_assigned_resources()
    launched_at = time.time()
    torch.set_num_threads(policy.torch_threads(granted.get("CPU", 1)))
    share = _hold_to_share(granted.get("GPU", 1.0))
    shared = arrays.get(_dataset_key(group.trials[0]))
    try:
        statuses = execute_group(
            group,
            listener=lambda event: tune.report(event.to_result()),
            tags={
                "data_from": "object store" if shared is not None else "loaded by the trial",
                "ray_trial_id": tune.get_context().get_trial_id(),
                "worker_pid": str(os.getpid()),
                "ray_node_id": context.get_node_id(),
                "torch_threads": str(torch.get_num_threads()),
                "gpu_share": f"{granted.get('GPU', 0):g}",
            },
            launched_at=launched_at,
            arrays=None if shared is None else ray.get(shared),
            gpu_share=share,
        )
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next group in this actor, or another worker on the GPU, gets it
    tune.report(GroupEnded(statuses).to_result())  # lets the live view tell finished from diverged


def _hold_to_share(share: float) -> float:
    """Cap this process's GPU memory at its ``share`` of the GPU less its CUDA context, so that it
    cannot take another trial's; returns the share of the GPU's memory it may allocate."""
    import torch

    if torch.cuda.is_available():
        share = policy.memory_cap(share, torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.set_per_process_memory_fraction(share)
    return share


def _ray_train_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: trains its group on the device Ray Train gave it (its shard of every
    batch in a data-parallel trial); the lead records the trials and sends its events to
    ``config["events"]``."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    workers = Workers(context.get_world_rank(), context.get_world_size())
    torch.set_num_threads(policy.torch_threads(config["resources"].get("CPU", 1)))
    share = _hold_to_share(config["resources"].get("GPU", 1.0))
    events = config["events"]
    statuses = execute_group(
        config["group"],
        listener=(lambda event: events.put(event.to_result())) if workers.lead else None,
        tags={
            "ray_trial_id": config["ray_trial_id"],
            "ray_train_run": context.get_experiment_name(),
            "worker_pid": str(os.getpid()),
            "ray_node_id": ray.get_runtime_context().get_node_id(),
            "torch_threads": str(torch.get_num_threads()),
        },
        device=ray.train.torch.get_device(),
        launched_at=config["launched_at"],
        gpu_share=share,
        workers=workers,
    )
    if workers.lead:
        events.put(GroupEnded(statuses).to_result())


def _fit_ray_train(group: GroupTask, count: int, resources: dict[str, float], storage: str) -> None:
    """The Tune trial of a group trained by Ray Train: a ``TorchTrainer`` of ``count`` workers of
    ``resources`` each (NCCL between GPUs, gloo between CPU processes), across nodes where one has
    too few; the lead's events reported to Tune as they come. A failed worker ends the fit (Ray
    Train restarts none): Tune's retry starts a new one, which resumes from the lead's checkpoint."""
    from queue import Empty

    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    events = Queue(actor_options={"num_cpus": 0})
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        _ray_train_worker,
        train_loop_config={
            "group": group,
            "events": events,
            "resources": resources,
            "ray_trial_id": trial_id,
            "launched_at": time.time(),
        },  # fmt: skip
        scaling_config=ScalingConfig(num_workers=count, use_gpu="GPU" in resources, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{group.id}-{trial_id}", storage_path=storage, failure_config=FailureConfig(max_failures=0)
        ),  # fmt: skip
    )
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised in the Tune trial below
            failure.append(e)

    fitting = threading.Thread(target=fit, daemon=True)
    fitting.start()
    while fitting.is_alive() or not events.empty():
        try:
            tune.report(events.get(timeout=0.5))
        except Empty:
            continue
    events.shutdown()
    if failure:
        raise failure[0]


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


def _total_gpu_memory() -> float:
    """The smallest GPU's memory on this node, in bytes, as nvidia-smi reports it."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return min(float(v) for v in out.stdout.split()) * 2**20


def gpu_memory(wait_s: float = 60.0) -> float | None:
    """The memory of a GPU of the cluster (read on a GPU node), for placing trials by the memory
    they need; None where it cannot be read in ``wait_s`` (then shares follow step sizes alone)."""
    import ray

    probe = ray.remote(num_cpus=0, num_gpus=0.001)(_total_gpu_memory)
    try:
        return ray.get(probe.remote(), timeout=wait_s)
    except Exception:  # noqa: BLE001 - no nvidia-smi, a busy cluster: place by step size
        return None


# Ray's session folder holds Unix sockets, whose paths may not exceed 107 bytes; the folder's own
# name and the socket's below it take 62 of them.
_RAY_FILES_MAX_CHARS = 107 - 62


def start_ray(address: str | None, storage: StorageLayout) -> dict[str, float]:
    """Connect to the Ray cluster at ``address`` (None: a local instance of its own, never
    another one running here) unless already connected; returns its resources. A local
    instance keeps its logs and sockets under ``storage`` (Ray's own ``/tmp/ray`` where that
    path would be too long for a socket's)."""
    import ray

    # Tune's own console reporter would print beside our progress view; verbose=0 silences
    # only the older reporter.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        # Workers of a `ray start` cluster do not inherit this environment: send along what
        # configures MLflow (credentials included, never printed) and mlpgrid.
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "MLPGRID_"))}
        # Ray's driver installs its own SIGTERM handler, which aborts the process: the run's own
        # (mlpgrid.execution.driver.StopSignals: stop, settle, say what was kept) is put back.
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        files = None  # Ray's /tmp/ray
        if address in (None, "local") and len(str(storage.ray_files)) <= _RAY_FILES_MAX_CHARS:
            storage.ray_files.mkdir(parents=True, exist_ok=True)
            files = str(storage.ray_files)
        try:
            if address not in (None, "auto", "local"):  # ray.init retries an address for minutes
                client = address.startswith("ray://")
                waits.wait_for(f"the Ray cluster at {address}", waits.listening(address, 10001 if client else 6379))
            ray.init(
                # Without an address Ray joins the cluster started last on this machine, if any
                # (/tmp/ray/ray_current_cluster); "local" starts the instance of this grid's own.
                address=address or "local",
                _temp_dir=files,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                runtime_env={"env_vars": forwarded},
            )
        except ConnectionError as e:  # no cluster at "auto", or one that went away
            raise ConnectionError(f"cannot connect to a Ray cluster at {address}: {e}") from None
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    return ray.cluster_resources()


def make_tuner(groups: list[GroupTask], grid: GridSpec, storage: StorageLayout, placement: Placement,
               retries: int, progress: Progress, stall: _Stall) -> Any:  # fmt: skip
    """The Ray Tune experiment of the groups: one Tune trial each, largest compute first."""
    from ray import tune

    # MLflow records every trial: Tune's own CSV, JSON and TensorBoard files would only fill storage
    # (and without them its result grid warns, for each trial, that it found none: it is not read).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    workers = placement.workers
    ray_train = {group_id: (n, workers[group_id]) for group_id, n in placement.ray_train.items()}
    # A Ray Train trial's Tune trial only waits on its trainer, whose workers Ray Train
    # places: it holds nothing (a byte of memory, as Tune needs some resource), else on a full
    # cluster it would hold what its own workers wait for.
    trainer_only: dict[str, float] = {"memory": 1}
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_group,
            groups={g.id: g for g in groups},
            arrays=_share_datasets(groups),
            ray_train=ray_train,
            train_storage=str(storage.ray),
        ),  # fmt: skip
        lambda config: tune.PlacementGroupFactory(
            [trainer_only if config["group_id"] in ray_train else workers[config["group_id"]]]
        ),
    )
    return tune.Tuner(
        trainable,
        param_space={"group_id": tune.grid_search([g.id for g in launch_order(groups)])},
        tune_config=tune.TuneConfig(max_concurrent_trials=placement.concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"{grid.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage.ray),
            failure_config=tune.FailureConfig(max_failures=retries),
            callbacks=[progress.tune_callback({g.id: g.trials for g in groups}), stall.callback],
            stop=stall.stopper,
            verbose=0,
        ),
    )


def run_on_ray(tasks: list[TrialTask], group_size: int | None, grid: GridSpec, storage: StorageLayout,
               opts: RayOptions, progress: Progress,
               stop_asked: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
    """Run the tasks as one Ray Tune experiment, in groups of at most ``group_size`` (see
    :func:`mlpgrid.execution.runner.group_tasks`; None: as many as can, 1: each alone), until
    done or ``stop_asked`` says to stop (the caller handles Ctrl-C: Tune's own handler, which
    would print Tune's way of resuming, is off)."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    resources = start_ray(opts.address, storage)
    units = parallel_units(resources, opts.cpus_per_trial, opts.max_concurrent)
    chosen = opts.gpus_per_trial if opts.gpus_per_trial is not None else grid.run.gpus_per_trial
    workers = opts.workers if opts.workers is not None else grid.run.workers
    if chosen is not None and chosen > 1:  # whole GPUs: as many data-parallel workers
        workers, chosen = round(chosen), None
    if workers is not None and workers > 1:
        group_size = 1  # a group shares one worker's batches
    groups = group_tasks(tasks, group_size, units, "cuda" if resources.get("GPU", 0) > 0 else "cpu")
    progress.note(describe(groups))
    gpu_bytes = gpu_memory() if resources.get("GPU", 0) > 0 else None
    try:
        placement = place(groups, resources, gpus_per_trial=chosen, cpus_per_trial=opts.cpus_per_trial,
                          max_concurrent=opts.max_concurrent, gpu_bytes=gpu_bytes, compile=grid.run.compile,
                          fuse=grid.run.fuse, workers=workers,
                          ray_train=opts.ray_train if opts.ray_train is not None else grid.run.ray_train)  # fmt: skip
    except PlacementError as e:
        raise ResourcesError(str(e)) from None
    for note in placement.notes:
        progress.note(note)
    stall = _Stall(opts.wait_s, stop_asked)
    make_tuner(groups, grid, storage, placement, opts.retries, progress, stall).fit()
    if stop_asked() and opts.address is None:
        import ray

        # Tune stops a trial at its next report (an epoch's end, minutes on a GPU); the local
        # instance's workers end now instead, each trial at its last checkpoint.
        ray.shutdown()
    if stall.stopped:
        import ray

        def shown(resources: dict[str, float]) -> str:
            return ", ".join(f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if resources.get(k))

        asks = sorted({shown(w) for w in placement.workers.values()})
        raise ResourcesError(
            f"gave up after {opts.wait_s:.0f} s with no trial running: Ray could not place trials asking for "
            f"{' or '.join(asks)} each (the cluster has {shown(ray.cluster_resources())}, "
            f"{shown(ray.available_resources()) or 'none'} free). Ask for less (--cpus-per-trial, "
            "--gpus-per-trial), add nodes, or wait longer (--wait-for-resources)."
        )
