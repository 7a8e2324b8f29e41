"""A real ``mlflow server`` on 127.0.0.1, for the tests (see conftest) and the benchmarks."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 over a SQLite store under ``root``; it can be
    stopped and started again on the same port, as an operator restarting it would."""

    def __init__(self, root: Path, workers: int | None = 1):
        self.root, self.port, self.workers = root, free_port(), workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        workers = ["--workers", str(self.workers)] if self.workers else []
        log = (self.root / "server.log").open("ab")  # a file, not a pipe nobody reads while it serves
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), *workers,
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination",
             str(self.root / "art")],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None, (self.root / "server.log").read_text()
                assert time.monotonic() < deadline, "mlflow server did not come up"
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server and its workers (by process group)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
