"""The live view of a running grid: trials done, running and pending, epochs, speed, ETA.

On a terminal a status line stays at the bottom and is redrawn; elsewhere (CI logs, files)
every event is one plain line, and the counts follow each trial's end. The ETA models each
remaining trial as its images left at its model's measured pace, spread over as many trials as
have run at once (see :meth:`Progress.eta`).
"""

from __future__ import annotations

import collections
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import click

from mlpgrid.execution.events import EpochEnded, Event, GroupEnded, TrialEnded, from_result
from mlpgrid.grid.spec import Trial, trial_labels
from mlpgrid.tracking.reader import STATE_COLOURS


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, trials: list[Trial], already_done: int = 0, out: TextIO | None = None,
                 labels: dict[str, str] | None = None, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self._out = out  # None: whatever sys.stdout is when writing (Tune pickles this object)
        # Each trial as people read it (spec.trial_labels: the settings that vary in its grid).
        self.labels = labels if labels is not None else trial_labels(trials)
        self.total = len(trials) + already_done
        self.done = already_done
        self.trials = {t.id: t for t in trials}
        self.pending = {t.id: t for t in trials}
        self.running: dict[str, Trial] = {}
        self.epochs: dict[str, int] = {}
        self.speed: dict[str, float] = {}
        # What the ETA rests on, kept up as events come (each is O(1), however large the grid):
        # by model, the images its trials have left, and the images they trained in the wall
        # seconds from each one's start to its latest epoch (or its end).
        self.clock = clock
        self.flops = {t.config.model: t.forward_flops for t in trials}
        self.images_left: dict[str, float] = collections.defaultdict(float)
        for t in trials:
            self.images_left[t.config.model] += t.config.num_examples * t.config.epochs
        self.images: dict[str, float] = collections.defaultdict(float)
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.last: dict[str, float] = {}  # each trial's start, then its latest epoch
        self.slots = 1
        self.started = clock()

    # events ------------------------------------------------------------------------------

    def start(self, trial: Trial) -> None:
        self.pending.pop(trial.id, None)
        self.running[trial.id] = trial
        self.last.setdefault(trial.id, self.clock())
        self.slots = max(self.slots, len(self.running))
        self._line(f"start    {self._name(trial)}")

    def epoch(self, trial: Trial, metrics: dict[str, Any]) -> None:
        if trial.id not in self.epochs and metrics["epoch"] > 1:  # resumed: its earlier epochs were trained before
            self._count(trial, metrics["epoch"] - 1, trained=False)
        self._count(trial, metrics["epoch"], trained=True)
        self.speed[trial.id] = metrics["images_per_s"]
        startup = f"  (started in {metrics['startup_seconds']:.1f} s)" if "startup_seconds" in metrics else ""
        tested = f"test_error {metrics['test_error']:.4f}  " if "test_error" in metrics else ""
        self._line(
            f"epoch    {self._name(trial)}  {metrics['epoch']}/{trial.config.epochs}  "
            f"train_loss {metrics['train_loss']:.4f}  {tested}{metrics['images_per_s']:,.0f} img/s{startup}"
        )

    def end(self, trial: Trial, status: str) -> None:
        self._count(trial, trial.config.epochs, trained=False)
        self.running.pop(trial.id, None)
        self.speed.pop(trial.id, None)
        self.done += 1
        shown = f"{status:<8}"
        if self.live and status in STATE_COLOURS:  # as `status` colours its table
            shown = click.style(shown, fg=STATE_COLOURS[status])
        self._line(f"{shown} {self._name(trial)}", counts=True)

    def hear(self, event: Event) -> None:
        """A running group's event (:mod:`mlpgrid.execution.events`)."""
        if isinstance(event, EpochEnded):
            self.epoch(self.trials[event.trial_id], event.metrics)
        elif isinstance(event, TrialEnded):
            self.end_if_running(event.trial_id, event.status)

    def end_if_running(self, trial_id: str, status: str) -> None:
        """End the trial unless it has ended already (a member that left its group before)."""
        if trial_id in self.running:
            self.end(self.trials[trial_id], status)

    def note(self, text: str) -> None:
        self._line(text)

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def live(self) -> bool:
        return self.out.isatty()

    def close(self) -> None:
        if self.live:
            self.out.write("\r\x1b[K")
            self.out.flush()

    # rendering ---------------------------------------------------------------------------

    def _name(self, trial: Trial) -> str:
        return f"{self.labels.get(trial.id, trial.config.model)} [{trial.id[:8]}]"

    def _count(self, trial: Trial, epoch: int, trained: bool) -> None:
        """The trial is done up to ``epoch``: its images left shrink; where it ``trained`` them
        (an epoch reported; not the epochs a trial ending early leaves), they count as trained
        in the time since its start or its latest epoch. Its time to its end counts too."""
        model, done = trial.config.model, self.epochs.get(trial.id, 0)
        images = trial.config.num_examples * max(0, epoch - done)
        self.epochs[trial.id] = max(done, epoch)
        self.images_left[model] -= images
        if trial.id in self.last and (trained or done):  # it has trained here: its time counts
            now = self.clock()
            self.seconds[model] += max(now - self.last[trial.id], 0.0)
            self.images[model] += images if trained else 0.0
            self.last[trial.id] = now

    def eta(self) -> float | None:
        """Seconds left, or None before the first epoch has been measured: the images each model's
        trials have left at its measured pace (wall seconds an image of its trials, from each one's
        start: start-up, evaluation and sharing included) or, for a model none of whose trials has
        reported yet, at the pace of the model nearest in FLOPs, scaled; spread over as many
        trials as have run at once. Trials start largest first, so the paces that decide most of
        what is left are measured first."""
        measured = [m for m, n in self.images.items() if n > 0]
        if not measured:
            return None
        left = 0.0
        for model, images in self.images_left.items():
            if images <= 0:
                continue
            near = min(measured, key=lambda m: abs(math.log(self.flops[m] / self.flops[model])))
            # Time an image takes grows with a model's FLOPs, but slower than they do (small models
            # use a device less well): as their square root, between the bounds of same time an
            # image and same FLOPs a second.
            per_image = self.seconds[near] / self.images[near] * math.sqrt(self.flops[model] / self.flops[near])
            left += images * per_image
        return left / self.slots

    def summary(self) -> str:
        parts = [f"done {self.done}/{self.total}", f"running {len(self.running)}", f"pending {len(self.pending)}"]
        if self.speed:
            parts.append(f"{sum(self.speed.values()):,.0f} img/s")
        eta = self.eta()
        if eta is not None and (self.pending or self.running):
            parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)

    def _line(self, text: str, counts: bool = False) -> None:
        """``text`` above the status line on a terminal; in a log, on a line of its own, followed
        by the counts where ``counts`` (as each trial ends)."""
        elapsed = _duration(self.clock() - self.started)
        if self.live:
            self.out.write(f"\r\x1b[K{text}\n{self.summary()} | {elapsed} elapsed")
        else:
            self.out.write(f"[{elapsed}] {text}\n" + (f"[{elapsed}] {self.summary()}\n" if counts else ""))
        self.out.flush()

    def tune_callback(self, groups: dict[str, tuple[Trial, ...]]) -> Any:
        """A Ray Tune callback feeding this view (Tune calls it with keyword arguments); each Tune
        trial trains one of ``groups``, by group id."""
        from ray.tune import Callback

        progress = self

        class _TuneProgress(Callback):
            def __init__(self) -> None:
                self.statuses: dict[str, str] = {}

            def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
                for member in groups[trial.config["group_id"]]:
                    if member.id not in self.statuses:  # a retry does not start the members that ended
                        progress.start(member)

            def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
                event = from_result(result)
                if isinstance(event, GroupEnded):
                    self.statuses |= event.statuses
                elif isinstance(event, TrialEnded):
                    self.statuses.setdefault(event.trial_id, event.status)
                if event is not None:
                    progress.hear(event)

            def on_trial_recover(self, iteration, trials, trial, **info):  # noqa: ANN001
                progress.note(f"retry  {trial.config['group_id']} (restarts from its last checkpoint)")

            def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
                for member in groups[trial.config["group_id"]]:  # those not ended while their group went on
                    progress.end_if_running(member.id, self.statuses.get(member.id, "finished"))

            def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
                for member in groups[trial.config["group_id"]]:
                    progress.end_if_running(member.id, "failed")

        return _TuneProgress()
