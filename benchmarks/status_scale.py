"""`mlpgrid status` and `mlpgrid frontier` on a large grid against a real `mlflow server`.

    python benchmarks/status_scale.py                    # 1,000 trials
    python benchmarks/status_scale.py --trials 300 --json status_scale.json

Starts ``mlflow server`` on 127.0.0.1 (SQLite store in a temporary directory), records a
finished run for every trial of a grid of ``--trials`` B-MLP trials through mlpgrid's own
tracking code (``TrialRun``: params, tags, two epochs of metrics; the test errors follow a
power law in compute, so the frontier has something to fit), then times each command as a user
runs it, in a fresh process, three times each (the median is reported): ``status GRID --json``
and ``frontier GRID --json --bootstrap 0``. Side by side, in this process, it times reading the
grid's runs with mlpgrid's reader (``reader.trial_runs``, the server's REST API) and with
``MlflowClient.search_runs`` page by page, as mlpgrid read them before.

Every worker of a freshly started server answers its first search slowly (16 s for the first,
measured here), as a long-running server does not: the runs are recorded through all of them
first, as a running grid would.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mlflow import MlflowClient  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402

from mlpgrid.grid import spec  # noqa: E402
from mlpgrid.grid.layout import StorageLayout  # noqa: E402
from mlpgrid.tracking import reader, writer  # noqa: E402


def grid_text(trials: int) -> str:
    """A grid of about ``trials`` trials: widths x examples x epochs x seeds."""
    seeds = max(1, trials // (10 * 10 * 5))
    widths = ", ".join(f"B-2/Wi-{16 * (i + 1)}" for i in range(10))
    examples = ", ".join(str(500 * (i + 1)) for i in range(10))
    seed_list = ", ".join(map(str, range(seeds)))
    return (f"name: status-scale\nbase: {{dataset: fashion-mnist}}\ngrid:\n  model: [{widths}]\n"
            f"  examples: [{examples}]\n  epochs: [1, 2, 3, 4, 5]\n  seed: [{seed_list}]\n")  # fmt: skip


def record(grid_run: reader.GridRun, trial: spec.Trial) -> None:
    run = writer.TrialRun.open(grid_run, trial)
    error = 0.05 + 30 * trial.compute**-0.3
    run.log_epochs([{"epoch": e, "train_loss": 1.0, "test_loss": 1.0, "test_error": error * (1.1 - 0.1 * e / 2),
                     "lr": 1e-3, "images_per_s": 1e4, "epoch_seconds": 1.0} for e in (1, 2)])  # fmt: skip
    run.finish(reader.FINISHED)


def timed(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """The median wall time of three runs of ``mlpgrid ARGS``, and the last run."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mlpgrid", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        times.append(time.perf_counter() - started)
    return statistics.median(times), done


def mlflowclient_search(grid_run: reader.GridRun) -> int:
    """The grid's trial runs through ``MlflowClient.search_runs``, page by page; how many."""
    client, found, token = MlflowClient(grid_run.tracking_uri), 0, None
    while True:
        page = client.search_runs([grid_run.experiment_id], reader.TRIAL_RUNS, max_results=1000, page_token=token)
        found, token = found + len(page), page.token
        if not token:
            return found


def search_times(grid_run: reader.GridRun, trials: int) -> dict[str, float]:
    """Seconds to read every trial run: mlpgrid's reader and MlflowClient, alternately, best of three."""
    reader, client = [], []
    for _ in range(3):
        started = time.perf_counter()
        assert len(reader.trial_runs(grid_run)) == trials
        reader.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert mlflowclient_search(grid_run) == trials
        client.append(time.perf_counter() - started)
    return {"reader_s": min(reader), "mlflowclient_s": min(client)}


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
            grid_run = writer.open_grid(grid, uri, StorageLayout(work / "storage"))
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda t: record(grid_run, t), grid.trials))
            print(f"{len(grid.trials)} trials recorded in {time.perf_counter() - started:.0f} s", flush=True)
            searches = search_times(grid_run, len(grid.trials))
            print(f"reading {len(grid.trials)} runs in this process: mlpgrid's reader {searches['reader_s']:.2f} s, "
                  f"MlflowClient {searches['mlflowclient_s']:.2f} s "
                  f"({searches['mlflowclient_s'] / searches['reader_s']:.1f}x)", flush=True)  # fmt: skip
            common = ["--storage", str(work / "storage"), "--tracking-uri", uri]
            status_s, status = timed("status", str(path), "--json", *common)
            frontier_s, frontier = timed("frontier", str(path), "--json", "--bootstrap", "0", *common)
        finally:
            server.stop()
    assert status.returncode == 0, status.stderr[-2000:]
    assert frontier.returncode == 0, frontier.stderr[-2000:]
    finished = json.loads(status.stdout)["totals"].get("finished")
    points = json.loads(frontier.stdout)["points"]
    print(f"median of 3, each in a fresh process: status {status_s:.1f} s ({finished} finished); "
          f"frontier --bootstrap 0 {frontier_s:.1f} s ({points} points)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"trials": len(grid.trials), "status_s": status_s, "frontier_s": frontier_s,
                                         **searches}))  # fmt: skip


if __name__ == "__main__":
    main()
