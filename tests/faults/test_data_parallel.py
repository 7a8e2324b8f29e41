"""A data-parallel trial through Ray Train (two gloo workers on the CPU): its lead worker killed
mid-epoch, the trial is retried as a new Ray Train run that resumes from the lead's checkpoint,
recorded once, and it ends where the same trial trained by one worker ends."""

import pytest
from mlflow import MlflowClient

from conftest import kill_the_recording_worker
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader
from mlpgrid.training.checkpoint import HOLD_AT, CheckpointDir
from mlpgrid.training.loop import run_trial
from mlpgrid.training.setup import TrialOptions

pytestmark = pytest.mark.slow

GRID = """
run: {workers: 2, checkpoint_every_steps: 4}
base: {model: B-1/Wi-32, examples: 1050, epochs: 2, batch_size: 100, optimizer: adamw, lr: 1.0e-3, flip: true,
       crop_padding: 2, mixup: 0.2, label_smoothing: 0.1, clip_grad: 1.0}
"""


def test_a_data_parallel_trial_killed_mid_epoch_resumes_and_matches_one_worker(tmp_path, write_grid, fashion_mnist,
                                                                               monkeypatch):  # fmt: skip
    path, storage = write_grid(GRID), tmp_path / "store"
    grid = spec.load(path)
    (trial,) = grid.trials
    layout = StorageLayout(storage).grid(grid.name).trial(trial.id)
    uri = reader.tracking_uri(StorageLayout(storage))
    monkeypatch.setenv(HOLD_AT, "1:4")  # the lead stops after its checkpoint at step 4 of epoch 2
    victim, out = kill_the_recording_worker(path, storage, layout.root, timeout_s=600)  # the lead records
    assert "trains on 2 data-parallel workers (Ray Train)" in out
    assert "retry  " in out and "restarts from its last checkpoint" in out

    runs = reader.trial_runs(reader.find_grid(grid, uri))
    assert list(runs) == [trial.id], "one run"
    run = runs[trial.id]
    assert run.tags["status"] == "finished" and int(run.tags["worker_pid"]) != victim
    assert run.tags["ran_in"] == "data-parallel" and run.tags["workers"] == "2"
    client = MlflowClient(uri)
    history = {key: client.get_metric_history(run.run_id, key) for key in ("train_loss", "test_loss", "test_error")}
    assert sorted(m.step for m in history["test_error"]) == [1, 2], "every epoch once"
    assert CheckpointDir(layout.checkpoints).latest()["resumed_from"] == [[1, 4]], "one retry, from where it was killed"

    monkeypatch.delenv(HOLD_AT)
    alone = run_trial(trial.config, StorageLayout(tmp_path / "alone").grid(grid.name).trial(trial.id),
                      TrialOptions(checkpoint_every_steps=4))  # fmt: skip
    for key, metrics in history.items():
        by_epoch = {m.step: m.value for m in metrics}
        for epoch in alone.history:
            # Two workers sum gradients and losses in another order than one: float32 rounding.
            assert by_epoch[epoch["epoch"]] == pytest.approx(epoch[key], rel=1e-5), (key, epoch["epoch"])
