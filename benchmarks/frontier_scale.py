"""The frontier analysis at scale, and intervals that repeated rows do not narrow.

    .venv/bin/python benchmarks/frontier_scale.py [--rows 1000000] [--json frontier_scale.json]

1. A CSV of ``--rows`` trials (model sizes by examples, each distinct, errors from the known
   law of tests/synthetic_law.py with 2% noise) through the real ``mlpgrid frontier --from-csv
   F --json --plot-dir D`` (200 bootstrap resamples, the default): its wall time, and the
   analysis' parts timed in this process (reading the CSV, the fit, the bootstrap, the plots).
2. One draw of the iso-compute grid (243 trials), given once and with every row repeated 768
   times: the 95% intervals of alpha, E_inf and the allocation exponents side by side. A row
   given many times is one configuration, so the intervals should not narrow.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mlpgrid.analysis import frontier, plots  # noqa: E402
from synthetic_law import Law, draw  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` trials, one per (P, N) of a square grid, T = 1, C = 3 P N."""
    side = int(np.ceil(np.sqrt(rows)))
    params, examples = np.meshgrid(np.logspace(4, 9, side), np.logspace(3, 8, side))
    params, examples = params.ravel()[:rows], examples.ravel()[:rows]
    error = Law().error(params, examples) * np.exp(np.random.default_rng(seed).normal(0, 0.02, rows))
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["compute", "error", "params", "examples", "epochs"])
        out.writerows(zip(3 * params * examples, error, params, examples, np.ones(rows), strict=True))


def timed(what: str, timings: dict[str, float], work):  # noqa: ANN001, ANN201
    started = time.perf_counter()
    result = work()
    timings[what] = time.perf_counter() - started
    print(f"  {what}: {timings[what]:.1f} s", flush=True)
    return result


def intervals(points: list[frontier.Point], repeats: int) -> dict[str, list[float]]:
    boot = frontier.bootstrap(frontier.analyse(points), repeats)
    return boot.fit_ci() | boot.allocation_ci()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result: dict = {"rows": args.rows, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "points.csv"
        write_rows(path, args.rows)
        command = [sys.executable, "-m", "mlpgrid", "frontier", "--from-csv", str(path), "--json", "--plot-dir",
                   str(Path(tmp) / "plots"), "--bootstrap", str(args.repeats)]  # fmt: skip
        started = time.perf_counter()
        out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        result["cli_wall_s"] = time.perf_counter() - started
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        report = json.loads(out.stdout)
        print(f"mlpgrid frontier --from-csv ({args.rows:,} rows, {args.repeats} resamples): "
              f"{result['cli_wall_s']:.1f} s; alpha {report['fit']['alpha']:.4f} {report['fit']['ci']['alpha']}, "
              f"frontier of {report['fit']['frontier_points']}", flush=True)  # fmt: skip
        print("the same, in parts:")
        timings: dict[str, float] = {}
        points = timed("read the CSV", timings, lambda: frontier.read_csv(path))
        analysis = timed("analyse", timings, lambda: frontier.analyse(points))
        boot = timed(
            f"bootstrap, {args.repeats} resamples", timings, lambda: frontier.bootstrap(analysis, args.repeats)
        )
        timed("plots", timings, lambda: plots.draw_all(analysis, boot, [], Path(tmp) / "plots-again"))
        result["timings_s"] = timings

    points = draw(Law(), np.random.default_rng(0))
    once, repeated = intervals(points, args.repeats), intervals(points * 768, args.repeats)
    print(f"\n95% intervals, {len(points)} trials given once against each given 768 times:")
    result["intervals"] = {}
    for name in once:
        (lo, hi), (rlo, rhi) = once[name], repeated[name]
        width = (rhi - rlo) / (hi - lo)
        print(f"  {name:>17}: [{lo:.4f}, {hi:.4f}] against [{rlo:.4f}, {rhi:.4f}]: width x{width:.2f}")
        result["intervals"][name] = {"once": once[name], "repeated_768": repeated[name]}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
