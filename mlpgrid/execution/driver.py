"""What ``mlpgrid run``, ``trial`` and ``status`` do, as library calls the CLI only prints.

:func:`run_grid` checks everything that can be checked before a trial starts (the data, the
tracking store, edits to the grid file, changed data), runs the trials not ended yet (on Ray or
in this process) and, however it stops, settles what it leaves behind; it returns a
:class:`RunOutcome`. :func:`run_one` does the same for one trial in this process. (``status`` imports no torch:
its rows come from :func:`mlpgrid.tracking.reader.grid_status`.)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from mlpgrid.data.files import disk_full
from mlpgrid.execution import runner, trunks
from mlpgrid.execution.events import EpochEnded, Event
from mlpgrid.execution.groups import describe
from mlpgrid.execution.placement import launch_order
from mlpgrid.execution.progress import Progress
from mlpgrid.execution.ray_tune import RayOptions
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.grid.spec import GridSpec, trial_id
from mlpgrid.system import waits
from mlpgrid.tracking import reader, writer
from mlpgrid.tracking.reader import GridRun, StatusRow


class RunRefused(Exception):
    """The run did not start: the message says why and what to do. Nothing was trained."""


@dataclass(frozen=True)
class RunRequest:
    """How to run a grid (the ``run`` command's options)."""

    group: int | None = None  # most members of a group; None: automatic, 1: every trial alone
    in_process: bool = False  # one trial after another in this process, without Ray
    allow_changes: bool = False  # run the file as it is even if ended trials left it or its data changed
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass(frozen=True)
class NotFinished:
    """A trial this run did not bring to ``finished``, and why."""

    trial_id: str
    state: str
    why: str


@dataclass(frozen=True)
class RunOutcome:
    """What a run did: each trial's row after it, what did not finish, why it stopped early."""

    grid: str
    trials_run: int  # trials this run set out to train (left to another process included)
    held_at_start: dict[str, str]  # trial id -> the process that was training it when the run started
    rows: list[StatusRow]
    not_finished: list[NotFinished]
    left_to_others: int  # of not_finished: trained by another process as the run stopped
    failure: str | None  # why the run stopped early (Ray could place no trial), if it did
    stopped_by: str | None = None  # the signal that stopped the run (SIGINT: Ctrl-C; SIGTERM), if one did
    experiment_id: str = ""  # the grid's MLflow experiment

    @property
    def ok(self) -> bool:
        return not self.not_finished


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while a run lasts: the first asks the run to stop, trials
    saving their state (``requested``, which the Ray path's stopper reads); in this process, or at
    a second signal, it stops at once (KeyboardInterrupt). Either way the run settles what it leaves
    and says so. Outside the main thread (where Python takes no handlers) it does nothing."""

    def __init__(self, at_once: bool, note: Callable[[str], None]) -> None:
        self.at_once, self.note = at_once, note
        self.caught: str | None = None
        self._before: dict[int, object] = {}

    def requested(self) -> bool:
        return self.caught is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        again, self.caught = self.caught is not None, self.caught or signal.Signals(signum).name
        if self.at_once or again:
            raise KeyboardInterrupt
        self.note(f"{self.caught}: stopping; each running trial keeps its last checkpoint (send it again to stop at "
                  "once)")  # fmt: skip

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._before[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def _first_lines(lines: list[str], shown: int = 5) -> str:
    more = [f"... and {len(lines) - shown} more"] if len(lines) > shown else []
    return "\n  ".join(lines[:shown] + more)


def open_tracking(grid: GridSpec, storage: StorageLayout, tracking_uri: str | None) -> GridRun:
    """The grid's MLflow experiment and parent run, or :class:`RunRefused` before any trial starts."""
    uri = reader.tracking_uri(storage, tracking_uri)
    try:
        if uri.startswith(("http://", "https://")):  # MLflow's client would retry for minutes
            port = 443 if uri.startswith("https") else 80
            waits.wait_for(f"the MLflow server at {reader.shown(uri)}", waits.listening(uri, port))
        return writer.open_grid(grid, uri, storage)
    except Exception as e:  # noqa: BLE001 - whatever stops MLflow, stop before training
        raise RunRefused(reader.shown(f"cannot use MLflow tracking URI {uri}: {e}")) from None


def _check_data(grid: GridSpec, storage: StorageLayout) -> dict[str, str]:
    try:
        return runner.check_data(grid, storage)
    except runner.DataError as e:
        raise RunRefused(str(e)) from None


def _refuse_changes(grid: GridSpec, full_grid: GridSpec, grid_run: GridRun, ended: dict[str, reader.RunRecord],
                    checksums: dict[str, str]) -> None:  # fmt: skip
    """Refuse to run a grid file edited so that ended trials left it, or whose data changed."""
    changed = reader.changed_trials(full_grid, grid_run, ended)
    if changed:
        raise RunRefused(
            f"{grid.path} changed since its trials ran: {len(changed)} ended trials are no longer in it. "
            f"As run -> in the file now:\n  {_first_lines(changed)}\nPut the setting back, give the grid a new name, "
            "or pass --allow-changes to run the file as it is (the ended trials stay in MLflow)."
        )
    stale = reader.data_changed(ended, checksums)
    if stale:
        raise RunRefused(
            f"the data changed since {len(stale)} trials of {grid.name} trained on it (dataset checksum as run -> "
            f"now):\n  {_first_lines(stale)}\nTheir results are of the old data. Put the data back, give the grid a "
            "new name to train on the new data, or pass --allow-changes to go on as it is."
        )


def run_grid(grid: GridSpec, storage: StorageLayout, tracking_uri: str | None, request: RunRequest,
             full_grid: GridSpec | None = None) -> RunOutcome:  # fmt: skip
    """Run every trial of ``grid`` not ended yet; re-running resumes. ``full_grid``: the grid
    file before ``--only`` reduced it, against which edits are checked. Raises
    :class:`RunRefused` before anything runs when the run cannot start."""
    checksums = _check_data(grid, storage)
    grid_run = open_tracking(grid, storage, tracking_uri)
    ended = reader.trial_runs(grid_run)  # one search for the checks below and the pending trials
    if not request.allow_changes:
        _refuse_changes(grid, full_grid or grid, grid_run, ended, checksums)
    tasks = runner.pending_tasks(grid, storage, grid_run, checksums, ended)
    held = runner.held_elsewhere(tasks)
    mine = [t for t in tasks if t.trial.id not in held]
    progress = Progress([t.trial for t in mine], already_done=len(grid.trials) - len(mine), labels=grid.labels)
    if held:
        holders = ", ".join(sorted(set(held.values())))
        progress.note(f"{len(held)} trials are being trained by another process ({holders}): left to it.")
    if not tasks:
        progress.note(f"Nothing to do: all {len(grid.trials)} trials of {grid.name} have already ended.")
    if mine and not request.in_process:
        from mlpgrid.execution import ray_tune

        try:  # before anything trains: an address that does not answer is a refusal, not a hang
            ray_tune.start_ray(request.ray.address, storage)
        except ConnectionError as e:
            raise RunRefused(str(e)) from None
    by_id = {t.trial.id: t for t in mine}
    runs = [r for r in trunks.form_trunks(grid.trials) if any(t.id in by_id for t in (r.trunk, *r.branches))]
    alone = [b.id for r in runs for b in r.branches if b.id in by_id and by_id[b.id].trunk is None]
    trunk_line = trunks.describe(runs, [t.trial for t in mine], alone)
    if trunk_line and mine:
        progress.note(trunk_line)
    failure = None
    still_held: dict[str, str] = {}
    stop = StopSignals(at_once=request.in_process, note=progress.note)
    try:
        with stop:
            _run_phases(mine, grid, storage, request, progress, stop)
    except KeyboardInterrupt:
        stop.caught = stop.caught or "SIGINT"
    except _Failed as e:
        failure = str(e)
    except Exception as e:
        if not disk_full(e, storage.root):
            raise
        failure = (
            f"the disk holding {storage.root} is full ({type(e).__name__}: {e}); the run stopped. Finished "
            "trials and every checkpoint written are kept: free space, then run again to resume."
        )
        progress.note(failure)
    finally:
        progress.close()
        try:
            still_held = runner.settle(grid, storage, grid_run)  # also after Ctrl-C: cut-off trials say so
        except Exception as e:
            if failure is None or not disk_full(e, storage.root):
                raise
            progress.note(f"could not mark the trials left as interrupted: {e}")
    rows = reader.grid_status(grid, grid_run, storage)
    # What this run did not bring to an end; diverged trials found from an earlier run are in the
    # rows, and a re-run with nothing left to do succeeds.
    ran = {t.trial.id for t in tasks}
    not_finished = []
    for r in rows:
        if r.state == reader.FINISHED or (r.trial_id not in ran and r.state in reader.DONE):
            continue
        holder = still_held.get(r.trial_id)
        why = f"another process trains it ({holder})" if holder else (r.error or "did not run to the end")
        not_finished.append(NotFinished(r.trial_id, r.state, why))
    return RunOutcome(grid.name, len(ran), held, rows, not_finished,
                      sum(1 for n in not_finished if n.trial_id in still_held), failure, stop.caught,
                      grid_run.experiment_id)  # fmt: skip


class _Failed(Exception):
    """The run stopped early for a reason it has told the user (Ray could place no trial)."""


def _run_phases(tasks: list[runner.TrialTask], grid: GridSpec, storage: StorageLayout, request: RunRequest,
                progress: Progress, stop: StopSignals) -> None:  # fmt: skip
    """Train the tasks, phase after phase (see :func:`_phases`), until done or asked to stop."""
    for phase in _phases(tasks):
        if stop.requested():
            return
        if request.in_process:
            from mlpgrid.training.hardware import pick_device

            groups = runner.group_tasks(phase, request.group, device_type=pick_device().type)
            progress.note(describe(groups))
            asked = [request.ray.workers, grid.run.workers, request.ray.gpus_per_trial, grid.run.gpus_per_trial]
            if any(n is not None and n > 1 for n in asked):
                progress.note("data-parallel workers run on Ray: in process each trial trains on one (its result the "
                              "same, to float rounding)")  # fmt: skip
            runner.run_in_process(launch_order(groups), progress)  # largest first, as on Ray
        else:
            from mlpgrid.execution import ray_tune

            try:
                ray_tune.run_on_ray(phase, request.group, grid, storage, request.ray, progress, stop.requested)
            except ray_tune.ResourcesError as e:
                progress.note(str(e))
                raise _Failed(str(e)) from None


def _phases(tasks: list[runner.TrialTask]) -> list[list[runner.TrialTask]]:
    """The tasks in the order they can run: the branches whose trunk writes their checkpoint
    (:mod:`mlpgrid.execution.trunks`) after everything else."""
    written = {trial_id(branch.cfg) for task in tasks for branch in task.branches}
    first = [t for t in tasks if t.trial.id not in written]
    then = [t for t in tasks if t.trial.id in written]
    return [phase for phase in (first, then) if phase]


def run_one(grid: GridSpec, trial_id: str, storage: StorageLayout, tracking_uri: str | None) -> tuple[str, str]:
    """Run one trial of ``grid`` (an id or a unique prefix) in this process, recorded as ``run``
    records it; returns (its full id, its status), "ended" when it had ended before. Raises
    :class:`RunRefused` before anything runs when it cannot start."""
    try:
        chosen = grid.trial(trial_id)
    except ValueError as e:
        raise RunRefused(str(e)) from None
    checksums = _check_data(grid, storage)
    grid_run = open_tracking(grid, storage, tracking_uri)
    pending = {task.trial.id: task for task in runner.pending_tasks(grid, storage, grid_run, checksums)}
    if chosen.id not in pending:
        return chosen.id, "ended"
    progress = Progress([chosen], labels=grid.labels)
    progress.start(chosen)

    def hear(event: Event) -> None:
        if isinstance(event, EpochEnded):  # the end is shown below
            progress.hear(event)

    try:
        status = runner.execute(pending[chosen.id], listener=hear)
    finally:
        runner.settle(grid, storage, grid_run)
    progress.end(chosen, status)
    return chosen.id, status
