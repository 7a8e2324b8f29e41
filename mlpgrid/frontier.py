"""The compute-optimal frontier: which error compute C buys, and how to split C between
parameters P and examples.

The input is one :class:`Point` per finished trial. :func:`analyse` then, as Bachmann et al.
(2023) and Hoffmann et al. (2022) do:

1. Picks the best settings: trials that differ only in their seed are averaged, and of each
   (model, N, T) the best over the other swept settings (learning rate, batch size, ...) is
   kept, as the NFNet scaling study does.
2. Takes the frontier: the lower envelope of error vs compute, the points no cheaper point beats.
3. Fits E(C) = a (b + C)^-alpha + E_inf to the frontier with ``scipy.optimize.curve_fit``, by
   least squares on log E by default (see :func:`fit_power_law` for why).
4. Fits the compute-optimal allocation P*(C) = k_P C^a_P and D*(C) = k_D C^a_D, where D = N T
   is the examples seen (Hoffmann et al.'s approach 1: the best point of each compute bin).
5. Fits the bottlenecked laws E(P) and E(N): the best error per model size and per subset
   size, as E_inf + A x^-alpha with E_inf from the E(C) fit.

:func:`bootstrap` repeats all of it on trials resampled with replacement; intervals are
percentiles of the repeats.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import curve_fit

from mlpgrid.points import Point

MIN_FRONTIER_POINTS = 5  # E(C) has 4 parameters: at least one point more to judge the fit
MIN_ALLOCATION_BINS = 3  # a line through log C needs more than 2 points to mean anything
MIN_LAW_POINTS = 3
MAX_ALPHA = 4.0  # an exponent at this bound means the frontier does not constrain it
CSV_COLUMNS = ("compute", "error", "params", "examples", "epochs")


class FitError(ValueError):
    """The points cannot support the fit; the message says what is missing."""


def read_csv(path: str | Path) -> list[Point]:
    """Points from a CSV with columns compute,error,params,examples,epochs (and optionally
    model,trial_id,lr,batch_size); every bad cell is reported with its line and column."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise FitError(f"{path}: missing column(s) {', '.join(missing)}; found: {', '.join(columns) or 'none'}")
        points, problems = [], []
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            numbers = {}
            for column in CSV_COLUMNS:
                try:
                    numbers[column] = float(row[column])
                except ValueError:
                    problems.append(f"{path}: line {line}: {column}: {row[column]!r} is not a number")
                    continue
                if not math.isfinite(numbers[column]) or numbers[column] <= 0:
                    problems.append(f"{path}: line {line}: {column}: {row[column]} must be positive and finite")
            settings = tuple((k, row[k]) for k in ("lr", "batch_size") if row.get(k))
            if len(numbers) == len(CSV_COLUMNS):
                points.append(Point(**numbers, model=row.get("model", ""), trial_id=row.get("trial_id", ""),
                                    settings=settings))  # fmt: skip
        if problems:
            more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
            raise FitError("\n".join(problems[:20] + more))
    if not points:
        raise FitError(f"{path}: no rows")
    return points


# --- selection ---------------------------------------------------------------------------


def best_settings(points: list[Point]) -> list[Point]:
    """One point per (model, N, T): seeds averaged, then the best of the other settings."""
    seeds: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        seeds[(p.key(), p.settings)].append(p)
    best: dict[tuple, Point] = {}
    for (key, _), group in seeds.items():
        mean = dataclasses.replace(group[0], error=float(np.mean([p.error for p in group])))
        if key not in best or mean.error < best[key].error:
            best[key] = mean
    return sorted(best.values(), key=lambda p: (p.compute, p.error))


def lower_envelope(points: list[Point]) -> list[Point]:
    """The points that no point of lower or equal compute beats, by increasing compute."""
    frontier: list[Point] = []
    for p in sorted(points, key=lambda p: (p.compute, p.error)):
        if not frontier or p.error < frontier[-1].error:
            frontier.append(p)
    return frontier


# --- E(C) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLaw:
    """E(C) = a (b + C)^-alpha + e_inf."""

    a: float
    b: float
    alpha: float
    e_inf: float

    def __call__(self, compute: Any) -> Any:
        return self.a * (self.b + np.asarray(compute, dtype=float)) ** -self.alpha + self.e_inf

    def as_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "alpha": self.alpha, "e_inf": self.e_inf}


def fit_power_law(compute: np.ndarray, error: np.ndarray, space: str = "log") -> PowerLaw:
    """Fit E(C) = a (b + C)^-alpha + E_inf with ``curve_fit`` (trust-region, bounded).

    ``space="log"`` (default) minimises the squared differences of log E: every point counts
    by its relative miss. On a frontier the error falls several-fold, and in linear space the
    cheap, high-error points dominate while the expensive end, the one extrapolation depends
    on, is fitted loosely (``benchmarks/frontier_recovery.py`` measures both). ``"linear"`` is
    the paper's plain least squares on E.

    Compute is rescaled by the smallest C so that the parameters are of order one; several
    starting points guard against local minima. Raises :class:`FitError` on failure.
    """
    compute, error = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    if len(compute) < MIN_FRONTIER_POINTS:
        raise FitError(
            f"the frontier has {len(compute)} point(s); fitting E(C) = a(b+C)^-alpha + E_inf needs at least"
            f" {MIN_FRONTIER_POINTS}: add trials at more compute budgets (models, N or T)"
        )
    scale = compute.min()
    x = compute / scale
    ceiling = error.min() * (1 - 1e-9)

    def model(x: np.ndarray, log_a: float, b: float, alpha: float, e_inf: float) -> np.ndarray:
        e = np.exp(log_a) * (b + x) ** -alpha + e_inf
        return np.log(e) if space == "log" else e

    target = np.log(error) if space == "log" else error
    bounds = ([-50.0, 0.0, 1e-3, 0.0], [50.0, float(x.max()), MAX_ALPHA, ceiling])
    best, best_cost = None, np.inf
    for e_inf0 in (0.0, 0.5 * ceiling, 0.9 * ceiling):
        slope, intercept = np.polyfit(np.log(x), np.log(error - e_inf0), 1)
        alpha0 = float(np.clip(-slope, 0.01, MAX_ALPHA * 0.9))
        for b0 in (0.0, 1.0):
            start = [float(np.clip(intercept, -49, 49)), min(b0, float(x.max())), alpha0, e_inf0]
            try:
                theta, _ = curve_fit(model, x, target, p0=start, bounds=bounds, method="trf", max_nfev=5000)
            except (RuntimeError, ValueError):
                continue
            cost = float(np.sum((model(x, *theta) - target) ** 2))
            if np.all(np.isfinite(theta)) and cost < best_cost:
                best, best_cost = theta, cost
    if best is None:
        raise FitError(f"fitting E(C) to the {len(x)} frontier points did not converge")
    log_a, b, alpha, e_inf = (float(v) for v in best)
    if alpha >= MAX_ALPHA * 0.999 or alpha <= 1.001e-3:
        raise FitError(
            f"the fit of E(C) to the {len(x)} frontier points is degenerate (alpha = {alpha:.3g} at its bound):"
            " the error does not fall as a power of compute over this range"
        )
    return PowerLaw(a=math.exp(log_a) * scale**alpha, b=b * scale, alpha=alpha, e_inf=e_inf)


# --- allocation and bottlenecked laws -----------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """P*(C) = 10^params_log_coef C^params_exponent, and the same for D* = (N T)*."""

    params_exponent: float
    params_log_coef: float
    examples_exponent: float
    examples_log_coef: float
    bins: tuple[Point, ...]  # the best point of each compute bin

    def params(self, compute: Any) -> Any:
        return 10 ** (self.params_log_coef + self.params_exponent * np.log10(compute))

    def examples_seen(self, compute: Any) -> Any:
        return 10 ** (self.examples_log_coef + self.examples_exponent * np.log10(compute))


def best_per_bin(points: list[Point], bins_per_decade: float = 4) -> list[Point]:
    """The lowest-error point of each compute bin (bins of equal width in log C)."""
    logs = np.log10([p.compute for p in points])
    count = max(1, math.ceil((logs.max() - logs.min()) * bins_per_decade))
    edges = np.linspace(logs.min(), logs.max(), count + 1)
    which = np.clip(np.searchsorted(edges, logs, side="right") - 1, 0, count - 1)
    best: dict[int, Point] = {}
    for b, p in zip(which, points, strict=True):
        if b not in best or p.error < best[b].error:
            best[b] = p
    return [best[b] for b in sorted(best)]


def fit_allocation(points: list[Point], bins_per_decade: float = 4) -> Allocation:
    bins = best_per_bin(points, bins_per_decade)
    if len(bins) < MIN_ALLOCATION_BINS:
        raise FitError(
            f"{len(bins)} compute bin(s) hold trials; the allocation fit needs at least {MIN_ALLOCATION_BINS}:"
            " spread the trials' compute over a wider range"
        )
    log_c = np.log10([p.compute for p in bins])
    p_slope, p_coef = np.polyfit(log_c, np.log10([p.params for p in bins]), 1)
    d_slope, d_coef = np.polyfit(log_c, np.log10([p.examples_seen for p in bins]), 1)
    return Allocation(float(p_slope), float(p_coef), float(d_slope), float(d_coef), tuple(bins))


@dataclass(frozen=True)
class Law:
    """A bottlenecked law E(x) = e_inf + 10^log_coef x^-exponent, x = P or N."""

    exponent: float
    log_coef: float
    e_inf: float
    points: tuple[tuple[float, float], ...]  # (x, best error at x)

    def __call__(self, x: Any) -> Any:
        return self.e_inf + 10 ** (self.log_coef - self.exponent * np.log10(x))


def best_by(points: list[Point], axis: str) -> list[tuple[float, float]]:
    """(x, lowest error of any point with that x) for x = ``params`` or ``examples``."""
    best: dict[float, float] = {}
    for p in points:
        x = getattr(p, axis)
        best[x] = min(best.get(x, math.inf), p.error)
    return sorted(best.items())


def fit_law(points: list[Point], axis: str, e_inf: float) -> Law:
    pairs = best_by(points, axis)
    if len(pairs) < MIN_LAW_POINTS:
        raise FitError(f"E({axis}) needs {MIN_LAW_POINTS} distinct {axis} values or more; the trials have {len(pairs)}")
    x, e = np.array(pairs).T
    slope, coef = np.polyfit(np.log10(x), np.log10(e - e_inf), 1)
    return Law(float(-slope), float(coef), e_inf, tuple(pairs))


# --- the whole analysis ---------------------------------------------------------------------


@dataclass
class Analysis:
    points: list[Point]  # every point given
    selected: list[Point]  # best settings per (model, N, T)
    frontier: list[Point]
    fit: PowerLaw
    allocation: Allocation | None
    laws: dict[str, Law]  # "params" and/or "examples"
    notes: list[str] = field(default_factory=list)  # what could not be fitted, and why


def analyse(points: list[Point], space: str = "log", bins_per_decade: float = 4) -> Analysis:
    """Frontier, E(C), allocation and bottlenecked laws of ``points``.

    Raises :class:`FitError` when E(C) cannot be fitted; the allocation and the laws are left
    out (with a note saying why) when the points cannot support them.
    """
    selected = best_settings(points)
    frontier = lower_envelope(selected)
    if len(frontier) < MIN_FRONTIER_POINTS:
        raise FitError(
            f"{len(points)} points give a frontier of {len(frontier)}; fitting E(C) = a(b+C)^-alpha + E_inf"
            f" needs at least {MIN_FRONTIER_POINTS} frontier points: add trials at more compute budgets"
        )
    fit = fit_power_law(np.array([p.compute for p in frontier]), np.array([p.error for p in frontier]), space)
    notes, allocation, laws = [], None, {}
    try:
        allocation = fit_allocation(selected, bins_per_decade)
    except FitError as e:
        notes.append(f"allocation not fitted: {e}")
    for axis in ("params", "examples"):
        try:
            laws[axis] = fit_law(selected, axis, fit.e_inf)
        except FitError as e:
            notes.append(f"E({axis}) not fitted: {e}")
    return Analysis(points, selected, frontier, fit, allocation, laws, notes)


# --- uncertainty ------------------------------------------------------------------------------


@dataclass
class Bootstrap:
    """The analysis repeated on trials resampled with replacement."""

    samples: list[Analysis]
    failed: int  # resamples whose E(C) could not be fitted
    level: float

    def interval(self, values: list[float]) -> list[float] | None:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if len(values) < 2:
            return None
        tail = (1 - self.level) / 2 * 100
        return [float(v) for v in np.percentile(values, [tail, 100 - tail])]

    def fit_ci(self) -> dict[str, list[float] | None]:
        return {k: self.interval([getattr(s.fit, k) for s in self.samples]) for k in ("a", "b", "alpha", "e_inf")}

    def allocation_ci(self) -> dict[str, list[float] | None]:
        with_allocation = [s.allocation for s in self.samples if s.allocation]
        return {
            "params_exponent": self.interval([a.params_exponent for a in with_allocation]),
            "examples_exponent": self.interval([a.examples_exponent for a in with_allocation]),
        }

    def law_ci(self, axis: str) -> list[float] | None:
        return self.interval([s.laws[axis].exponent for s in self.samples if axis in s.laws])

    def error_ci(self, compute: float) -> list[float] | None:
        return self.interval([float(s.fit(compute)) for s in self.samples])

    def params_ci(self, compute: float) -> list[float] | None:
        return self.interval([float(s.allocation.params(compute)) for s in self.samples if s.allocation])

    def examples_seen_ci(self, compute: float) -> list[float] | None:
        return self.interval([float(s.allocation.examples_seen(compute)) for s in self.samples if s.allocation])


def bootstrap(
    points: list[Point], repeats: int = 200, level: float = 0.95, seed: int = 0, **analyse_options: Any
) -> Bootstrap:
    """Re-run :func:`analyse` on ``repeats`` resamples of the points (seeded: reproducible)."""
    rng = np.random.default_rng(seed)
    samples, failed = [], 0
    for _ in range(repeats):
        resample = [points[i] for i in rng.integers(0, len(points), len(points))]
        try:
            samples.append(analyse(resample, **analyse_options))
        except FitError:
            failed += 1
    return Bootstrap(samples, failed, level)


def holdout(points: list[Point], fraction: float = 1 / 3, space: str = "log") -> list[dict[str, float]]:
    """Fit on the cheapest ``1 - fraction`` of the trials; predict the held-out frontier.

    Returns, for each frontier point among the held-out (most expensive) trials, its compute,
    measured error, predicted error and relative error of the prediction.
    """
    ordered = sorted(points, key=lambda p: p.compute)
    cut = len(ordered) - max(1, round(len(ordered) * fraction))
    fit = analyse(ordered[:cut], space=space).fit
    held_out = [p for p in lower_envelope(best_settings(ordered)) if p.compute > ordered[cut - 1].compute]
    rows = []
    for p in held_out:
        predicted = float(fit(p.compute))
        rows.append({"compute": p.compute, "measured": p.error, "predicted": predicted,
                     "relative_error": abs(predicted - p.error) / p.error})  # fmt: skip
    return rows


# --- answers ------------------------------------------------------------------------------------


def query(analysis: Analysis, boot: Bootstrap, budget: float) -> dict[str, Any]:
    """The error reachable with compute ``budget`` and the allocation that reaches it."""
    answer: dict[str, Any] = {"budget": budget, "error": float(analysis.fit(budget)), "error_ci": boot.error_ci(budget)}
    if analysis.allocation:
        answer |= {
            "params": float(analysis.allocation.params(budget)), "params_ci": boot.params_ci(budget),
            "examples_seen": float(analysis.allocation.examples_seen(budget)),
            "examples_seen_ci": boot.examples_seen_ci(budget),
        }  # fmt: skip
    return answer


def summary(analysis: Analysis, boot: Bootstrap) -> dict[str, Any]:
    """The analysis as plain data (what ``mlpgrid frontier --json`` prints, less the queries)."""
    alloc = analysis.allocation
    return {
        "points": len(analysis.points),
        "frontier": [p.as_dict() for p in analysis.frontier],
        "fit": analysis.fit.as_dict() | {"ci": boot.fit_ci(), "frontier_points": len(analysis.frontier)},
        "allocation": None if alloc is None else {
            "params_exponent": alloc.params_exponent, "examples_exponent": alloc.examples_exponent,
            "params_log10_coef": alloc.params_log_coef, "examples_log10_coef": alloc.examples_log_coef,
            "bins": len(alloc.bins), "ci": boot.allocation_ci(),
        },
        "bottlenecks": {
            axis: {"exponent": law.exponent, "log10_coef": law.log_coef, "e_inf": law.e_inf,
                   "points": [list(pair) for pair in law.points], "ci": boot.law_ci(axis)}
            for axis, law in analysis.laws.items()
        },
        "bootstrap": {"repeats": len(boot.samples) + boot.failed, "failed": boot.failed, "level": boot.level},
        "notes": analysis.notes,
    }  # fmt: skip
