"""Trunks: the trials of one wsd run that differ only in T train it once.

Under ``schedule: wsd`` a trial's learning rate is constant from warm-up until its cooldown,
the last ``cooldown`` of its steps, whatever T is, and its batches are functions of (seed,
epoch, step). So a trial of T epochs is, up to its cooldown start, the same computation as any
longer trial of the same settings: the longest (the trunk) trains once through, and at each
shorter one's cooldown start writes its state into that trial's checkpoint directory, as the
trial would have written it alone. The shorter trial (a branch) then resumes from there and
trains only its cooldown. Its result is the trial alone's, bit for bit where the hardware is
deterministic; its compute C stays as the paper counts it (FLOP(f)·3·N·T), and what it
actually trained is recorded beside it (``trained_compute``).

A branch whose trunk has already passed its cooldown start (a trial added to a finished grid,
or to a trunk that ran on without it) trains alone from the start: the trunk keeps no earlier
states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mlpgrid.grid.spec import Trial, TrialConfig, pretraining_id


def trunk_key(cfg: TrialConfig) -> str | None:
    """What trials of one trunk share: every setting but T (and the stages after pre-training);
    None for a trial that is no wsd trial."""
    if cfg.schedule != "wsd":
        return None
    return pretraining_id(dataclasses.replace(cfg, epochs=1))


def branch_point(cfg: TrialConfig) -> tuple[int, int]:
    """(epoch, step) of the trial's cooldown start: where it branches from its trunk."""
    return divmod(cfg.cooldown_start(), cfg.steps_per_epoch)


@dataclass(frozen=True)
class Trunk:
    """The longest trial of a wsd run and the shorter ones that branch from it, shortest first."""

    trunk: Trial
    branches: tuple[Trial, ...]


def form_trunks(trials: Iterable[Trial]) -> list[Trunk]:
    """The trunks among ``trials``: wsd trials alike but for T, two or more. A trial whose T is
    within its warm-up does not branch (its warm-up is cut short by T)."""
    runs: dict[str, list[Trial]] = {}
    for trial in trials:
        key = trunk_key(trial.config)
        if key is not None:
            runs.setdefault(key, []).append(trial)
    trunks = []
    for members in runs.values():
        members.sort(key=lambda t: t.config.epochs)
        longest = members[-1]
        branches = tuple(t for t in members[:-1] if t.config.epochs > t.config.warmup_epochs)
        if branches:
            trunks.append(Trunk(longest, branches))
    return trunks


def trained_compute(trial: Trial, branched: bool) -> float:
    """What the trial trains itself: its compute C, or for a branch only its cooldown's share."""
    if not branched:
        return trial.compute
    cfg = trial.config
    total = cfg.epochs * cfg.steps_per_epoch
    return trial.compute * (total - cfg.cooldown_start()) / total


def describe(trunks: Sequence[Trunk], trials: Sequence[Trial], alone: Sequence[str] = ()) -> str | None:
    """The plan line: how much of the compute of ``trials`` their trunks save; None without
    trunks. ``alone``: the ids of branches that train alone (their trunk is past their cooldown)."""
    if not trunks:
        return None
    ids = {t.id for t in trials}
    branches = {b.id for t in trunks for b in t.branches if b.id in ids} - set(alone)
    paper = sum(t.compute for t in trials)
    trained = sum(trained_compute(t, t.id in branches) for t in trials)
    line = (f"{len(branches)} trials branch from {len(trunks)} wsd trunks: {trained:.3e} FLOPs to train for "
            f"C = {paper:.3e} ({1 - trained / paper:.0%} less)")  # fmt: skip
    if alone:
        line += f"; {len(alone)} train alone from the start: their trunk is past their cooldown start"
    return line
