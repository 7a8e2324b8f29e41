"""Run a grid's trials: the tasks still to do, one trial with its MLflow run, and the trials
one after another in this process (:mod:`mlpgrid.execution.ray_tune` runs them on Ray).

Either way trials run through :func:`execute_group`, which claims each trial, opens its MLflow
run, trains (resuming from the trial's checkpoint directory) and records how it ended.

Resuming a grid needs no Ray state: MLflow says which trials are done, and each trial's
checkpoint directory (under ``--storage``, which must be shared by all nodes of a cluster)
says where an unfinished one stands. Re-running a grid file therefore also picks up trials
added to it since.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mlpgrid import data, policy
from mlpgrid.data import prepared
from mlpgrid.execution import trunks
from mlpgrid.execution.events import EpochEnded, Listener, TrialEnded
from mlpgrid.execution.groups import Group, form_groups
from mlpgrid.execution.progress import Progress
from mlpgrid.grid.layout import GridLayout, StorageLayout, TrialLayout
from mlpgrid.grid.spec import GridSpec, RunOptions, Trial
from mlpgrid.system.locks import claim, holder
from mlpgrid.tracking import writer
from mlpgrid.tracking.reader import DIVERGED, DONE, FAILED, FINISHED, GridRun, RunRecord, data_tag, trial_runs
from mlpgrid.tracking.writer import TrialRun, trial_run
from mlpgrid.training.checkpoint import CheckpointDir
from mlpgrid.training.hardware import pick_device
from mlpgrid.training.loop import Branch, Hooks, TrialDiverged, TrialResult, run_group
from mlpgrid.training.parallel import ALONE, Workers
from mlpgrid.training.setup import TrialOptions

log = logging.getLogger(__name__)

# A trial's outcome when another process (another driver on the same grid) was training it:
# left alone, its MLflow run untouched.
ELSEWHERE = "elsewhere"


@dataclass(frozen=True)
class TrialTask:
    """Everything a worker needs to run one trial, as plain picklable data."""

    trial: Trial
    layout: TrialLayout
    label: str  # its name for people (spec.trial_labels): its MLflow run's name
    data_roots: dict[str, str]  # every dataset the trial reads
    options: RunOptions
    grid_run: GridRun
    data_checksums: dict[str, str] = field(default_factory=dict)  # the prepared ones, checked
    # Another finished trial of the same pre-training (see spec.pretraining_id) whose final
    # checkpoint this trial starts from: only its stages run. None: it trains for itself.
    pretrained_by: str | None = None
    pretrained_in: TrialLayout | None = None
    compile_cache: str | None = None  # torch.compile's cache directory, shared by the trials of a shape
    # A wsd trunk: the shorter trials of its run that branch from it (see mlpgrid.execution.trunks),
    # with their directories; it writes each one's checkpoint at its cooldown start.
    branches: tuple[Branch, ...] = ()
    trunk: str | None = None  # a branch: the trunk it resumes from, run after it


class DataError(Exception):
    """A dataset the grid uses cannot be found, or does not verify; the message says which and why."""


def check_data(grid: GridSpec, storage: StorageLayout | None = None) -> dict[str, str]:
    """Fail before any trial starts when a dataset the grid uses cannot be found, holds fewer
    training images than a trial's examples (a copy of part of it), or, for a prepared one, its
    files do not match its manifest (see :func:`mlpgrid.data.prepared.verify`; with ``storage``,
    files unchanged since they last matched are not hashed again). Returns each prepared
    dataset's checksum, by name."""
    checksums = {}
    for name in sorted({ds for t in grid.trials for ds in t.config.datasets}):
        info, root = data.info(name), grid.data_root(name)
        where = f"Set data.{name} in {grid.path}" + (f" or {info.env_var}" if info.env_var else "")
        try:
            files = info.locate(root)
            held = info.train_count(files) if info.train_count else info.train_size
            beyond = [t for t in grid.trials if t.config.dataset == name and t.config.num_examples > held]
            if beyond:
                largest = max(beyond, key=lambda t: t.config.num_examples)
                raise ValueError(f"{root} holds {held:,} training images, and {len(beyond)} of the grid's trials "
                                 f"train on more (examples up to {largest.config.num_examples:,}: trial "
                                 f"{largest.id}, {grid.labels[largest.id]}). Lower their "
                                 f"examples in {grid.path}, or give the whole dataset")  # fmt: skip
            if (root / prepared.MANIFEST).is_file():
                problems = prepared.verify(root, storage.data_check(root) if storage else None)
                if problems:
                    shown = "\n  ".join(problems)
                    raise DataError(f"dataset {name}: its files do not match {prepared.MANIFEST}:\n  {shown}\n"
                                    f"Prepare it again (mlpgrid data prepare ...).")  # fmt: skip
                checksums[name] = prepared.checksum(prepared.read_manifest(root))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"dataset {name}: {e}. {where}.") from None
    return checksums


def pending_tasks(grid: GridSpec, storage: StorageLayout, grid_run: GridRun, checksums: dict[str, str] | None = None,
                  runs: dict[str, RunRecord] | None = None) -> list[TrialTask]:  # fmt: skip
    """Tasks for the trials MLflow does not show as done, in grid order; ``checksums`` (of
    :func:`check_data`) are recorded on their runs. ``runs``: the grid's trial runs where the
    caller has searched them already (:func:`mlpgrid.tracking.reader.trial_runs`)."""
    runs = trial_runs(grid_run) if runs is None else runs
    done = {tid for tid, run in runs.items() if run.tags.get("status") in DONE}
    directory = storage.grid(grid.name)
    pretrained = _pretrained(grid, directory, runs)
    branches, trunk_of = _branches(grid, directory, done)
    tasks = [
        TrialTask(
            trial=t,
            layout=directory.trial(t.id),
            label=grid.labels[t.id],
            # Resolved here: on a cluster, workers do not see this process's environment.
            data_roots={ds: str(grid.data_root(ds)) for ds in t.config.datasets},
            options=grid.run,
            grid_run=grid_run,
            data_checksums={ds: (checksums or {})[ds] for ds in t.config.datasets if ds in (checksums or {})},
            pretrained_by=pretrained.get(t.id),
            pretrained_in=directory.trial(pretrained[t.id]) if t.id in pretrained else None,
            compile_cache=str(storage.compile_cache),
        )
        for t in grid.trials
        if t.id not in done
    ]
    return [
        dataclasses.replace(
            task,
            branches=tuple(Branch(grid.trial(b).config, directory.trial(b)) for b in branches.get(task.trial.id, ())),
            trunk=trunk_of.get(task.trial.id),
        )
        for task in tasks
    ]


def _branches(grid: GridSpec, directory: GridLayout, done: set[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``{trunk id: the pending branches it is to write a checkpoint for}`` (those with none of
    their own, whose pending trunk has not passed their cooldown start) and ``{branch id: its
    trunk}`` for every pending branch that resumes from its trunk's state (written now, or by
    an earlier run: its first checkpoint is at its cooldown start)."""
    writes: dict[str, list[str]] = {}
    trunk_of: dict[str, str] = {}
    for run in trunks.form_trunks(grid.trials):
        trunk_at = CheckpointDir(directory.trial(run.trunk.id).checkpoints).positions()
        for branch in run.branches:
            if branch.id in done:
                continue
            own = CheckpointDir(directory.trial(branch.id).checkpoints).positions()
            point = trunks.branch_point(branch.config)
            if own and own[0] == point:
                trunk_of[branch.id] = run.trunk.id
            elif not own and run.trunk.id not in done and not (trunk_at and trunk_at[-1] > point):
                writes.setdefault(run.trunk.id, []).append(branch.id)
                trunk_of[branch.id] = run.trunk.id
    return writes, trunk_of


def _pretrained(grid: GridSpec, directory: GridLayout, runs: dict[str, RunRecord]) -> dict[str, str]:
    """``{trial id: finished trial id}`` for the grid's trials not yet started whose pre-training
    another trial finished, its final checkpoint still in storage (probes or fine-tunes added to
    finished trials): they need only their stages."""
    finished: dict[str, list[str]] = {}
    for trial_id, run in sorted(runs.items()):
        if run.tags.get("status") == FINISHED and "pretraining" in run.tags:
            finished.setdefault(run.tags["pretraining"], []).append(trial_id)
    found = {}
    for t in grid.trials:
        if t.id in runs or CheckpointDir(directory.trial(t.id).checkpoints).positions():
            continue  # started already: it goes on from where it is
        for source in finished.get(t.pretraining_id, []):
            positions = CheckpointDir(directory.trial(source).checkpoints).positions()
            if positions and positions[-1][0] == t.config.epochs:
                found[t.id] = source
                break
    return found


class _Recorder:
    """What a trial's MLflow run hears while it trains: its epochs (the first with the attempt's
    start-up time), its stages, and how it ended."""

    def __init__(self, task: TrialTask, tags: dict[str, str] | None, launched_at: float,
                 listener: Listener | None):  # fmt: skip
        self.task, self.launched_at, self.listener = task, launched_at, listener
        checked = {data_tag(name): checksum for name, checksum in task.data_checksums.items()}
        self.run = TrialRun.open(task.grid_run, task.trial, (tags or {}) | checked, name=task.label)
        self.first = True

    def on_epoch(self, metrics: dict[str, Any]) -> None:
        if self.first:
            metrics = {**metrics, "startup_seconds": time.time() - metrics["epoch_seconds"] - self.launched_at}
            self.run.log_attempt(metrics)
            self.first = False
        self.run.log_epochs([metrics])
        if self.listener:
            self.listener(EpochEnded(self.task.trial.id, metrics))

    def hooks(self) -> Hooks:
        return Hooks(resumed=self.run.log_epochs, epoch=self.on_epoch, stages=self.run.log_stages)

    def end(self, outcome: TrialResult | BaseException) -> str:
        """Record how the trial ended; returns its status."""
        if isinstance(outcome, TrialResult):
            self.run.log_file(outcome.first_layer)
            self.run.finish(
                FINISHED, checkpoint=str(self.task.layout.checkpoints), problems=outcome.checkpoint_problems
            )
            CheckpointDir(self.task.layout.checkpoints).keep_final()  # recorded as finished: the rest is not needed
            return FINISHED
        if isinstance(outcome, TrialDiverged):
            self.run.finish(DIVERGED, error=str(outcome))
            return DIVERGED
        self.run.finish(FAILED, error="".join(traceback.format_exception(outcome)))
        return FAILED


def _trial_options(options: RunOptions, gpu_share: float) -> TrialOptions:
    chosen_budget = options.data_budget_gb
    return TrialOptions(
        checkpoint_every_steps=options.checkpoint_every_steps,
        evaluate_every=options.evaluate_every,
        data_budget_bytes=None if chosen_budget is None else chosen_budget * 2**30,
        gpu_share=gpu_share,
        compile=options.compile,
    )


def _datasets(tasks: list[TrialTask], arrays: data.ImageArrays | None) -> data.Datasets:
    """Where the tasks' datasets are (a worker process knows only what the tasks say), with
    the pre-training arrays the runner shared."""
    datasets = data.Datasets({name: root for task in tasks for name, root in task.data_roots.items()})
    if arrays is not None:
        cfg = tasks[0].trial.config
        datasets.keep(cfg.dataset, cfg.resolution, cfg.channels, arrays)
    return datasets


def execute(task: TrialTask, **options: Any) -> str:
    """Run one trial alone (see :func:`execute_group`); returns its status."""
    return execute_group(GroupTask((task.trial,), (task,)), **options)[task.trial.id]


@dataclass(frozen=True)
class GroupTask(Group):
    """A :class:`~mlpgrid.execution.groups.Group` with what a worker needs to run each of its trials."""

    members: tuple[TrialTask, ...] = ()


def group_tasks(tasks: list[TrialTask], size: int | None, units: int = 1,
                device_type: str = "cpu") -> list[GroupTask]:  # fmt: skip
    """The tasks in groups of at most ``size`` trials (None: automatic, 1: each alone), for
    ``units`` parallel units of ``device_type`` (see :func:`mlpgrid.execution.groups.form_groups`)."""
    by_id = {t.trial.id: t for t in tasks}
    fuse = tasks[0].options.fuse if tasks else None
    training = [t.trial for t in tasks if t.pretrained_by is None]
    groups = form_groups(training, size, units, device_type, fuse)
    grouped = [GroupTask(g.trials, tuple(by_id[t.id] for t in g.trials)) for g in groups]
    # A trial whose pre-training is done runs alone: nothing of it would share a batch stream.
    return grouped + [GroupTask((t.trial,), (t,)) for t in tasks if t.pretrained_by is not None]


def held_elsewhere(tasks: list[TrialTask]) -> dict[str, str]:
    """``{trial id: who holds it}`` for the tasks whose trial another process is training now
    (another ``mlpgrid run`` on the same grid, or a worker it left behind)."""
    held = {t.trial.id: holder(t.layout.lock) for t in tasks}
    return {trial_id: who for trial_id, who in held.items() if who is not None}


def settle(grid: GridSpec, storage: StorageLayout, grid_run: GridRun) -> dict[str, str]:
    """What a driver leaves behind as it stops, however it stops: the trials whose runs say
    running but that no process trains are marked :data:`~mlpgrid.tracking.reader.INTERRUPTED`, and
    the grid's parent run ends (finished once every trial has ended) unless another process
    still trains some of them. Returns those, as :func:`held_elsewhere` does."""
    left = pending_tasks(grid, storage, grid_run)
    held = held_elsewhere(left)
    writer.mark_interrupted(grid_run, [t.trial.id for t in left if t.trial.id not in held])
    if not held:
        writer.end_grid(grid_run, all_ended=not left)
    return held


def execute_group(
    group: GroupTask,
    *,
    listener: Listener | None = None,
    tags: dict[str, str] | None = None,
    device: Any = None,
    launched_at: float | None = None,
    arrays: data.ImageArrays | None = None,
    gpu_share: float = 1.0,
    workers: Workers = ALONE,
) -> dict[str, str]:
    """Run a group's trials (often a trial alone) through the training loop
    (:func:`mlpgrid.training.loop.run_group`), each with its MLflow run, and return each one's
    status by trial id; the runs of a group of several are tagged with the group.

    Each trial is claimed first (its lock; see :func:`mlpgrid.system.locks.claim`): one that
    another process holds is left to it (:data:`ELSEWHERE`), and one that ended meanwhile (a
    retry, or another driver) is not run again; only then is its run opened, so a trial never
    gets two runs or an epoch logged twice. Raises when a trial fails, after recording it (a
    runner retries it); a diverged trial is recorded as such and not raised.

    ``tags`` are set on each run for this attempt (where it runs). ``launched_at`` (a
    ``time.time()``) is when the runner asked for the group; the time from then to a trial's
    first step is logged as its ``startup_seconds``. ``arrays`` are the pre-training data when
    the runner shares it; ``gpu_share`` is the part of the GPU the group has (its default data
    budget scales with it). ``listener`` hears each member's epochs and ends
    (:mod:`mlpgrid.execution.events`). ``workers``: this process's place among the workers of a
    data-parallel trial (a group of one); only the lead claims, records and hears; the others
    train their shards (:func:`train_shard`).
    """
    launched_at = launched_at or time.time()
    statuses: dict[str, str] = {}
    # Known in this process before any run opens: a run's tags (the model's parameter count)
    # depend on the dataset's shape, and a worker knows only the prepared datasets it was told of.
    datasets = _datasets(list(group.members), arrays)
    if not workers.lead:
        train_shard(group, workers, device or pick_device(), datasets, gpu_share)
        return statuses

    def ended(trial_id: str, status: str) -> None:
        statuses[trial_id] = status
        if listener:
            listener(TrialEnded(trial_id, status))

    with contextlib.ExitStack() as locks:
        members = []
        for task in group.members:
            holder = locks.enter_context(claim(task.layout.lock))
            run = None if holder else trial_run(task.grid_run, task.trial.id)
            if holder is not None:
                log.warning("%s: another process trains it (%s); left to it", task.trial.id, holder)
                ended(task.trial.id, ELSEWHERE)
            elif run is not None and run.data.tags.get("status") in DONE:
                ended(task.trial.id, run.data.tags["status"])
            else:
                members.append(task)
        if not members:
            return statuses
        device = device or pick_device()
        lead = members[0]
        if lead.compile_cache:  # a shape compiled once serves every later trial of it (unless set already)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", lead.compile_cache)
        fused = len(members) > 1 and policy.fuses(lead.trial.config, device.type, lead.options.fuse)
        group_tags = {} if len(group.trials) == 1 else {
            "ran_in": "group", "group_id": group.id, "group_size": str(len(group.trials)),
            "group_steps": "fused" if fused else "one after another"}  # fmt: skip
        if workers.count > 1:
            group_tags = {"ran_in": "data-parallel", "workers": str(workers.count)}
        recorders = []
        for task in members:
            run_tags = (tags or {}) | group_tags | _adopt_pretrained(task) | _trunk_tags(task)
            recorders.append(_Recorder(task, run_tags, launched_at, listener))
        failures = _train(members, recorders, statuses, ended, _trial_options(lead.options, gpu_share),
                          device=device, fuse=fused, datasets=datasets, workers=workers)  # fmt: skip
    if failures:  # recorded; raised so that the runner retries the failed trials (the others have ended)
        raise failures[0]
    return statuses


def train_shard(group: GroupTask, workers: Workers, device: Any, datasets: data.Datasets, gpu_share: float) -> None:
    """A data-parallel trial's worker other than the lead: trains its shard of every batch in
    step with the others; raises what ends it (a divergence ends every worker alike, recorded by
    the lead)."""
    (task,) = group.members

    def on_end(i: int, outcome: TrialResult | BaseException) -> None:
        if isinstance(outcome, BaseException) and not isinstance(outcome, TrialDiverged):
            raise outcome

    run_group([task.trial.config], [task.layout], _trial_options(task.options, gpu_share), datasets=datasets,
              hooks=[Hooks()], device=device, fuse=False, on_end=on_end, branches=[list(task.branches)],
              workers=workers)  # fmt: skip


def _train(members: list[TrialTask], recorders: list[_Recorder], statuses: dict[str, str],
           ended: Callable[[str, str], None], options: TrialOptions, *, device: Any, fuse: bool,
           datasets: data.Datasets, workers: Workers = ALONE) -> list[BaseException]:  # fmt: skip
    """Train the members not ended yet in one :func:`~mlpgrid.training.loop.run_group`, each
    end recorded as it comes; returns the failures (divergence is none). Out of GPU memory, the
    members go on from their checkpoints with a smaller data budget
    (:func:`mlpgrid.policy.data_budget_after_oom`) until every image streams; then they fail
    (at once in a data-parallel trial: its workers restart together, from the lead's checkpoint)."""
    failures: list[BaseException] = []
    while True:
        going = [i for i, task in enumerate(members) if task.trial.id not in statuses]

        def on_end(i: int, outcome: TrialResult | BaseException, going: list[int] = going) -> None:
            member = going[i]
            ended(members[member].trial.id, recorders[member].end(outcome))
            if isinstance(outcome, BaseException) and not isinstance(outcome, TrialDiverged):
                failures.append(outcome)

        branches = [list(members[i].branches) for i in going]
        try:
            run_group([members[i].trial.config for i in going], [members[i].layout for i in going], options,
                      datasets=datasets, hooks=[recorders[i].hooks() for i in going],
                      device=device, fuse=fuse, on_end=on_end, branches=branches, workers=workers)  # fmt: skip
            return failures
        except torch.cuda.OutOfMemoryError as e:
            scale = policy.data_budget_after_oom(options.data_budget_scale) if workers.count == 1 else None
            if scale is None:
                _fail_the_rest(members, statuses, on_end, going, e)
                raise
            log.warning("out of GPU memory; the members go on with %g of their data budget: %s", scale, e)
            torch.cuda.empty_cache()
            options = dataclasses.replace(options, data_budget_scale=scale)
        except Exception as e:
            _fail_the_rest(members, statuses, on_end, going, e)
            raise


def _fail_the_rest(members: list[TrialTask], statuses: dict[str, str], on_end: Callable[[int, BaseException], None],
                   going: list[int], error: BaseException) -> None:  # fmt: skip
    """Record ``error`` as the end of every member the group's training left without one."""
    for i, member in enumerate(going):
        if members[member].trial.id not in statuses:
            on_end(i, error)


def _trunk_tags(task: TrialTask) -> dict[str, str]:
    """A wsd trial's tags: the trunk a branch resumes from and where, the branches a trunk
    writes; and what it trains itself (its compute C counts all of T, as the paper does)."""
    if task.trial.config.schedule != "wsd":
        return {}
    tags = {"trained_compute": f"{trunks.trained_compute(task.trial, task.trunk is not None):.6e}"}
    if task.trunk:
        epoch, step = trunks.branch_point(task.trial.config)
        tags |= {"trunk": task.trunk, "branch_point": f"epoch {epoch} step {step}"}
    if task.branches:
        tags["branches"] = str(len(task.branches))
    return tags


def _adopt_pretrained(task: TrialTask) -> dict[str, str]:
    """A trial whose pre-training another trial finished starts from that trial's final
    checkpoint (its first attempt copies it in); the tags that say so."""
    if task.pretrained_by is None or task.pretrained_in is None:
        return {}
    checkpoints = CheckpointDir(task.layout.checkpoints)
    if not checkpoints.positions():
        checkpoints.adopt(CheckpointDir(task.pretrained_in.checkpoints))
    return {"pretrained_by": task.pretrained_by}


def run_in_process(groups: list[GroupTask], progress: Progress) -> None:
    """Run the groups one after another in this process; a failed trial does not stop the rest."""
    for group in groups:
        for trial in group.trials:
            progress.start(trial)
        try:
            execute_group(group, listener=progress.hear)
        except Exception as e:  # noqa: BLE001 - recorded in MLflow; the grid goes on
            progress.note(f"{group.id} failed: {type(e).__name__}: {e}")
        for trial in group.trials:  # those not ended already
            progress.end_if_running(trial.id, FAILED)
