"""How well the frontier analysis recovers a known scaling law, over repeated noisy draws.

Trials come from E(P, D) = E_inf + A P^-1 + B D^-0.35 on an iso-compute grid (see
tests/synthetic_law.py). Prints, for fits on log error and on error:
bias and spread of alpha, E_inf and the allocation exponents; the relative error of predicting
the most expensive third of the frontier from a fit on the cheaper two thirds; and how often the
bootstrap intervals hold the truth.

    .venv/bin/python benchmarks/frontier_recovery.py [--draws 30] [--noise 0.02]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mlpgrid.analysis import frontier  # noqa: E402
from synthetic_law import Law, draw  # noqa: E402

QUANTITIES = ("alpha", "e_inf", "params_exponent", "examples_exponent")


def estimates(analysis: frontier.Analysis) -> dict[str, float]:
    return {"alpha": analysis.fit.alpha, "e_inf": analysis.fit.e_inf,
            "params_exponent": analysis.allocation.params_exponent,
            "examples_exponent": analysis.allocation.examples_exponent}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--resamples", type=int, default=100)
    args = parser.parse_args()
    law = Law()
    truth = {"alpha": law.alpha, "e_inf": law.e_inf, "params_exponent": law.params_exponent,
             "examples_exponent": law.examples_exponent}  # fmt: skip
    print(f"truth: {', '.join(f'{k} {v:.4f}' for k, v in truth.items())}; {args.draws} draws, noise {args.noise:.0%}")
    for space in ("log", "linear"):
        start, rng = time.perf_counter(), np.random.default_rng(0)
        found = {k: [] for k in QUANTITIES}
        extrapolation, covered = [], {level: dict.fromkeys(QUANTITIES, 0) for level in (0.68, 0.95)}
        for i in range(args.draws):
            points = draw(law, rng, noise=args.noise)
            analysis = frontier.analyse(points, space=space)
            for k, v in estimates(analysis).items():
                found[k].append(v)
            extrapolation += [r["relative_error"] for r in frontier.holdout(points, 1 / 3, space)]
            boot = frontier.bootstrap(analysis, args.resamples, seed=i)
            for level, hits in covered.items():
                at_level = replace(boot, level=level)
                intervals = at_level.fit_ci() | at_level.allocation_ci()
                for k in QUANTITIES:
                    hits[k] += intervals[k][0] <= truth[k] <= intervals[k][1]
        print(f"\nfit on {space} error ({time.perf_counter() - start:.0f} s)")
        print(f"  {'quantity':18} {'bias':>8} {'spread':>8} {'68% cover':>10} {'95% cover':>10}")
        for k in QUANTITIES:
            values = np.array(found[k])
            print(f"  {k:18} {values.mean() - truth[k]:+8.4f} {values.std():8.4f}"
                  f" {covered[0.68][k] / args.draws:10.2f} {covered[0.95][k] / args.draws:10.2f}")  # fmt: skip
        e = np.array(extrapolation)
        print(f"  extrapolation to the costliest third: relative error mean {e.mean():.2%}, max {e.max():.2%}"
              f" over {len(e)} frontier points")  # fmt: skip


if __name__ == "__main__":
    main()
