"""Where a grid's trials run on a Ray cluster: each trial's share of a GPU, the order they
start in, and how many run at once.

Trials share GPUs: by default two (eight when small and not compiled) trials run on each GPU at once, so the
start-up of one (worker processes, CUDA, data, compilation: half a minute) overlaps the
training of others, and small models, which cannot keep a GPU busy alone, fill it together.
A grid with too few trials to fill every GPU that way gets larger shares (see
:func:`gpu_shares`). The most expensive trials start first, so that the grid does not end
with one long trial on an otherwise idle cluster.
"""

from __future__ import annotations

import collections
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


def place(trials: Sequence[Group], resources: dict[str, float], *, gpus_per_trial: float | None = None,
          cpus_per_trial: float = 1.0, max_concurrent: int | None = None, gpu_bytes: float | None = None,
          compile: bool | None = None, fuse: bool | None = None) -> Placement:  # fmt: skip
    """The resources of each trial's worker on a cluster of ``resources`` (``ray.cluster_resources()``)
    whose GPUs have ``gpu_bytes`` of memory each (None: unknown, shares by step size alone), its
    trials compiled and fused as the grid's ``compile`` and ``fuse`` say."""
    kind = "GPU" if resources.get("GPU", 0) > 0 else "CPU"
    notes = []
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
        workers = {trial_id: {"GPU": share, "CPU": 1} for trial_id, share in shares.items()}
        if gpus_per_trial is not None and len(trials) * gpus_per_trial < resources["GPU"]:
            notes.append(
                f"{len(trials)} trials on {gpus_per_trial:g} GPU each fill "
                f"{math.ceil(len(trials) * gpus_per_trial - 1e-9)} of {resources['GPU']:g} GPUs: Ray packs shares "
                "onto as few GPUs as it can"
            )
    else:
        workers = {t.id: {"CPU": cpus_per_trial} for t in trials}
    # Enough Tune trials at once to fill every slot; Ray starts each worker when its share is free.
    slots = _slots(resources, list(workers.values()))
    concurrent = min(max_concurrent or slots, slots, len(trials))
    counts = collections.Counter(w[kind] for w in workers.values())
    each = ", ".join(f"{n} on {share:.3g} {kind}" for share, n in sorted(counts.items()))
    notes.append(
        f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; up to {concurrent} trials at a "
        f"time ({each})"
    )
    return Placement(workers, concurrent, notes)
