"""Reused Ray actors against a one-worker Ray Train job per trial: start-up and wall time of the
same grids through the real ``mlpgrid run``, side by side in one run.

    python benchmarks/executors.py --json executors.json
    python benchmarks/executors.py --quickstart-scale 0.25 --main-job-images 100000 --models B-6/Wi-256

For each grid, ``mlpgrid run`` from a fresh storage directory twice: by default (each Tune trial
trains in a Ray actor that Tune reuses from trial to trial) and with ``--ray-train`` (each Tune
trial fits a ``TorchTrainer`` of one worker). The grids: ``grids/quickstart.yaml`` (Fashion-MNIST,
18 trials; ``--quickstart-scale`` shrinks N and T as ``mlpgrid run --scale`` does) and, on a GPU,
the main job's shape (benchmarks/main_job.py: a synthetic prepared dataset of 64x64x3 images over
10,450 classes, the appendix-A.4 recipe at batch 16384, compiled), each model of ``--models`` for
two epochs. Prints, per grid and path, the wall time, the trials finished, and each trial's
``startup_seconds`` (from the runner asking for it to its first step, as MLflow records it):
median and largest. Where Fashion-MNIST is not installed, random pixels in its layout stand in
(start-up does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from main_job import grid_file, stop_as_a_user, write_dataset  # noqa: E402
from synthetic import write_fashion_mnist  # noqa: E402

from mlpgrid.grid.layout import StorageLayout  # noqa: E402
from mlpgrid.tracking import reader  # noqa: E402

PATHS = {"reused actors": [], "Ray Train, one worker": ["--ray-train"]}


def run(grid: Path, name: str, storage: Path, extra: list[str], timeout: float) -> dict:
    """``mlpgrid run`` of the grid; its wall time and each trial's start-up, from MLflow."""
    started = time.time()
    command = [sys.executable, "-m", "mlpgrid", "run", str(grid), "--storage", str(storage), *extra]
    log = storage.with_name(storage.name + ".out")
    with open(log, "w+") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        returncode: int | None
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:  # what ran is still read out
            stop_as_a_user(proc)
            returncode = None
        out.seek(0)
        output = out.read()
    wall = time.time() - started
    if returncode:
        print(output[-3000:], flush=True)
    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.mlpgrid_role = 'trial'") if experiment else []
    startups = [r.data.metrics["startup_seconds"] for r in runs if "startup_seconds" in r.data.metrics]
    return {
        "returncode": returncode, "timed_out": returncode is None, "wall_s": wall, "trials": len(runs),
        "finished": sum(r.data.tags.get("status") == "finished" for r in runs),
        "startup_median_s": statistics.median(startups) if startups else None,
        "startup_max_s": max(startups, default=None), "startups_s": sorted(startups),
    }  # fmt: skip


def main_job_grid(work: Path, images: int, test: int, models: list[str]) -> Path:
    """main_job.py's grid of ``models`` on ``images`` synthetic images, two epochs each."""
    dataset = write_dataset(work / "synthetic-21k", images, test)
    path = work / "main-job.yaml"
    grid_file(path, dataset, images, test, bare=dict.fromkeys(models, 0.0), seconds=0.0, sizes=[1.0], lengths=[1.0])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart-scale", type=float, default=1.0, help="as mlpgrid run --scale (1: as written)")
    parser.add_argument("--main-job-images", type=int, default=200_000, help="0: no main-job grid")
    parser.add_argument("--models", action="append", help="the main-job grid's models (default: two)")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        if not Path(os.environ.get("MLPGRID_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")).is_dir():
            os.environ["MLPGRID_FASHION_MNIST"] = str(write_fashion_mnist(work / "fashion-mnist"))
            print("Fashion-MNIST not installed: random pixels in its layout", flush=True)
        scale = [] if args.quickstart_scale == 1 else ["--scale", str(args.quickstart_scale)]
        name = "quickstart" if not scale else f"quickstart-scale{args.quickstart_scale:g}"
        grids = [("quick start", REPO / "grids" / "quickstart.yaml", name, scale)]
        if args.main_job_images and torch.cuda.is_available():
            path = main_job_grid(work, args.main_job_images, args.main_job_images // 20,
                                 args.models or ["B-6/Wi-256", "B-12/Wi-512"])  # fmt: skip
            grids.append(("main job", path, "main-job", []))
        for label, grid, grid_name, extra in grids:
            for path_name, flags in PATHS.items():
                storage = work / f"{label}-{path_name}".replace(" ", "-").replace(",", "")
                result = results[f"{label}: {path_name}"] = run(grid, grid_name, storage, extra + flags, args.timeout)
                stopped = f" (stopped at --timeout {args.timeout:g} s)" if result["timed_out"] else ""
                print(f"{label}: {path_name}: {result['finished']}/{result['trials']} finished in "
                      f"{result['wall_s']:.1f} s{stopped}", flush=True)  # fmt: skip
                if args.json:  # written as it goes: a later run that does not end loses none of these
                    args.json.write_text(json.dumps({"device": device, "results": results}, indent=2))
    print(f"\n{device}")
    print(
        f"{'grid: path':>40} | {'wall s':>7} {'finished':>9} | {'start-up median s':>17} {'largest':>8}  "
        "(+: stopped at --timeout)"
    )
    for key, r in results.items():
        median = "-" if r["startup_median_s"] is None else f"{r['startup_median_s']:.1f}"
        largest = "-" if r["startup_max_s"] is None else f"{r['startup_max_s']:.1f}"
        wall = f"{r['wall_s']:.1f}" + ("+" if r["timed_out"] else "")
        print(f"{key:>40} | {wall:>7} {r['finished']:>4}/{r['trials']:<4} | {median:>17} {largest:>8}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
