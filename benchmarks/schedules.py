"""A grid under its own schedule (cosine) and under wsd with trunks, side by side: what changes.

    python benchmarks/schedules.py                                 # grids/quickstart.yaml
    python benchmarks/schedules.py --grid grids/inductive_bias-small.yaml --in-process --json out.json

Each run is the real ``mlpgrid run`` from a fresh storage directory, then ``mlpgrid status --json``
and ``mlpgrid frontier --json``. The wsd grid is the same file with ``schedule: wsd``,
``cooldown`` and ``cooldown_shape`` set in its base (and ``-wsd`` added to its name), so its trials
that differ only in T train as one trunk. Prints the final test error of every trial under each
schedule, the compute each grid trained against its C, the wall time of each run, and each
frontier's fit and allocation exponents. Fashion-MNIST is read from where mlpgrid finds it; where
it is not installed, random pixels in its layout stand in (then the errors mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import write_fashion_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def mlpgrid(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlpgrid", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def run_grid(grid: Path, storage: Path, extra: list[str], env: dict[str, str], timeout: float,
             bootstrap: int) -> dict:  # fmt: skip
    started = time.time()
    out = mlpgrid("run", str(grid), "--storage", str(storage), *extra, env=env, timeout=timeout)
    wall = time.time() - started
    plan = [line.split("] ", 1)[-1] for line in out.stdout.splitlines() if "wsd trunks" in line]
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-3000:], sep="\n")
    status = json.loads(mlpgrid("status", str(grid), "--storage", str(storage), "--json", env=env,
                                timeout=timeout).stdout)  # fmt: skip
    fit = mlpgrid("frontier", str(grid), "--storage", str(storage), "--json", "--bootstrap", str(bootstrap),
                  env=env, timeout=timeout)  # fmt: skip
    frontier = json.loads(fit.stdout) if fit.returncode == 0 else {"error": fit.stderr.strip()[-500:]}
    trials = status["trials"]
    return {
        "grid": status["grid"], "wall_s": wall, "returncode": out.returncode, "plan": plan,
        "finished": sum(t["state"] == "finished" for t in trials),
        "compute": sum(t["compute"] for t in trials),
        "trained_compute": sum(t["trained_compute"] if t["trained_compute"] is not None else t["compute"]
                               for t in trials),
        "trials": trials, "frontier": frontier,
    }  # fmt: skip


def fit_line(result: dict) -> str:
    frontier = result["frontier"]
    if "error" in frontier:
        return f"no fit: {frontier['error']}"
    fit = frontier["fit"]
    parts = [f"E(C) = {fit['a']:.3g} (C + {fit['b']:.2g})^-{fit['alpha']:.3f} + {fit['e_inf']:.3f}"]
    for name, approach in frontier["approaches"].items():
        if approach is not None:
            parts.append(f"{name}: P* ~ C^{approach['params_exponent']:.2f}, "
                         f"D* ~ C^{approach['examples_exponent']:.2f}")  # fmt: skip
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=REPO / "grids" / "quickstart.yaml")
    parser.add_argument("--cooldown", type=float, default=0.2, help="wsd cooldown, a fraction of T")
    parser.add_argument("--shape", choices=["1-sqrt", "linear"], default="1-sqrt", help="wsd cooldown shape")
    parser.add_argument("--in-process", action="store_true", help="mlpgrid run --in-process (no Ray)")
    parser.add_argument("--bootstrap", type=int, default=100, help="frontier resamples")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    env = dict(os.environ)
    extra = ["--in-process"] if args.in_process else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not Path(env.get("MLPGRID_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")).is_dir():
            env["MLPGRID_FASHION_MNIST"] = str(write_fashion_mnist(work / "fashion-mnist"))
            print("Fashion-MNIST not installed: random pixels in its layout (errors mean nothing)", flush=True)
        doc = yaml.safe_load(args.grid.read_text())
        wsd = dict(
            doc,
            name=f"{doc['name']}-wsd",
            base={**doc["base"], "schedule": "wsd", "cooldown": args.cooldown, "cooldown_shape": args.shape},
        )
        wsd_grid = work / f"{wsd['name']}.yaml"
        wsd_grid.write_text(yaml.safe_dump(wsd, sort_keys=False))
        results = []
        for name, grid in ((doc["base"].get("schedule", "cosine"), args.grid), ("wsd", wsd_grid)):
            result = run_grid(grid, work / name, extra, env, args.timeout, args.bootstrap)
            print(f"{name}: {result['finished']}/{len(result['trials'])} finished in {result['wall_s']:.0f} s; "
                  f"trained {result['trained_compute']:.3e} FLOPs for C = {result['compute']:.3e}"
                  + (f" ({result['plan'][0]})" if result["plan"] else ""), flush=True)  # fmt: skip
            results.append(result | {"schedule": name})
    first, second = results
    by_id = {t["trial_id"]: t for t in second["trials"]}
    print(f"\n{'model':>12} {'N':>6} {'T':>3}  {first['schedule']:>7}  {'wsd':>7}  difference")
    differences = []
    for a in first["trials"]:
        b = next((t for t in by_id.values() if (t["model"], t["examples"], t["epochs"])
                  == (a["model"], a["examples"], a["epochs"])), None)  # fmt: skip
        if b is None or a["test_error"] is None or b["test_error"] is None:
            continue
        differences.append(b["test_error"] - a["test_error"])
        print(f"{a['model']:>12} {a['examples']:>6} {a['epochs']:>3}  {a['test_error']:7.4f}  {b['test_error']:7.4f}  "
              f"{differences[-1]:+.4f}")  # fmt: skip
    if differences:
        mean = sum(differences) / len(differences)
        print(f"wsd - {first['schedule']} final test error over {len(differences)} trials: mean {mean:+.4f}, "
              f"from {min(differences):+.4f} to {max(differences):+.4f}")  # fmt: skip
    print(f"wall: {first['schedule']} {first['wall_s']:.0f} s, wsd {second['wall_s']:.0f} s "
          f"({second['wall_s'] / first['wall_s']:.2f}x); trained compute wsd/{first['schedule']}: "
          f"{second['trained_compute'] / first['trained_compute']:.2f}")  # fmt: skip
    for result in results:
        print(f"frontier, {result['schedule']}: {fit_line(result)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
