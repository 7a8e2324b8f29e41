"""Trial groups: trials that one worker can train together, on one stream of batches.

Two trials see the same batches when they share the dataset and its shape, N, the seed, the
batch size and the augmentation: the order, the crops and flips and MixUp are functions of
(seed, epoch, step). If they also share the model's shape, one worker can train them side by
side: one start-up, one copy of the data, one batch per step fed to every member. What may
differ between members (:data:`MEMBER_FIELDS`) changes neither the model's shape nor the batches:

- ``epochs``: a member ends at its own T and leaves the group;
- ``lr``, ``warmup_epochs``, ``schedule``, ``cooldown``, ``cooldown_shape``: each member follows
  its own learning-rate schedule (wsd members group within one T: see :mod:`mlpgrid.execution.trunks`);
- ``weight_decay``, ``momentum``: each member's own optimizer hyperparameters;
- ``label_smoothing``: each member's own loss;
- ``clip_grad``: each member's gradient norm is clipped on its own.

The optimizer itself is shared (one update rule for all members), and trials with dropout or
stochastic depth do not group: their masks would come from one random stream, so a member
would no longer be the trial it is alone. Everything else (the model, its architecture
options, the data, the stages after pre-training) is the group's.

A group's members are stepped either fused (:mod:`mlpgrid.training.fused`: weights stacked, one
batched matmul per layer for all members) or one after another on the same batch, each its
own model and optimizer as when it runs alone (see :func:`mlpgrid.policy.fuses`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mlpgrid import policy
from mlpgrid.grid.spec import FIELDS, Trial, TrialConfig

MEMBER_FIELDS = (
    "epochs",
    "lr",
    "warmup_epochs",
    "schedule",
    "weight_decay",
    "momentum",
    "label_smoothing",
    "clip_grad",
    "cooldown",
    "cooldown_shape",
)


def group_key(cfg: TrialConfig) -> tuple | None:
    """What a trial's group must share: every setting but :data:`MEMBER_FIELDS`; None for a
    trial that cannot share a worker with others."""
    if cfg.dropout > 0 or cfg.drop_path > 0:
        return None
    key = tuple((name, getattr(cfg, name)) for name in FIELDS if name not in MEMBER_FIELDS)
    # wsd trials of one T: a branch resumes at its cooldown start, and a group's members share a position.
    return key + (("epochs", cfg.epochs),) if cfg.schedule == "wsd" else key


@dataclass(frozen=True)
class Group:
    """Trials trained by one worker; a group of one is a trial run alone."""

    trials: tuple[Trial, ...]

    @property
    def id(self) -> str:
        """A single trial's own id; else a hash of the members' ids."""
        if len(self.trials) == 1:
            return self.trials[0].id
        return "g" + hashlib.sha256(",".join(sorted(t.id for t in self.trials)).encode()).hexdigest()[:11]

    @property
    def compute(self) -> float:
        return sum(t.compute for t in self.trials)


def form_groups(trials: Iterable[Trial], size: int | None, units: int = 1, device_type: str = "cpu",
                fuse: bool | None = None) -> list[Group]:  # fmt: skip
    """The trials in groups of at most ``size`` members (None: automatic; 1: none), for
    ``units`` parallel units of ``device_type``, members fused as ``fuse`` says.

    Automatic grouping takes :data:`mlpgrid.policy.MAX_MEMBERS` at most, within one T where
    :func:`mlpgrid.policy.groups_across_epochs` says so (trials long enough span T), and on a GPU keeps only groups that
    gain from it (:func:`mlpgrid.policy.group_pays_on_gpu`); the others' members run alone.

    Groups are balanced over ``units`` parallel units (GPUs, on which a group runs on at most
    one; else the trials at once): no group takes more than an even share of the trials' compute
    (unless a single trial does). A grid whose largest model and data make most of its compute
    would otherwise train that part on one unit while the others wait. Groups come in the order
    of their first trial; members by the compute they need, largest first.
    """
    trials = list(trials)
    automatic, size = size is None, policy.MAX_MEMBERS if size is None else size
    most = sum(t.compute for t in trials) / units
    buckets: dict[object, list[Trial]] = {}
    for trial in trials:
        key = group_key(trial.config) if size > 1 else None
        if key is not None and not policy.groups_across_epochs(trial.config, device_type, automatic):
            key += (("epochs", trial.config.epochs),)
        buckets.setdefault(key if key is not None else ("alone", trial.id), []).append(trial)
    groups = []
    for members in buckets.values():
        current: list[Trial] = []
        for trial in sorted(members, key=lambda t: -t.compute):
            if current and (len(current) == size or sum(t.compute for t in current) + trial.compute > most):
                groups.append(Group(tuple(current)))
                current = []
            current.append(trial)
        groups.append(Group(tuple(current)))
    if not (automatic and device_type == "cuda"):
        return groups
    paying: list[Group] = []
    for group in groups:  # each compiles its own stack, which a part of a bucket may not train enough for
        if len(group.trials) > 1 and not policy.group_pays_on_gpu([t.config for t in group.trials], fuse):
            paying.extend(Group((t,)) for t in group.trials)
        else:
            paying.append(group)
    return paying


def describe(groups: Sequence[Group]) -> str:
    """The plan line: how the trials were grouped."""
    trials = sum(len(g.trials) for g in groups)
    shared = [len(g.trials) for g in groups if len(g.trials) > 1]
    if not shared:
        return f"{trials} trials, each alone"
    sizes = f"{min(shared)}" if min(shared) == max(shared) else f"{min(shared)} to {max(shared)}"
    alone = len(groups) - len(shared)
    plural = "s" if len(shared) > 1 else ""
    workers = f"{len(groups)} worker" + ("s" if len(groups) > 1 else "")
    return (f"{trials} trials in {workers}: {len(shared)} group{plural} of {sizes} sharing a start-up "
            "and a batch stream" + (f", {alone} alone" if alone else ""))  # fmt: skip
