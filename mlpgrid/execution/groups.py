"""Trial groups: trials that one worker can train together, on one stream of batches.

Two trials see the same batches when they share the dataset and its shape, N, the seed, the
batch size and the augmentation: the order, the crops and flips and MixUp are functions of
(seed, epoch, step). If they also share the model's shape, one worker can train them side by
side: one start-up, one copy of the data, one batch per step fed to every member. What may
differ between members (:data:`MEMBER_FIELDS`) changes neither the model's shape nor the batches:

- ``epochs``: a member ends at its own T and leaves the group;
- ``lr``, ``warmup_epochs``, ``schedule``: each member follows its own learning-rate schedule;
- ``weight_decay``, ``momentum``: each member's own optimizer hyperparameters;
- ``label_smoothing``: each member's own loss;
- ``clip_grad``: each member's gradient norm is clipped on its own.

The optimizer itself is shared (one update rule for all members), and trials with dropout or
stochastic depth do not group: their masks would come from one random stream, so a member
would no longer be the trial it is alone. Everything else (the model, its architecture
options, the data, the stages after pre-training) is the group's.

A group's members are stepped either fused (:mod:`mlpgrid.training.fused`: weights stacked, one
batched matmul per layer for all members) or one after another on the same batch, each its
own model and optimizer as when it runs alone (see :func:`fuses`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from mlpgrid.grid.spec import FIELDS, Trial, TrialConfig
from mlpgrid.models import architecture

MEMBER_FIELDS = (
    "epochs",
    "lr",
    "warmup_epochs",
    "schedule",
    "weight_decay",
    "momentum",
    "label_smoothing",
    "clip_grad",
)
# Fusing K small models' steps into one batched step pays up to 16 members (B-6/Wi-256 at
# batch 4096 on an H200: 7.24M img/s with 16 members against 759k alone, 9.5x); larger groups
# add memory, not speed.
MAX_MEMBERS = 16
# Fusing pays while a member's step is small enough to leave the GPU waiting on kernel
# launches. The alternative is not one trial alone but eight trials alone sharing the GPU
# (time-sliced). Measured with benchmarks/mps.py on an H200 (bare compiled steps at batch 4096;
# hardware FLOPs of one member's step): 8 fused against 8 processes, 0.15 TFLOP (B-6/Wi-256)
# 1.53x, 2.8 TFLOP (B-12/Wi-1024) 1.00x. Against one alone (benchmarks/groups.py): 0.15 TFLOP
# 6.6x, 0.62 TFLOP 4.2x, 1.86 TFLOP 2.4x, 6.19 TFLOP 1.01x. Below 1 TFLOP the gain over
# time-slicing is, interpolated in log step size, above about 1.2x.
FUSE_BELOW_STEP_FLOPS = 1e12
# A fused group is launch-bound unless compiled (B-6/Wi-256 at batch 4096 on an H200: 4 members
# eager 0.77M img/s, 8 compiled 3.57M), and compiling takes some 20-40 s: it pays from about
# this much training (hardware FLOPs of all members), far sooner than for a trial alone.
FUSED_COMPILE_PAYS_FLOPS = 1e15


def group_key(cfg: TrialConfig) -> tuple | None:
    """What a trial's group must share: every setting but :data:`MEMBER_FIELDS`; None for a
    trial that cannot share a worker with others."""
    if cfg.dropout > 0 or cfg.drop_path > 0:
        return None
    return tuple((name, getattr(cfg, name)) for name in FIELDS if name not in MEMBER_FIELDS)


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

    @property
    def step_flops(self) -> float:
        """Hardware FLOPs of one step of every member."""
        return sum(t.step_flops for t in self.trials)


def form_groups(trials: Iterable[Trial], size: int | None, units: int = 1, device_type: str = "cpu",
                fuse: bool | None = None) -> list[Group]:  # fmt: skip
    """The trials in groups of at most ``size`` members (None: automatic; 1: none), for
    ``units`` parallel units of ``device_type``, members fused as ``fuse`` says (see
    :func:`fuses`).

    Automatic grouping takes :data:`MAX_MEMBERS` at most, and on a GPU only members of one T
    that fuse and train long enough to compile (:func:`pays_on_gpu`): on an H200 a group stepped one
    after another, or fused but not compiled, finished later than its trials alone, eight to a
    GPU (``benchmarks/quickstart.py``: 59 s against 48 s; ``benchmarks/grid_overhead.py``).
    On the CPU, members one after another share the loader's work and the start-up.

    Groups are balanced over ``units`` parallel units (GPUs, on which a group runs on at most
    one; else the trials at once): no group takes more than an even share of the trials' compute
    (unless a single trial does). A grid whose largest model and data make most of its compute
    would otherwise train that part on one unit while the others wait. Groups come in the order
    of their first trial; members by the compute they need, largest first.
    """
    trials = list(trials)
    automatic, size = size is None, MAX_MEMBERS if size is None else size
    most = sum(t.compute for t in trials) / units
    buckets: dict[object, list[Trial]] = {}
    for trial in trials:
        key = group_key(trial.config) if size > 1 else None
        if key is not None and automatic and device_type == "cuda":
            # Members that end together (an lr or weight-decay sweep at one T). On an H200,
            # benchmarks/grid_overhead.py --scale 0.3 with groups across T (two fused groups of
            # four, the rest alone, eight at a time) did 0.85x the training work per second of
            # every trial alone: the stack compiles again as each member leaves (7-10 s), a
            # group's process gets one time slice of the GPU among the others for its members'
            # work, and a group asking for four of the eight places waited 163 s for them.
            # --group K still groups across T.
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
    paying = []
    for group in groups:  # each compiles its own stack, which a part of a bucket may not train enough for
        if len(group.trials) > 1 and not pays_on_gpu([t.config for t in group.trials], fuse):
            paying.extend(Group((t,)) for t in group.trials)
        else:
            paying.append(group)
    return paying


def hardware_flops(cfgs: list[TrialConfig]) -> float:
    """Hardware FLOPs of training every one of ``cfgs`` (trials of one shape)."""
    return architecture.hardware_training_flops(cfgs[0].model_config(), sum(c.num_examples * c.epochs for c in cfgs))


def pays_on_gpu(cfgs: list[TrialConfig], fuse: bool | None = None) -> bool:
    """Whether trials of one group's shape gain from training together on a GPU: they fuse
    (:func:`fuses`) and, together, train long enough for compiling the stack to pay."""
    if len(cfgs) < 2 or not fuses(cfgs[0], "cuda", fuse):
        return False
    return fuse is True or hardware_flops(cfgs) >= FUSED_COMPILE_PAYS_FLOPS


def fuses(cfg: TrialConfig, device_type: str, chosen: bool | None = None) -> bool:
    """Whether a group of ``cfg``'s shape steps its members fused: ``chosen`` if given, else on a
    GPU where a member's step is small (:data:`FUSE_BELOW_STEP_FLOPS`). On the CPU members go
    one after another by default, which gives each exactly the results it has alone."""
    if cfg.norm == "batchnorm":
        return False  # batch statistics per member are not in the fused model
    if chosen is not None:
        return chosen
    step_flops = architecture.hardware_training_flops(cfg.model_config(), cfg.batch_size)
    return device_type == "cuda" and step_flops < FUSE_BELOW_STEP_FLOPS


def describe(groups: list[Group]) -> str:
    """The plan line: how the trials were grouped."""
    trials = sum(len(g.trials) for g in groups)
    shared = [len(g.trials) for g in groups if len(g.trials) > 1]
    if not shared:
        return f"{trials} trials, each alone"
    sizes = f"{min(shared)}" if min(shared) == max(shared) else f"{min(shared)} to {max(shared)}"
    alone = len(groups) - len(shared)
    plural = "s" if len(shared) > 1 else ""
    return (f"{trials} trials in {len(groups)} workers: {len(shared)} group{plural} of {sizes} sharing a start-up "
            "and a batch stream" + (f", {alone} alone" if alone else ""))  # fmt: skip
