"""Two drivers on one grid at once (a double Enter, two users of a shared cluster): every trial
trains once, with one MLflow run and every epoch logged once; a trial one driver is training is
left to it by the other, never marked failed; a fresh store is created once."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import REPO, mlpgrid_command, stop_group, wait_until_held
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader
from mlpgrid.training.checkpoint import HOLD_AT

pytestmark = pytest.mark.slow

GRID = """
name: two-drivers
run: {checkpoint_every_steps: 5}
base: {model: B-1/Wi-16, examples: 500, batch_size: 50, optimizer: adamw, lr: 1.0e-3}
grid:
  epochs: [2, 1]
  seed: [0, 1]
"""


def driver(path, storage, hold=None):
    env = {k: v for k, v in os.environ.items() if k != HOLD_AT} | ({HOLD_AT: hold} if hold else {})
    return subprocess.Popen(mlpgrid_command("run", str(path), "--in-process", "--group", "off", "--storage",
                                            str(storage)), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def test_a_second_driver_leaves_the_first_ones_trial_alone(tmp_path, write_grid, fashion_mnist):
    path, storage = write_grid(GRID), tmp_path / "store"
    grid = spec.load(path)
    first_trial = grid.trials[0]
    held = StorageLayout(storage).grid(grid.name).trial(first_trial.id).root / "held"
    first = driver(path, storage, hold="0:5")  # stops mid-epoch 1 of its first trial, holding it
    try:
        wait_until_held(held, first)
        second = driver(path, storage)
        out, _ = second.communicate(timeout=300)
        assert second.returncode == 1, out
        assert "1 trials are being trained by another process (pid " in out
        assert f"{first_trial.id} running: another process trains it" in out
        assert "1 of 4 trials run did not finish; 1 left to another process: run again once it is done" in out
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        stop_group(first)
    grid_run = reader.find_grid(grid, reader.tracking_uri(StorageLayout(storage)))
    before = reader.trial_runs(grid_run)
    assert before[first_trial.id].tags["status"] == "running", "left to its driver, not marked failed"

    last = driver(path, storage)
    out, _ = last.communicate(timeout=300)
    assert last.returncode == 0, out
    after = reader.trial_runs(grid_run)
    client = MlflowClient(grid_run.tracking_uri)
    recorded = client.search_runs([grid_run.experiment_id], "tags.mlpgrid_role = 'trial'")
    assert sorted(r.data.tags["trial_id"] for r in recorded) == sorted(t.id for t in grid.trials), "one run per trial"
    for trial in grid.trials:
        run = after[trial.id]
        assert run.tags["status"] == "finished"
        steps = [m.step for m in client.get_metric_history(run.run_id, "test_error")]
        assert sorted(steps) == list(range(1, trial.config.epochs + 1)), "every epoch once"
        if trial.id != first_trial.id:
            assert run.end_time == before[trial.id].end_time, "not trained again"


OPEN = """
import sys, time
from pathlib import Path
from mlpgrid.grid import spec
from mlpgrid.tracking import reader, writer
from mlpgrid.grid.layout import StorageLayout
storage = StorageLayout(sys.argv[2])
Path(sys.argv[3] + "." + sys.argv[4]).touch()  # ready: MLflow imported
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
run = writer.open_grid(spec.load(sys.argv[1]), reader.tracking_uri(storage), storage)
print(run.experiment_id, run.parent_run_id)
"""


def test_drivers_started_together_on_a_fresh_store_create_it_once(tmp_path, write_grid):
    path, storage, go = write_grid(GRID), tmp_path / "store", tmp_path / "go"
    command = [sys.executable, "-c", OPEN, str(path), str(storage), str(go)]
    drivers = [subprocess.Popen([*command, str(i)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for i in range(3)]  # fmt: skip
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"go.{i}").exists() for i in range(3)):  # then they open the store together
        assert time.monotonic() < deadline and all(d.poll() is None for d in drivers), "a driver did not start"
        time.sleep(0.05)
    go.touch()
    opened = []
    for d in drivers:
        out, err = d.communicate(timeout=120)
        assert d.returncode == 0, err
        opened.append(out.split())
    assert len({tuple(o) for o in opened}) == 1, "one experiment, one parent run"
    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    assert len(client.search_runs([opened[0][0]], "tags.mlpgrid_role = 'grid'")) == 1
