"""How right the run's ETA is: a real ``mlpgrid run``, its trials' events read back from MLflow
and replayed through the progress view, the ETA it showed at each event against the time the
run really had left.

    python benchmarks/eta.py grids/quickstart.yaml --in-process --record tests/data/quickstart_run.json

The record (``--record``: each trial's start, epochs with their metrics, and end, in seconds from
the run's first start) is what ``tests/test_progress.py`` replays to hold the ETA within 2x.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlpgrid.execution.progress import Progress  # noqa: E402
from mlpgrid.grid import metrics, spec  # noqa: E402
from mlpgrid.grid.layout import StorageLayout  # noqa: E402
from mlpgrid.tracking import reader  # noqa: E402


def record(grid: spec.GridSpec, storage: Path) -> list[list[Any]]:
    """``[seconds, "start" | "epoch" | "end", trial id, metrics | status]`` of every trial, in order."""
    uri = reader.tracking_uri(StorageLayout(storage))
    client, grid_run = MlflowClient(uri), reader.find_grid(grid, uri)
    assert grid_run is not None, f"no runs of {grid.name} in {uri}"
    events = []
    for trial_id, run in reader.trial_runs(grid_run).items():
        history: dict[int, dict[str, float]] = {}
        stamps: dict[int, float] = {}
        for key in metrics.EPOCH:
            for m in client.get_metric_history(run.run_id, key):
                history.setdefault(m.step, {})[key] = m.value
                stamps[m.step] = max(stamps.get(m.step, 0.0), m.timestamp / 1e3)
        startup = client.get_metric_history(run.run_id, "startup_seconds")
        first = min(history)
        began = stamps[first] - history[first]["epoch_seconds"] - (startup[0].value if startup else 0.0)
        events.append([began, "start", trial_id, {}])
        for epoch in sorted(history):
            values = history[epoch] | ({"startup_seconds": startup[0].value} if epoch == first and startup else {})
            events.append([stamps[epoch], "epoch", trial_id, values])
        events.append([stamps[max(history)], "end", trial_id, run.tags["status"]])
    zero = min(e[0] for e in events)
    return sorted(([round(t - zero, 3), *rest] for t, *rest in events), key=lambda e: (e[0], e[1] != "end"))


def replay(grid: spec.GridSpec, events: list[list[Any]]) -> list[tuple[float, float | None, float]]:
    """(seconds, the ETA shown, the seconds the run really had left) after each event."""
    trials = {t.id: t for t in grid.trials}
    now = [0.0]
    progress = Progress(list(trials.values()), out=io.StringIO(), clock=lambda: now[0])
    end = max(e[0] for e in events)
    shown = []
    for at, kind, trial_id, value in events:
        trial, now[0] = trials[trial_id], at
        if kind == "start":
            progress.start(trial)
        elif kind == "epoch":
            progress.epoch(trial, value)
        else:
            progress.end(trial, value)
        shown.append((at, progress.eta(), end - at))
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path)
    parser.add_argument("--in-process", action="store_true", help="run the trials in one process, without Ray")
    parser.add_argument("--record", type=Path, help="write the run's events here")
    args = parser.parse_args()
    grid = spec.load(args.grid)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        command = [sys.executable, "-m", "mlpgrid", "run", str(args.grid), "--storage", tmp]
        subprocess.run(command + (["--in-process"] if args.in_process else []), check=True, capture_output=True)
        wall = time.time() - started
        events = record(grid, Path(tmp))
    if args.record:
        args.record.write_text(json.dumps({"grid": str(args.grid), "events": events}, indent=0) + "\n")
    print(f"{grid.name}: {len(grid.trials)} trials, wall {wall:.0f} s")
    print(f"{'at s':>7} {'ETA s':>8} {'left s':>8} {'ETA/left':>8}")
    for at, eta, left in replay(grid, events):
        if eta is not None and left > 0:
            print(f"{at:>7.1f} {eta:>8.1f} {left:>8.1f} {eta / left:>8.2f}")


if __name__ == "__main__":
    main()
