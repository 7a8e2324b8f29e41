"""`mlpgrid run` killed with SIGKILL at random points, several times in a row, then run to the
end: every trial finishes once, with one MLflow run, and ends as an uninterrupted run ends."""

import os
import random
import signal
import subprocess
import time

import pytest
import torch
from mlflow import MlflowClient

from conftest import REPO, final_checkpoint, mlpgrid_command
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader
from mlpgrid.training.checkpoint import CheckpointDir

pytestmark = pytest.mark.slow

GRID = """
run: {checkpoint_every_steps: 10}
base: {model: B-1/Wi-16, examples: 3000, batch_size: 50, optimizer: adamw, lr: 1.0e-3}
grid:
  epochs: [4, 6, 8]
"""
KILLS = 3


def run_grid(path, storage):
    return subprocess.Popen(mlpgrid_command("run", str(path), "--in-process", "--storage", str(storage)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_driver_killed_again_and_again_loses_and_repeats_nothing(tmp_path, write_grid, fashion_mnist):
    path, storage, reference = write_grid(GRID), tmp_path / "store", tmp_path / "reference"
    grid = spec.load(path)
    uninterrupted = run_grid(path, reference)
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()

    def epochs_reached():
        # (e, s > 0): inside epoch e + 1. Its checkpoints at every 10th step are always written,
        # an epoch end's may be skipped (too soon after the last).
        dirs = [CheckpointDir(storage / grid.name / t.id / "checkpoints") for t in grid.trials]
        return sum(max((e + (s > 0) for e, s in d.positions()), default=0) for d in dirs)

    rng = random.Random(0)
    for target in sorted(rng.sample(range(1, 18), KILLS)):  # of the 18 epochs in the grid
        driver = run_grid(path, storage)
        while epochs_reached() < target:
            assert driver.poll() is None, driver.stderr.read()
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))  # then wherever it is: training, logging, checkpointing
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait() == -signal.SIGKILL
    last = run_grid(path, storage)
    out, err = last.communicate(timeout=600)
    assert last.returncode == 0, out + err

    grid_run = reader.find_grid(grid, reader.tracking_uri(StorageLayout(storage)))
    client = MlflowClient(grid_run.tracking_uri)
    recorded = client.search_runs([grid_run.experiment_id], "tags.mlpgrid_role = 'trial'")
    assert sorted(r.data.tags["trial_id"] for r in recorded) == sorted(t.id for t in grid.trials), "one run per trial"
    for run in recorded:
        trial = next(t for t in grid.trials if t.id == run.data.tags["trial_id"])
        assert run.data.tags["status"] == "finished"
        errors = client.get_metric_history(run.info.run_id, "test_error")
        assert sorted(m.step for m in errors) == list(range(1, trial.config.epochs + 1)), "every epoch once"
        state, expected = final_checkpoint(storage, grid, trial), final_checkpoint(reference, grid, trial)
        assert state["history"][-1]["test_error"] == expected["history"][-1]["test_error"]
        for name, tensor in expected["model"].items():
            assert torch.equal(state["model"][name], tensor), (trial.id, name)
