"""The MLflow server stopped during a grid and started again: training goes on, and every
metric logged meanwhile arrives once, after the server is back."""

import os
import subprocess
import time

import pytest
from mlflow import MlflowClient

from conftest import REPO, mlpgrid_command, wait_until_held
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.training.checkpoint import HOLD_AT, CheckpointDir

pytestmark = pytest.mark.slow

GRID = """
base: {model: B-1/Wi-16, examples: 2000, batch_size: 50, epochs: 30, optimizer: adamw, lr: 1.0e-3}
run: {checkpoint_every_steps: 20}
"""


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the grid ended before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_metrics_logged_while_the_server_is_down_arrive_once(tmp_path, write_grid, mlflow_server_process,
                                                             fashion_mnist):  # fmt: skip
    server, path, storage = mlflow_server_process, write_grid(GRID), tmp_path / "store"
    (trial,) = spec.load(path).trials
    checkpoints = CheckpointDir(storage / "grid" / trial.id / "checkpoints")
    epoch = lambda: max((e for e, _ in checkpoints.positions()), default=0)  # noqa: E731
    # Fail each request fast, so the outbox's own retrying is what carries the metrics over.
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    env[HOLD_AT] = "2:20"  # the trial waits mid-way through its third epoch until the server is down
    held = StorageLayout(storage).grid("grid").trial(trial.id).root / "held"
    grid = subprocess.Popen(
        mlpgrid_command("run", str(path), "--in-process", "--storage", str(storage), "--tracking-uri", server.url),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until_held(held, grid)
        server.stop()
        held.unlink()  # trains on
        wait_for(lambda: epoch() >= 5, "three epochs without a server", grid)
        server.start()
        out, err = grid.communicate(timeout=300)
    finally:
        grid.kill()
    assert grid.returncode == 0, out + err
    assert "retrying" in err, "the outage was noticed"

    client = MlflowClient(server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("grid").experiment_id], "tags.mlpgrid_role = 'trial'")
    assert run.data.tags["status"] == "finished"
    for key in ("test_error", "train_loss", "images_per_s"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, 31)), f"{key}: every epoch once, none lost or doubled"
