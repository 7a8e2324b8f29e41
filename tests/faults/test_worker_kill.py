"""A trial's Ray worker process killed mid-epoch: the trial is retried and continues
from its last checkpoint, in the same MLflow run."""

import pytest
from mlflow import MlflowClient

from conftest import kill_the_recording_worker
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader
from mlpgrid.training.checkpoint import HOLD_AT, CheckpointDir

pytestmark = pytest.mark.slow

GRID = """
run: {checkpoint_every_steps: 10}
base: {model: B-1/Wi-16, examples: 3000, batch_size: 50, epochs: 10, optimizer: adamw, lr: 1.0e-3}
"""


def test_killed_worker_is_retried_from_its_checkpoint(tmp_path, write_grid, fashion_mnist, monkeypatch):
    path, storage = write_grid(GRID), tmp_path / "store"
    grid = spec.load(path)
    (trial,) = grid.trials
    layout = StorageLayout(storage).grid(grid.name).trial(trial.id)
    checkpoints = CheckpointDir(layout.checkpoints)
    uri = reader.tracking_uri(StorageLayout(storage))
    monkeypatch.setenv(HOLD_AT, "1:30")  # the worker stops after its checkpoint at step 30 of epoch 2
    victim, out = kill_the_recording_worker(path, storage, layout.root)

    (run,) = reader.trial_runs(reader.find_grid(grid, uri)).values()
    assert run.tags["status"] == "finished" and int(run.tags["worker_pid"]) != victim
    assert "retry  " in out and "restarts from its last checkpoint" in out
    history = MlflowClient(uri).get_metric_history(run.run_id, "test_error")
    assert sorted(m.step for m in history) == list(range(1, 11)), "every epoch once"
    # The checkpoint counts the attempts: each retry adds the position it resumed from.
    assert checkpoints.latest()["resumed_from"] == [[1, 30]], "one retry, from where it was killed"
