"""`mlpgrid status` and `mlpgrid frontier` on a large grid against a real `mlflow server`.

    python benchmarks/status_scale.py                    # 1,000 trials
    python benchmarks/status_scale.py --trials 300 --json status_scale.json

Starts ``mlflow server`` on 127.0.0.1 (SQLite store in a temporary directory), records a
finished run for every trial of a grid of ``--trials`` B-MLP trials through mlpgrid's own
tracking code (``TrialRun``: params, tags, two epochs of metrics; the test errors follow a
power law in compute, so the frontier has something to fit), then times each command as a user
runs it, in a fresh process: ``status GRID --json`` and ``frontier GRID --json --bootstrap 0``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mlflow_server import MlflowServer  # noqa: E402

from mlpgrid import spec, tracking  # noqa: E402
from mlpgrid.layout import StorageLayout  # noqa: E402


def grid_text(trials: int) -> str:
    """A grid of about ``trials`` trials: widths x examples x epochs x seeds."""
    seeds = max(1, trials // (10 * 10 * 5))
    widths = ", ".join(f"B-2/Wi-{16 * (i + 1)}" for i in range(10))
    examples = ", ".join(str(500 * (i + 1)) for i in range(10))
    seed_list = ", ".join(map(str, range(seeds)))
    return (f"name: status-scale\nbase: {{dataset: fashion-mnist}}\ngrid:\n  model: [{widths}]\n"
            f"  examples: [{examples}]\n  epochs: [1, 2, 3, 4, 5]\n  seed: [{seed_list}]\n")  # fmt: skip


def record(grid_run: tracking.GridRun, trial: spec.Trial) -> None:
    run = tracking.TrialRun.open(grid_run, trial)
    error = 0.05 + 30 * trial.compute**-0.3
    run.log_epochs([{"epoch": e, "train_loss": 1.0, "test_loss": 1.0, "test_error": error * (1.1 - 0.1 * e / 2),
                     "lr": 1e-3, "images_per_s": 1e4, "epoch_seconds": 1.0} for e in (1, 2)])  # fmt: skip
    run.finish(tracking.FINISHED)


def timed(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlpgrid", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "grid.yaml"
        path.write_text(grid_text(args.trials))
        grid = spec.load(path)
        server = MlflowServer(work, workers=None)  # as many workers as mlflow server starts by default
        server.start()
        uri = server.url
        try:
            grid_run = tracking.open_grid(grid, uri, StorageLayout(work / "storage"))
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda t: record(grid_run, t), grid.trials))
            print(f"{len(grid.trials)} trials recorded in {time.perf_counter() - started:.0f} s", flush=True)
            common = ["--storage", str(work / "storage"), "--tracking-uri", uri]
            status_s, status = timed("status", str(path), "--json", *common)
            frontier_s, frontier = timed("frontier", str(path), "--json", "--bootstrap", "0", *common)
        finally:
            server.stop()
    assert status.returncode == 0, status.stderr[-2000:]
    assert frontier.returncode == 0, frontier.stderr[-2000:]
    finished = json.loads(status.stdout)["totals"].get("finished")
    points = json.loads(frontier.stdout)["points"]
    print(f"status: {status_s:.1f} s ({finished} finished); frontier --bootstrap 0: {frontier_s:.1f} s "
          f"({points} points)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"trials": len(grid.trials), "status_s": status_s, "frontier_s": frontier_s}))


if __name__ == "__main__":
    main()
