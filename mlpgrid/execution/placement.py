"""Where a grid's trials run on a Ray cluster: each trial's share of a GPU, the order they
start in, and how many run at once.

Trials share GPUs: by default two (eight when small and not compiled) trials run on each GPU at once, so the
start-up of one (worker processes, CUDA, data, compilation: half a minute) overlaps the
training of others, and small models, which cannot keep a GPU busy alone, fill it together.
A grid with too few trials to fill every GPU that way gets larger shares (see
:func:`gpu_shares`). The most expensive trials start first, so that the grid does not end
with one long trial on an otherwise idle cluster; a trial that would still be that tail trains
on several GPUs at once (data-parallel workers, :mod:`mlpgrid.training.parallel`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from mlpgrid import policy
from mlpgrid.execution.groups import Group

GroupT = TypeVar("GroupT", bound=Group)


def parallel_units(resources: dict[str, float], cpus_per_trial: float, max_concurrent: int | None) -> int:
    """What a grid's groups are balanced over: its GPUs (a group runs on one at most, whatever
    its members), or without GPUs the trials that can run at once, one per ``cpus_per_trial``
    cores."""
    units = resources.get("GPU", 0) or resources.get("CPU", 1) / cpus_per_trial
    return max(1, min(math.floor(units + 1e-9), max_concurrent or math.floor(units + 1e-9)))


def group_memory(group: Group) -> float:
    """Bytes the group's worker holds on its GPU for training (all members), by the estimate."""
    return sum(policy.training_memory(t.config) for t in group.trials)


def gpu_shares(trials: Sequence[Group], gpus: float, chosen: float | None = None,
               gpu_bytes: float | None = None, compile: bool | None = None,
               fuse: bool | None = None) -> dict[str, float]:  # fmt: skip
    """Each trial's share of a GPU on a cluster of ``gpus`` GPUs of ``gpu_bytes`` each: ``chosen``
    if given.

    Otherwise :func:`mlpgrid.policy.gpu_share` of its members' steps, compiled or not as
    ``compile`` and ``fuse`` (the grid's ``run`` settings) make them, at least the share its
    memory needs (:func:`mlpgrid.policy.memory_share`: Ray admits a trial to a GPU only while its
    share is free, so shares that cover memory keep trials from taking each other's), raised
    where the trials are too few to put one on every GPU:
    Ray places fractional shares on as few GPUs as it can, so eight quarter-GPU trials on eight
    GPUs would all run on two of them. With at least ``k`` trials per GPU no share is below
    ``1/k``, so the shares add up to every GPU.
    """
    if chosen is not None:
        return {t.id: chosen for t in trials}
    per_gpu = max(1, math.floor(len(trials) / gpus + 1e-9)) if gpus > 0 else 1
    shares = {}
    for t in trials:
        cfgs = [m.config for m in t.trials]
        fused = len(cfgs) > 1 and policy.fuses(cfgs[0], "cuda", fuse)
        share = policy.gpu_share([m.step_flops for m in t.trials], policy.compiles_worker(cfgs, fused, compile))
        if gpu_bytes:
            share = max(share, policy.memory_share(group_memory(t), gpu_bytes))
        shares[t.id] = max(share, 1 / per_gpu)
    return shares


def launch_order(trials: Sequence[GroupT]) -> list[GroupT]:
    """The trials, largest training compute first (grid order among equals).

    Started last, a long trial would keep one GPU busy after the rest of the grid is done.
    """
    return sorted(trials, key=lambda trial: -trial.compute)


def _slots(resources: dict[str, float], workers: list[dict[str, float]]) -> int:
    """How many workers fit at once: per resource they ask for, the cluster's total over the
    smallest request; the scarcest resource decides."""
    fits = [math.floor(resources.get(r, 0) / min(w[r] for w in workers) + 1e-9) for r in workers[0]]
    return max(1, min(fits))


@dataclass(frozen=True)
class Placement:
    workers: dict[str, dict[str, float]]  # each trial's worker resources, by trial id
    concurrent: int  # trials at once
    notes: list[str]  # what the user should know about it
    # The trials trained by a Ray Train TorchTrainer, and its workers: those of several workers, or
    # every trial where asked (run.ray_train).
    ray_train: dict[str, int] = dataclasses.field(default_factory=dict)


class PlacementError(ValueError):
    """The trials ask for more than the cluster has; the message says what to change."""


def data_parallel(trials: Sequence[Group], resources: dict[str, float], chosen: int | None) -> dict[str, int]:
    """The trials (groups of one) that train on several workers, and on how many: ``chosen``
    for each if given, else on a GPU cluster those :func:`mlpgrid.policy.data_parallel_workers`
    makes its tail. A group of several trials shares one worker's batches: it stays on one."""
    alone = [t for t in trials if len(t.trials) == 1]
    if chosen is not None:
        return {t.id: chosen for t in alone} if chosen > 1 else {}
    gpus = resources.get("GPU", 0)
    total = sum(t.compute for t in trials)
    counts = {t.id: policy.data_parallel_workers(t.compute, total, gpus) for t in alone}
    return {trial_id: n for trial_id, n in counts.items() if n > 1}


def place(trials: Sequence[Group], resources: dict[str, float], *, gpus_per_trial: float | None = None,
          cpus_per_trial: float = 1.0, max_concurrent: int | None = None, gpu_bytes: float | None = None,
          compile: bool | None = None, fuse: bool | None = None, workers: int | None = None,
          ray_train: bool | None = None) -> Placement:  # fmt: skip
    """The resources of each trial's worker on a cluster of ``resources`` (``ray.cluster_resources()``)
    whose GPUs have ``gpu_bytes`` of memory each (None: unknown, shares by step size alone), its
    trials compiled and fused as the grid's ``compile`` and ``fuse`` say; ``workers`` per trial
    (None: :func:`data_parallel`'s choice; a worker of several takes a whole GPU, or
    ``cpus_per_trial`` cores without GPUs); ``ray_train``: every trial through Ray Train (None:
    those of several workers). Raises :class:`PlacementError` for more workers than the cluster
    can hold at once."""
    kind = "GPU" if resources.get("GPU", 0) > 0 else "CPU"
    notes = []
    parallel = data_parallel(trials, resources, workers)
    each_worker = {"GPU": 1.0, "CPU": 1.0} if kind == "GPU" else {"CPU": cpus_per_trial}
    room = min(math.floor(resources.get(r, 0) / need + 1e-9) for r, need in each_worker.items())
    if parallel and max(parallel.values()) > room:
        raise PlacementError(
            f"a trial on {max(parallel.values())} data-parallel workers needs "
            + " and ".join(f"{n * max(parallel.values()):g} {r}" for r, n in each_worker.items())
            + f"; the cluster has {', '.join(f'{resources.get(r, 0):g} {r}' for r in each_worker)}. "
            "Ask for fewer workers (--workers, run.workers) or add nodes."
        )
    if kind == "GPU":
        shares = gpu_shares(trials, resources["GPU"], gpus_per_trial, gpu_bytes, compile, fuse)
        if gpus_per_trial is not None and gpu_bytes:
            short = [t for t in trials if policy.memory_share(group_memory(t), gpu_bytes) > gpus_per_trial]
            if short:
                notes.append(
                    f"{len(short)} trials need more than {gpus_per_trial:g} of a GPU's memory to train: they "
                    "stream their images and, where that is not enough, run out of memory"
                )
        # And a core each: a trial's host thread launches its kernels, so trials beyond the
        # node's cores would only wait for each other (and take a few GB of RAM each).
        resources_of = {trial_id: {"GPU": share, "CPU": 1} for trial_id, share in shares.items()}
        if gpus_per_trial is not None and len(trials) * gpus_per_trial < resources["GPU"]:
            notes.append(
                f"{len(trials)} trials on {gpus_per_trial:g} GPU each fill "
                f"{math.ceil(len(trials) * gpus_per_trial - 1e-9)} of {resources['GPU']:g} GPUs: Ray packs shares "
                "onto as few GPUs as it can"
            )
    else:
        resources_of = {t.id: {"CPU": cpus_per_trial} for t in trials}
    for trial_id, n in parallel.items():
        resources_of[trial_id] = dict(each_worker)
        notes.append(f"{trial_id} trains on {n} data-parallel workers (Ray Train), each on " +
                     " and ".join(f"{v:g} {r}" for r, v in each_worker.items()))  # fmt: skip
    # Enough Tune trials at once to fill every slot; Ray starts each worker when its share is free.
    slots = _slots(resources, list(resources_of.values()))
    concurrent = min(max_concurrent or slots, slots, len(trials))
    counts = collections.Counter(w[kind] for w in resources_of.values())
    each = ", ".join(f"{n} on {share:.3g} {kind}" for share, n in sorted(counts.items()))
    notes.append(
        f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; up to {concurrent} trials at a "
        f"time ({each})"
    )
    trained = {t.id: parallel.get(t.id, 1) for t in trials} if ray_train else parallel
    return Placement(resources_of, concurrent, notes, trained)
