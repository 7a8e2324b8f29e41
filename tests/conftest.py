import contextlib
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow_server import MlflowServer

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path(os.environ.get("MLPGRID_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` (uint8) in the idx layout MNIST and Fashion-MNIST ship in."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_fashion_mnist_subset(root: Path, train: int, test: int) -> Path:
    """Fashion-MNIST's first ``train`` and ``test`` images (and labels) in its own layout: the real
    images, fewer of them (evaluating a patch model on all 10,000 test images takes minutes on a CPU)."""
    from mlpgrid.data.idx import find_idx, read_idx

    root.mkdir(parents=True)
    for stem, n in (("train-images-idx3-ubyte", train), ("train-labels-idx1-ubyte", train),
                    ("t10k-images-idx3-ubyte", test), ("t10k-labels-idx1-ubyte", test)):  # fmt: skip
        write_idx(root / stem, read_idx(find_idx(FASHION_MNIST, stem))[:n])
    return root


@pytest.fixture
def fashion_mnist() -> Path:
    if not FASHION_MNIST.is_dir():
        pytest.fail(f"Fashion-MNIST not found at {FASHION_MNIST}: install Debian's dataset-fashion-mnist")
    return FASHION_MNIST


@pytest.fixture
def write_grid(tmp_path):
    def write(text: str, name: str = "grid.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def mlpgrid_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlpgrid", *args]


def without_timing(history: list[dict]) -> list[dict]:
    """Epoch metrics less the timings, which differ between runs of the same trial."""
    from mlpgrid.grid import metrics

    return [{k: v for k, v in m.items() if k not in metrics.TIMING} for m in history]


def final_checkpoint(storage: Path, grid, trial) -> dict:
    """The state a finished trial of ``grid`` left under ``storage``: its checkpoint after the last epoch."""
    import torch

    from mlpgrid.training.checkpoint import CheckpointDir

    checkpoints = CheckpointDir(storage / grid.name / trial.id / "checkpoints")
    assert checkpoints.positions()[-1] == (trial.config.epochs, 0)
    return torch.load(checkpoints.file(trial.config.epochs, 0), weights_only=True)


def start_driver(path: Path, storage: Path, *options: str) -> subprocess.Popen:
    """``mlpgrid run`` on Ray in a session of its own, so whatever Ray leaves behind can be stopped."""
    return subprocess.Popen(
        mlpgrid_command("run", str(path), "--storage", str(storage), *options),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def wait_until_held(held: Path, process: subprocess.Popen, timeout_s: float = 300) -> int:
    """Wait for the ``held`` file a trial writes at ``MLPGRID_HOLD_AT`` while ``process`` runs;
    returns the pid of the process holding there."""
    deadline = time.monotonic() + timeout_s
    while not held.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"nothing reached the chosen point ({held})"
        time.sleep(0.1)
    return int(held.read_text().split()[1])


def kill_the_recording_worker(path: Path, storage: Path, trial_root: Path, timeout_s: float = 300) -> tuple[int, str]:
    """``mlpgrid run`` of the grid at ``path`` on Ray, its one trial held at ``MLPGRID_HOLD_AT``
    (set by the caller): the process holding there, the one its MLflow run names as its worker,
    is SIGKILLed and the run left to finish. Returns the killed pid and the run's output; fails
    unless the run exits 0."""
    from mlpgrid.grid import spec
    from mlpgrid.grid.layout import StorageLayout
    from mlpgrid.tracking import reader

    uri = reader.tracking_uri(StorageLayout(storage))
    driver = start_driver(path, storage)
    try:
        victim = wait_until_held(trial_root / "held", driver, timeout_s)
        (run,) = reader.trial_runs(reader.find_grid(spec.load(path), uri)).values()
        assert int(run.tags["worker_pid"]) == victim, "the process holding records the trial"
        os.kill(victim, signal.SIGKILL)
        out, _ = driver.communicate(timeout=timeout_s)
    finally:
        stop_group(driver)
    assert driver.returncode == 0, out
    return victim, out


def wait_until_gone(pid: int, timeout_s: float = 120) -> None:
    """Wait for process ``pid`` to exit: a Ray worker outlives its killed driver until it sees
    its raylet gone, and holds its trial until then."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":  # exited, its files (and locks) closed, not yet reaped
            return
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.1)


def stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_server_process(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_process):
    """The URL of a real ``mlflow server`` on 127.0.0.1, stopped (with its workers) afterwards."""
    return mlflow_server_process.url
