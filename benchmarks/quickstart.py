"""The quick-start grid through Ray, with trial groups on and off, side by side.

    python benchmarks/quickstart.py                  # --group auto, then --group off
    python benchmarks/quickstart.py --json quickstart.json
    python benchmarks/quickstart.py --fuse            # grouped members fused, against each alone

Each run is the real ``mlpgrid run grids/quickstart.yaml`` (local Ray, MLflow on SQLite) from a
fresh storage directory. Fashion-MNIST is read from where mlpgrid finds it; where it is not
installed, random pixels in its idx layout stand in (speed does not depend on pixel values).
Prints each run's wall time, where it went (from the trials' MLflow records: until the first
trial's first step, trials' start-ups, training, after the last trial ended) and final test
errors, and the speed-up.
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

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grid_overhead import covered, training_intervals  # noqa: E402
from synthetic import write_fashion_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(grid: Path, storage: Path, group: str, env: dict[str, str], timeout: float,
        gpus_per_trial: float | None) -> dict:  # fmt: skip
    command = [sys.executable, "-m", "mlpgrid", "run", str(grid), "--storage", str(storage), "--group", group]
    if gpus_per_trial:
        command += ["--gpus-per-trial", str(gpus_per_trial)]
    started = time.time()
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    ended = time.time()
    wall = ended - started
    errors = {line.split()[0]: float(line.split()[7]) for line in out.stdout.splitlines()
              if len(line.split()) == 9 and line.split()[5] == "finished"}  # fmt: skip
    plan = [line.split("] ", 1)[-1] for line in out.stdout.splitlines() if " workers: " in line or "each alone" in line]
    print(f"--group {group}: {wall:.0f} s, {len(errors)} finished, {plan}", flush=True)
    if out.returncode != 0:
        print(out.stdout[-2000:], out.stderr[-2000:], sep="\n")
    trials = training_intervals(storage, "quickstart")
    timeline = {
        "to_first_launch_s": min(t["start"] - t["startup_s"] for t in trials) - started,
        "to_first_step_s": min(t["start"] for t in trials) - started,
        "startup_median_s": statistics.median(t["startup_s"] for t in trials),
        "startup_max_s": max(t["startup_s"] for t in trials),
        "training_covers_s": covered([(t["start"], t["end"]) for t in trials]),
        "train_s": sum(t["train_s"] for t in trials),
        "after_last_s": ended - max(t["end"] for t in trials),
    }
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in timeline.items()), flush=True)
    return {"group": group, "wall_s": wall, "returncode": out.returncode, "test_errors": errors, "plan": plan,
            "timeline": timeline, "per_trial": trials, "output": out.stdout}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", action="append", help="mlpgrid run --group values; default auto, then off")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--gpus-per-trial", type=float, help="mlpgrid run --gpus-per-trial for every run")
    parser.add_argument("--fuse", action="store_true", help="run.fuse: true (members fused even on the CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not Path(env.get("MLPGRID_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")).is_dir():
            env["MLPGRID_FASHION_MNIST"] = str(write_fashion_mnist(work / "fashion-mnist"))
            print("Fashion-MNIST not installed: random pixels in its layout", flush=True)
        grid = REPO / "grids" / "quickstart.yaml"
        if args.fuse:
            doc = yaml.safe_load(grid.read_text())
            doc["run"] = {**doc.get("run", {}), "fuse": True}
            grid = work / "quickstart.yaml"
            grid.write_text(yaml.safe_dump(doc))
        results = [run(grid, work / f"storage-{g}", g, env, args.timeout, args.gpus_per_trial)
                   for g in args.group or ["auto", "off"]]  # fmt: skip
    first, *others = results
    for other in others:
        same = [t for t in first["test_errors"] if t in other["test_errors"]]
        differ = max((abs(first["test_errors"][t] - other["test_errors"][t]) for t in same), default=float("nan"))
        losses = [{t["trial_id"]: t["train_loss"] for t in r["per_trial"]} for r in (first, other)]
        loss_differ = max((abs(a - losses[1][t]) / abs(losses[1][t]) for t, a in losses[0].items() if t in losses[1]),
                          default=float("nan"))  # fmt: skip
        print(f"--group {first['group']} against --group {other['group']}: {other['wall_s'] / first['wall_s']:.2f}x "
              f"faster ({first['wall_s']:.0f} s against {other['wall_s']:.0f} s); largest difference in final test "
              f"error over {len(same)} trials: {differ:.4f}, in final train loss: {loss_differ:.1e} "
              "relative")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
