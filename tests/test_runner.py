"""The grid runner on a real local Ray, with a real MLflow store (and server)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow import MlflowClient
from mlflow_server import free_port

from conftest import (
    REPO,
    final_checkpoint,
    mlpgrid_command,
    start_driver,
    stop_group,
    wait_until_gone,
    wait_until_held,
    without_timing,
)
from mlpgrid.execution.runner import execute, pending_tasks
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader, writer
from mlpgrid.training.checkpoint import HOLD_AT, CheckpointDir

pytestmark = pytest.mark.slow

SMALL = "base: {model: B-1/Wi-16, examples: 1000, batch_size: 50}\n"
BASE = "base: {model: B-1/Wi-16, examples: 1000, batch_size: 50, optimizer: adamw, lr: 1.0e-3}\n"


def mlpgrid(*args, timeout=300):
    return subprocess.run(mlpgrid_command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def runs_of(path, storage, uri=None):
    grid = spec.load(path)
    grid_run = reader.find_grid(grid, reader.tracking_uri(StorageLayout(storage), uri))
    return reader.trial_runs(grid_run) if grid_run else {}


def test_grid_runs_on_ray_once_per_trial_and_resumes_only_new_trials(tmp_path, write_grid, fashion_mnist):
    three = SMALL + "zip:\n  epochs: [1, 2, 1]\n  lr: [1.0e-3, 1.0e-3, 1.0e+12]\n  optimizer: [adamw, adamw, sgd]\n"
    path, storage = write_grid(three), tmp_path / "store"
    first = mlpgrid("run", str(path), "--storage", str(storage))
    assert first.returncode == 1, first.stdout + first.stderr
    assert "1 of 3 trials run did not finish" in first.stderr and "diverged: training loss is" in first.stderr
    assert "Ray: 2 CPUs" in first.stdout and "started in" in first.stdout

    grid = spec.load(path)
    recorded = runs_of(path, storage)
    assert set(recorded) == {t.id for t in grid.trials}, "exactly one run per trial"
    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    for trial in grid.trials:
        run = recorded[trial.id]
        tags = run.tags
        assert tags["model"] == "B-1/Wi-16" and tags["params"] == str(trial.params)
        assert tags["examples"] == "1000" and tags["epochs"] == str(trial.config.epochs)
        assert float(tags["compute"]) == pytest.approx(trial.compute) and tags["forward_flops"] == str(
            trial.forward_flops
        )
        assert tags["ray_trial_id"] and tags["ray_node_id"] and tags["mlflow.parentRunId"]
        assert run.params["lr"] == str(trial.config.lr) and run.params["seed"] == "0"
        if trial.config.lr > 1:
            assert tags["status"] == "diverged" and "training loss is" in tags["error"]
            assert run.status == "FAILED"
            continue
        assert tags["status"] == "finished" and run.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.run_id, "test_error")]
        assert steps == list(range(1, trial.config.epochs + 1)), "one value per epoch, no gaps"
        for key in ("train_loss", "images_per_s", "tflops", "lr", "startup_seconds"):
            assert key in run.metrics
        assert tags["data_from"] == "object store", "the driver shares the dataset with every trial"
        artifacts = [a.path for a in client.list_artifacts(run.run_id)]
        assert "trial_config.json" in artifacts and tags["checkpoint"].endswith("checkpoints")

    status = mlpgrid("status", str(path), "--storage", str(storage), "--json")
    report = json.loads(status.stdout)
    assert report["totals"] == {"diverged": 1, "finished": 2}
    assert {r["trial_id"]: r["last_epoch"] for r in report["trials"]}[grid.trials[1].id] == 2

    # A new axis value: only the new trial runs; finished and diverged trials stay untouched.
    four = (
        three.replace("[1, 2, 1]", "[1, 2, 1, 3]")
        .replace("1.0e+12]", "1.0e+12, 1.0e-3]")
        .replace("sgd]", "sgd, adamw]")
    )
    write_grid(four)
    second = mlpgrid("run", str(path), "--storage", str(storage))
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("] start ") == 1, second.stdout
    after = runs_of(path, storage)
    assert len(after) == 4
    for tid, run in recorded.items():
        assert after[tid].run_id == run.run_id and after[tid].end_time == run.end_time
    assert "3 finished" in second.stdout and "1 diverged" in second.stdout


def test_grid_against_a_real_mlflow_server(tmp_path, write_grid, mlflow_server, fashion_mnist):
    path, storage = write_grid(BASE + "grid:\n  epochs: [1]\n"), tmp_path / "store"
    result = mlpgrid("run", str(path), "--storage", str(storage), "--tracking-uri", mlflow_server)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (storage / "mlflow.db").exists(), "nothing went to the local store"
    (run,) = runs_of(path, storage, mlflow_server).values()
    assert run.tags["status"] == "finished" and "test_error" in run.metrics
    artifacts = [a.path for a in MlflowClient(mlflow_server).list_artifacts(run.run_id)]
    assert "trial_config.json" in artifacts


def test_unreachable_tracking_server_fails_before_any_trial(tmp_path, write_grid, fashion_mnist):
    path = write_grid(BASE + "grid:\n  epochs: [1]\n")
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    result = subprocess.run(
        mlpgrid_command("run", str(path), "--storage", str(tmp_path / "s"), "--tracking-uri", f"http://127.0.0.1:{free_port()}"),
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1 and "cannot use MLflow tracking URI http://127.0.0.1:" in result.stderr
    assert not (tmp_path / "s").exists()


KILL_GRID = """
run: {checkpoint_every_steps: 50}
base: {model: B-2/Wi-128, batch_size: 100, optimizer: adamw, lr: 1.0e-3}
zip:
  examples: [1000, 10000, 2000]
  epochs: [1, 4, 1]
"""


def test_sigterm_stops_a_run_that_says_what_it_kept_and_resumes(tmp_path, write_grid, fashion_mnist, monkeypatch):
    """SIGTERM (as a batch system sends) or Ctrl-C at a point this test chooses: the run stops its
    trials, marks the one cut off interrupted at its checkpoint, says what it kept and how to go on
    (exit 143 as for a process ended by SIGTERM), and the same command resumes it."""
    text = "run: {checkpoint_every_steps: 5}\n" + SMALL + "grid: {epochs: [3], lr: [1.0e-3, 2.0e-3]}\n"
    path, storage = write_grid(text), tmp_path / "store"
    grid = spec.load(path)
    first, second = grid.trials
    held = StorageLayout(storage).grid(grid.name).trial(first.id).root / "held"
    monkeypatch.setenv(HOLD_AT, "1:10")  # the first trial holds after its checkpoint at step 10 of epoch 2
    driver = start_driver(path, storage, "--group", "off", "--max-concurrent", "1")
    try:
        wait_until_held(held, driver)
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=180)
    finally:
        stop_group(driver)
    assert driver.returncode == 143, out
    assert "SIGTERM: stopping" in out and "Traceback" not in out, out
    assert (f"Stopped by SIGTERM. Kept: no trial ended; 1 interrupted, each at its last checkpoint "
            f"({first.id[:8]} epoch 1/3); 1 not started. Run the same command again to resume") in out, out  # fmt: skip
    recorded = runs_of(path, storage)
    assert recorded[first.id].tags["status"] == "interrupted" and second.id not in recorded

    monkeypatch.delenv(HOLD_AT)
    again = mlpgrid("run", str(path), "--storage", str(storage), "--group", "off")
    assert again.returncode == 0, again.stdout + again.stderr
    state = final_checkpoint(storage, grid, first)
    assert state["resumed_from"] == [[1, 10]], "resumed from the checkpoint it stopped at"


def test_killed_driver_resumes_without_rerunning_or_duplicating(tmp_path, write_grid, fashion_mnist, monkeypatch):
    path, storage = write_grid(KILL_GRID), tmp_path / "store"
    grid = spec.load(path)
    quick, long, _ = grid.trials
    long_dir = StorageLayout(storage).grid(grid.name).trial(long.id)
    long_ckpt = CheckpointDir(long_dir.checkpoints)

    monkeypatch.setenv(HOLD_AT, "1:50")  # the long trial stops after its checkpoint mid-epoch 2
    driver = start_driver(path, storage)
    try:
        deadline = time.monotonic() + 240
        # Kill once the quick trial has finished and the long one holds mid-epoch 2.
        while True:
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline, "the grid did not get far enough"
            # Ask MLflow only once training is under way: the driver sets the store up before.
            if (long_dir.root / "held").exists():
                recorded = runs_of(path, storage)
                if quick.id in recorded and recorded[quick.id].tags.get("status") == "finished":
                    break
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        stop_group(driver)
    wait_until_gone(int((long_dir.root / "held").read_text().split()[1]))
    monkeypatch.delenv(HOLD_AT)
    before = runs_of(path, storage)
    assert before[long.id].tags["status"] == "running", "cut off mid-trial"

    resumed = start_driver(path, storage)
    try:
        out, _ = resumed.communicate(timeout=300)
    finally:
        stop_group(resumed)
    assert resumed.returncode == 0, out
    assert f"[{quick.id[:8]}]" not in out and f"[{long.id[:8]}]" in out, "a finished trial is not run again"
    after = runs_of(path, storage)
    assert len(after) == 3 and all(r.tags["status"] == "finished" for r in after.values())
    assert after[quick.id].run_id == before[quick.id].run_id
    assert after[quick.id].end_time == before[quick.id].end_time
    assert after[long.id].run_id == before[long.id].run_id

    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    steps = [m.step for m in client.get_metric_history(after[long.id].run_id, "test_error")]
    assert steps == [1, 2, 3, 4], "no epoch lost or logged twice"
    state = torch.load(long_ckpt.file(4, 0), weights_only=True)
    assert state["resumed_from"] == [[1, 50]], "the long trial continued from where it was cut off"

    # The same trial run start to finish in one go, in this process with the Ray worker's
    # thread count, ends with the same weights.
    assert after[long.id].tags["torch_threads"] == "1"
    reference = tmp_path / "reference"
    grid_run = writer.open_grid(grid, reader.tracking_uri(StorageLayout(reference)), StorageLayout(reference))
    (task,) = [t for t in pending_tasks(grid, StorageLayout(reference), grid_run) if t.trial.id == long.id]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert execute(task) == "finished"
    finally:
        torch.set_num_threads(threads)
    expected = torch.load(CheckpointDir(task.layout.checkpoints).file(4, 0), weights_only=True)
    assert without_timing(state["history"]) == without_timing(expected["history"])
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), name


TWO_NODE_GRID = """
run: {checkpoint_every_steps: 50}
base: {model: B-2/Wi-64, examples: 30000, batch_size: 100, optimizer: adamw, lr: 1.0e-3, epochs: 3}
grid:
  seed: [1, 2]
"""


def test_trials_use_both_nodes_and_survive_losing_one(tmp_path, write_grid, fashion_mnist):
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from mlpgrid.execution.progress import Progress
    from mlpgrid.execution.ray_tune import RayOptions, run_on_ray

    path, storage = write_grid(TWO_NODE_GRID), tmp_path / "store"
    grid = spec.load(path)
    grid_run = writer.open_grid(grid, reader.tracking_uri(StorageLayout(storage)), StorageLayout(storage))
    tasks = pending_tasks(grid, StorageLayout(storage), grid_run)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker_node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    head_id = cluster.head_node.node_id
    # Without --address a grid starts a Ray of its own: it never joins (nor loses) this cluster.
    own = ("import ray, sys; from mlpgrid.execution.ray_tune import start_ray; from mlpgrid.grid.layout import "
           "StorageLayout; start_ray(None, StorageLayout(sys.argv[1])); print(ray.get_runtime_context().gcs_address); "
           "ray.shutdown()")  # fmt: skip
    local = subprocess.run([sys.executable, "-c", own, str(tmp_path / "own")],
                           cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert local.returncode == 0 and local.stdout.strip() not in ("", cluster.address), local.stdout + local.stderr
    killed: dict[str, str] = {}

    def kill_worker_node_mid_trial():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for tid, run in reader.trial_runs(grid_run).items():
                on_worker = run.tags.get("ray_node_id") == worker_node.node_id
                attempt_logged = "startup_seconds" in run.metrics  # its outbox is slow on a loaded machine
                ckpt = CheckpointDir(storage / grid.name / tid / "checkpoints")
                if on_worker and attempt_logged and any(epoch >= 1 for epoch, _ in ckpt.positions()):
                    cluster.remove_node(worker_node, allow_graceful=False)
                    killed["trial"] = tid
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_worker_node_mid_trial, daemon=True)
    try:
        ray.init(address=cluster.address)
        watcher.start()
        run_on_ray(
            tasks,
            None,
            grid,
            StorageLayout(storage),
            RayOptions(address=cluster.address, retries=2),
            Progress([t.trial for t in tasks]),
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    watcher.join(timeout=5)
    assert "trial" in killed, "a trial ran on the worker node and was cut off there"

    recorded = reader.trial_runs(grid_run)
    assert len(recorded) == 2 and all(r.tags["status"] == "finished" for r in recorded.values())
    moved = recorded[killed["trial"]]
    assert moved.tags["ray_node_id"] == head_id, "the retry ran on the surviving node"
    client = MlflowClient(grid_run.tracking_uri)
    assert len(client.get_metric_history(moved.run_id, "startup_seconds")) == 2, "two attempts"
    assert [m.step for m in client.get_metric_history(moved.run_id, "test_error")] == [1, 2, 3]
    final = torch.load(
        CheckpointDir(storage / grid.name / killed["trial"] / "checkpoints").file(3, 0), weights_only=True
    )
    assert final["resumed_from"] and final["resumed_from"][0][0] >= 1, "the retry resumed from a checkpoint"


@pytest.mark.slow
def test_trials_that_ray_cannot_place_give_up_with_the_reason(tmp_path, write_grid, fashion_mnist):
    """Trials asking for more cores than the cluster has: Tune alone would wait forever."""
    path = write_grid(BASE + "grid:\n  epochs: [1]\n")
    result = subprocess.run(mlpgrid_command("run", str(path), "--storage", str(tmp_path / "s"), "--cpus-per-trial",
                                            "64", "--wait-for-resources", "5"),
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "gave up after 5 s with no trial running: Ray could not place trials asking for 64 CPU each" in result.stderr
    assert "(--wait-for-resources)" in result.stderr and "pending: did not run to the end" in result.stderr
