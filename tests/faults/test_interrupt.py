"""Ctrl-C in `mlpgrid run`, and a driver killed outright: the cut-off trial says `interrupted`
(not `running`) at once, the grid's parent run ends, and a re-run finishes the trial."""

import json
import os
import signal
import subprocess

import pytest
from mlflow import MlflowClient

from conftest import REPO, mlpgrid_command, stop_group, wait_until_held
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader
from mlpgrid.training.checkpoint import HOLD_AT

pytestmark = pytest.mark.slow

GRID = """
run: {checkpoint_every_steps: 5}
base: {model: B-1/Wi-16, examples: 500, batch_size: 50, epochs: 2, optimizer: adamw, lr: 1.0e-3}
"""


def run(path, storage, hold=None):
    """``mlpgrid run`` with SIGINT ignored, as a process started from a background job inherits
    it: the run must set the handling it relies on, whatever its parent left."""
    env = {k: v for k, v in os.environ.items() if k != HOLD_AT} | ({HOLD_AT: hold} if hold else {})
    return subprocess.Popen(mlpgrid_command("run", str(path), "--in-process", "--storage", str(storage)), cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip


def state(path, storage):
    status = subprocess.run(mlpgrid_command("status", str(path), "--storage", str(storage), "--json"), cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)["trials"][0]["state"]


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_a_cut_off_trial_says_so_and_resumes(tmp_path, write_grid, fashion_mnist, how):
    path, storage = write_grid(GRID), tmp_path / "store"
    grid = spec.load(path)
    (trial,) = grid.trials
    driver = run(path, storage, hold="0:5")
    try:
        wait_until_held(StorageLayout(storage).grid(grid.name).trial(trial.id).root / "held", driver)
        os.killpg(driver.pid, how)  # Ctrl-C reaches the terminal's whole process group
        out, _ = driver.communicate(timeout=120)
    finally:
        stop_group(driver)
    assert driver.returncode != 0, out
    grid_run = reader.find_grid(grid, reader.tracking_uri(StorageLayout(storage)))
    client = MlflowClient(grid_run.tracking_uri)
    assert state(path, storage) == "interrupted"
    if how == signal.SIGINT:  # the driver recorded it as it stopped, and said so
        assert driver.returncode == 130 and "Stopped by Ctrl-C" in out and "Run the same command again" in out, out
        (cut,) = reader.trial_runs(grid_run).values()
        assert cut.tags["status"] == "interrupted" and cut.status == "KILLED"
        assert client.get_run(grid_run.parent_run_id).info.status == "KILLED"

    again = run(path, storage)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    (done,) = reader.trial_runs(grid_run).values()
    assert done.tags["status"] == "finished" and done.status == "FINISHED"
    assert client.get_run(grid_run.parent_run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(done.run_id, "test_error")] == [1, 2]
    assert state(path, storage) == "finished"
