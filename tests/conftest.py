import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

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
    from mlpgrid import metrics

    return [{k: v for k, v in m.items() if k not in metrics.TIMING} for m in history]


def final_checkpoint(storage: Path, grid, trial) -> dict:
    """The state a finished trial of ``grid`` left under ``storage``: its checkpoint after the last epoch."""
    import torch

    from mlpgrid.checkpoint import CheckpointDir

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


def stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 over a SQLite store under ``root``; it can be
    stopped and started again on the same port, as an operator restarting it would."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "art")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None, self.process.stderr.read().decode()
                assert time.monotonic() < deadline, "mlflow server did not come up"
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and its workers (by process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)


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
