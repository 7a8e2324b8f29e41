"""Hoffmann et al.'s three approaches side by side: on a known law, and on real published data.

    .venv/bin/python benchmarks/frontier_approaches.py [--draws 100] [--resamples 100]
        [--chinchilla svg_extracted_data.csv] [--json frontier_approaches.json]

1. ``--draws`` draws of the iso-compute grid of tests/synthetic_law.py (243 trials, 2% noise):
   per approach, the mean and spread of P*'s exponent a and D*'s exponent b against the truth,
   and how often the 95% bootstrap intervals (``--resamples``) hold it; E(P, D)'s exponents too.
2. With ``--chinchilla``: the 245 Chinchilla runs Besiroglu et al. (2024) read off Figure 4 of
   Hoffmann et al. (2022) (``svg_extracted_data.csv`` of github.com/Besiroglu/data, columns
   "Model Size", "Training FLOP", "loss"; tokens D = C / 6P as they derive them; not shipped here:
   the repository states no licence). Each approach through the real ``mlpgrid frontier
   --from-csv`` against the published fits, on all 245 runs and without the five of highest
   loss (as the replication fitted them).
3. The wall time of ``mlpgrid frontier --from-csv F --bootstrap 0`` on that CSV (or, without
   ``--chinchilla``, on one synthetic draw), median of five fresh processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mlpgrid.analysis import frontier  # noqa: E402
from synthetic_law import Law, draw  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Published allocation exponents (a: P* ∝ C^a, b: D* ∝ C^b) and their intervals: Hoffmann et al.
# (2022), Table 2 (approach 3's interval as printed); Besiroglu et al. (2024), Table 1, refitting
# approach 3 to these extracted runs: E = 1.82, A = 482.01, B = 2085.43, alpha = 0.3478,
# beta = 0.3658 (standard errors 0.03, 124.58, 1293.23, 0.02, 0.02), so a = beta / (alpha + beta).
PUBLISHED = {
    "envelope": {"a": (0.50, 0.488, 0.502), "b": (0.50, 0.501, 0.512)},
    "isoflop": {"a": (0.49, 0.462, 0.534), "b": (0.51, 0.483, 0.529)},
    "parametric": {"a": (0.46, 0.454, 0.455), "b": (0.54, 0.542, 0.543)},
}
REPLICATION = {"e_inf": (1.82, 0.03), "a": (482.01, 124.58), "b": (2085.43, 1293.23), "alpha": (0.3478, 0.02),
               "beta": (0.3658, 0.02)}  # fmt: skip


def synthetic(draws: int, resamples: int) -> dict:
    law = Law()
    truth = {"a": law.params_exponent, "b": law.examples_exponent}
    found: dict = {name: {"a": [], "b": [], "a_covered": 0, "b_covered": 0} for name in frontier.APPROACHES}
    parametric = {"alpha": [], "beta": [], "alpha_covered": 0, "beta_covered": 0}
    started = time.perf_counter()
    for i in range(draws):
        analysis = frontier.analyse(draw(law, np.random.default_rng(1000 + i)))
        boot = frontier.bootstrap(analysis, resamples, seed=i)
        for name in frontier.APPROACHES:
            fit = analysis.fitted.approach(name)
            if fit is None:
                continue
            ci = boot.allocation_ci(name)
            for key, value, exponent in (("a", fit.params_exponent, "params_exponent"),
                                         ("b", fit.examples_exponent, "examples_exponent")):  # fmt: skip
                found[name][key].append(value)
                low, high = ci[exponent]
                found[name][f"{key}_covered"] += low <= truth[key] <= high
        law_ci = boot.parametric_ci()
        for key, true in (("alpha", law.alpha_p), ("beta", law.beta)):
            parametric[key].append(getattr(analysis.fitted.parametric, key))
            parametric[f"{key}_covered"] += law_ci[key][0] <= true <= law_ci[key][1]
    seconds = time.perf_counter() - started
    print(f"1. {draws} draws of the synthetic law (a = {truth['a']:.4f}, b = {truth['b']:.4f}), {resamples}"
          f" resamples each, {seconds:.0f} s:")  # fmt: skip
    print(f"  {'approach':<11} {'a: mean':>8} {'sd':>7} {'covered':>8}   {'b: mean':>8} {'sd':>7} {'covered':>8}")
    out = {"truth": truth, "draws": draws, "resamples": resamples, "seconds": seconds, "approaches": {}}
    for name, f in found.items():
        row = {k: (float(np.mean(f[k])), float(np.std(f[k])), f[f"{k}_covered"] / draws) for k in ("a", "b")}
        out["approaches"][name] = row
        print(f"  {name:<11} {row['a'][0]:8.4f} {row['a'][1]:7.4f} {row['a'][2]:8.0%}   "
              f"{row['b'][0]:8.4f} {row['b'][1]:7.4f} {row['b'][2]:8.0%}")  # fmt: skip
    for key, true in (("alpha", law.alpha_p), ("beta", law.beta)):
        values = parametric[key]
        covered = parametric[f"{key}_covered"] / draws
        print(f"  E(P, D)'s {key}: {np.mean(values):.4f} (sd {np.std(values):.4f}; truth {true}),"
              f" covered {covered:.0%}")  # fmt: skip
        out[f"parametric_{key}"] = (float(np.mean(values)), float(np.std(values)), covered)
    return out


def chinchilla_csv(source: Path, folder: Path, drop_highest: int) -> Path:
    with source.open(newline="") as f:
        rows = [(float(r["Training FLOP"]), float(r["loss"]), float(r["Model Size"])) for r in csv.DictReader(f)]
    rows = sorted(rows, key=lambda r: r[1])[: len(rows) - drop_highest]
    path = folder / f"chinchilla-{len(rows)}.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["flops", "loss", "params", "tokens"])
        out.writerows((c, loss, p, c / (6 * p)) for c, loss, p in rows)
    return path


def report(path: Path, *options: str) -> tuple[dict, float]:
    command = [sys.executable, "-m", "mlpgrid", "frontier", "--from-csv", str(path), "--json", *options]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout), seconds


def interval(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def real_data(source: Path, folder: Path, resamples: int) -> dict:
    out = {}
    print(f"\n2. {source}: the three approaches against the published fits ({resamples} resamples)")
    for drop in (0, 5):
        path = chinchilla_csv(source, folder, drop)
        result, seconds = report(path, "--bootstrap", str(resamples), "--budget", "5.76e23")
        print(f"  {path.name} ({'all runs' if not drop else f'the {drop} of highest loss left out'}), {seconds:.1f} s:")
        print(f"    {'approach':<11} {'a':>6} {'interval':>16}   published a {'interval':>16}   inside?")
        rows = {}
        for name, fit in result["approaches"].items():
            if fit is None:
                print(f"    {name:<11} not fitted")
                continue
            a, (p, lo, hi) = fit["params_exponent"], PUBLISHED[name]["a"]
            inside = "yes" if lo <= a <= hi else f"no, {a - (lo if a < lo else hi):+.3f} outside"
            print(f"    {name:<11} {a:6.3f} {interval(fit['ci']['params_exponent']):>16}   {p:11.2f}"
                  f" {interval([lo, hi]):>16}   {inside}")  # fmt: skip
            rows[name] = {"a": a, "ci": fit["ci"]["params_exponent"], "published": PUBLISHED[name]["a"]}
        implied = REPLICATION["beta"][0] / (REPLICATION["alpha"][0] + REPLICATION["beta"][0])
        if result["approaches"]["parametric"]:
            print(f"    parametric a against the replication's beta / (alpha + beta) = {implied:.3f}:"
                  f" {result['approaches']['parametric']['params_exponent'] - implied:+.3f}")  # fmt: skip
        law, ci = result["approaches"]["parametric"]["law"], result["approaches"]["parametric"]["law_ci"]
        print("    E(P, D) against the replication's (value, standard error):")
        for key, (value, se) in REPLICATION.items():
            print(f"      {key:>5}: {law[key]:10.4g} {interval(ci[key]):>24}   published {value:g} ± {se:g}"
                  f" ({(law[key] - value) / se:+.2f} standard errors)")  # fmt: skip
        print(f"      starts: {law['converged']} of {law['starts']} reached the best")
        out[path.name] = {"seconds": seconds, "approaches": rows, "law": law, "law_ci": ci,
                          "queries": result["queries"]}  # fmt: skip
    return out


def timing(path: Path) -> dict:
    times = [report(path, "--bootstrap", "0")[1] for _ in range(5)]
    print(f"\n3. mlpgrid frontier --from-csv {path.name} --bootstrap 0: median {statistics.median(times):.2f} s"
          f" (of {', '.join(f'{t:.2f}' for t in times)})")  # fmt: skip
    return {"file": path.name, "seconds": times, "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=100)
    parser.add_argument("--chinchilla", type=Path, help="Besiroglu et al.'s svg_extracted_data.csv")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = {"synthetic": synthetic(args.draws, args.resamples)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.chinchilla:
            result["chinchilla"] = real_data(args.chinchilla, folder, 200)
            result["timing"] = timing(chinchilla_csv(args.chinchilla, folder, 0))
        else:
            path = folder / "synthetic.csv"
            points = draw(Law(), np.random.default_rng(0))
            path.write_text("compute,error,params,examples,epochs\n" + "".join(
                f"{p.compute},{p.error},{p.params},{p.examples},{p.epochs}\n" for p in points))  # fmt: skip
            result["timing"] = timing(path)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
