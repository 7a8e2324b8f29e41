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
6. Fits the allocation two more ways, as Hoffmann et al. do, on the same selection: IsoFLOP
   profiles (approach 2, :mod:`mlpgrid.analysis.isoflop`) and one law E(P, D) through every selected
   trial (approach 3, :mod:`mlpgrid.analysis.parametric`). A fit the trials cannot support is left out
   with a note saying why.

:func:`bootstrap` repeats all of it on resamples: the configurations (a (model, N, T) at
one setting) drawn with replacement, and the seeds of each; intervals are percentiles of the
repeats.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from mlpgrid.analysis import isoflop, parametric
from mlpgrid.data.files import regular_file
from mlpgrid.tracking.points import Point

MIN_FRONTIER_POINTS = 5  # E(C) has 4 parameters: at least one point more to judge the fit
MIN_ALLOCATION_BINS = 3  # a line through log C needs more than 2 points to mean anything
MIN_LAW_POINTS = 3
MAX_ALPHA = 4.0  # an exponent at this bound means the frontier does not constrain it
# The fits are many small array operations: BLAS threads only wait on each other there, and on a
# busy machine they spin (the synthetic draw analysed with 100 resamples beside a CPU busy loop on
# 2 cores: 2.0 s with OpenBLAS's threads, 0.75 s with one).
BLAS_THREADS = 1
IRREDUCIBLE_FLOOR = 1e-3  # an E(P, D) whose E falls below this fraction of the lowest error did not find one
# An interval is given from at least this share of the resamples: on a small grid where 182 of
# 200 resamples failed, the 18 that fit made "a 0.963 [0.963, 0.963]".
MIN_FITTED_SHARE = 0.5
CSV_COLUMNS = ("compute", "error", "params", "examples", "epochs")
MAX_CSV_BYTES = 2**30  # ten million trials of some hundred bytes a row


class FitError(ValueError):
    """The points cannot support the fit; the message says what is missing."""


# More compute bins than this per decade would be empty but for a grid of thousands of budgets
# per decade; their arrays would not (1e9 a decade: 30 GiB).
MAX_BINS_PER_DECADE = 1000


@dataclass(frozen=True)
class FitOptions:
    """How the analysis fits: the same for the data and every bootstrap resample."""

    space: str = "log"  # least squares on log E (default) or on E; also the IsoFLOP profiles'
    bins_per_decade: float = 4  # compute bins of approach 1, IsoFLOP budgets of approach 2
    e_inf: float | None = None  # hold the irreducible error fixed (E(C), the bottleneck laws, E(P, D))
    starts: int = parametric.DEFAULT_STARTS  # of E(P, D)'s grid of starting points, how many to optimise

    def __post_init__(self) -> None:
        if not 0 < self.bins_per_decade <= MAX_BINS_PER_DECADE:
            raise ValueError(f"bins_per_decade must be in (0, {MAX_BINS_PER_DECADE}], not {self.bins_per_decade}")


@dataclass(frozen=True)
class Labels:
    """What the error, the compute and the examples are called, for the report and its figures:
    a grid's own, or a CSV's column names (a CSV of LM losses is about loss and tokens)."""

    error: str = "test error"
    compute: str = "compute C = FLOP(f) · 3 · N · T"
    examples: str = "examples"
    source: str = ""  # what the points are of, for titles: the grid, its dataset and metric, or the CSV


# The CSV's columns, each with the other names it may go by. The error may be any lower-is-
# better metric (``loss``); the examples may be tokens. Without ``epochs`` each row is one epoch.
CSV_ALIASES = {"compute": ("compute", "flops"), "error": ("error", "loss"), "params": ("params",),
               "examples": ("examples", "tokens"), "epochs": ("epochs",)}  # fmt: skip


def read_csv(path: str | Path) -> list[Point]:
    """Points from a CSV (UTF-8) with columns compute,error,params,examples[,epochs] (or their
    aliases in :data:`CSV_ALIASES`; optionally model,trial_id,lr,batch_size); every bad cell is
    reported with its line and column."""
    return read_table(path)[0]


def read_table(path: str | Path) -> tuple[list[Point], Labels]:
    """:func:`read_csv`'s points and the labels its column names give."""
    path = Path(path)
    try:
        regular_file(path, MAX_CSV_BYTES, "a CSV of trials")
        with path.open(newline="", encoding="utf-8-sig") as f:
            points, labels, problems = _read_rows(path, csv.reader(f))
    except UnicodeDecodeError as e:
        raise FitError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    except csv.Error as e:  # e.g. a field longer than the csv module takes
        raise FitError(f"{path}: not a CSV of trials ({e})") from None
    except ValueError as e:
        raise FitError(str(e)) from None
    if problems:
        more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        raise FitError("\n".join(problems[:20] + more))
    if not points:
        raise FitError(f"{path}: no rows")
    return points, labels


def _read_rows(path: Path, reader: Iterator[list[str]]) -> tuple[list[Point], Labels, list[str]]:
    columns = [c.strip() for c in next(reader, [])]
    named = {}
    for column, aliases in CSV_ALIASES.items():
        found = [a for a in aliases if a in columns]
        if len(found) > 1:
            raise FitError(f"{path}: columns {' and '.join(found)} both give {column}; keep one")
        if found:
            named[column] = found[0]
    missing = [" or ".join(CSV_ALIASES[c]) for c in CSV_COLUMNS if c not in named and c != "epochs"]
    if missing:
        raise FitError(f"{path}: missing column(s) {', '.join(missing)}; found: {', '.join(columns) or 'none'}")
    at = {c: columns.index(name) for c, name in named.items()}
    numeric = [at.get(c) for c in CSV_COLUMNS]
    model, trial_id = _index(columns, "model"), _index(columns, "trial_id")
    swept = [(k, columns.index(k)) for k in ("lr", "batch_size") if k in columns]
    labels = Labels(error=named["error"], compute=f"{named['compute']} C", examples=named["examples"],
                    source=f"{Path(path).name}, {named['error']}")  # fmt: skip
    points, problems = [], []
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        try:
            numbers = [1.0 if i is None else float(row[i]) for i in numeric]
        except (ValueError, IndexError):
            numbers = []
        if len(numbers) < len(numeric) or not all(0 < v < math.inf for v in numbers):
            cells = [named.get(c, c) for c in CSV_COLUMNS]
            problems.extend(_cell_problems(path, line, cells, ["1" if i is None else _cell(row, i) for i in numeric]))
            continue
        settings = tuple((k, _cell(row, i)) for k, i in swept if _cell(row, i))
        compute, error, params, examples, epochs = numbers
        points.append(Point(compute, error, params, examples, epochs, model=_cell(row, model),
                            trial_id=_cell(row, trial_id), settings=settings))  # fmt: skip
    return points, labels, problems


def _index(columns: list[str], name: str) -> int | None:
    return columns.index(name) if name in columns else None


def _cell(row: list[str], i: int | None) -> str:
    return row[i].strip() if i is not None and i < len(row) else ""


def _cell_problems(path: Path, line: int, columns: list[str], cells: list[str]) -> list[str]:
    """What is wrong with a row's numeric cells (those of :data:`CSV_COLUMNS`, in order, by
    the names the CSV gives them)."""
    problems = []
    for column, cell in zip(columns, cells, strict=True):
        try:
            value = float(cell)
        except ValueError:
            problems.append(f"{path}: line {line}: {column}: {cell!r} is not a number")
            continue
        if not 0 < value < math.inf:
            problems.append(f"{path}: line {line}: {column}: {cell} must be positive and finite")
    return problems


# --- selection ---------------------------------------------------------------------------


def _starts(sorted_values: np.ndarray) -> np.ndarray:
    """Where each run of equal values begins in ``sorted_values``."""
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])


def _segment_of(starts: np.ndarray, length: int) -> np.ndarray:
    """For each position of an array of ``length`` cut into segments at ``starts``, its segment."""
    return np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, length]))


def _first_minima(values: np.ndarray, starts: np.ndarray, of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each segment's minimum of ``values`` (segments begin at ``starts``, none empty; ``of`` is
    :func:`_segment_of` them) and the position of its first occurrence."""
    minima = np.minimum.reduceat(values, starts)
    hits = np.flatnonzero(values == minima[of])
    return minima, hits[_starts(of[hits])]


class _Segments:
    """Indexes grouped by equal ``keys``: per group, the minimum of values given per index."""

    def __init__(self, keys: np.ndarray) -> None:
        self.order = np.argsort(keys, kind="stable")  # a tie goes to the first index
        self.starts = _starts(keys[self.order])
        self.of = _segment_of(self.starts, len(keys))
        self.keys = keys[self.order][self.starts]
        self.singles = len(self.starts) == len(keys)

    def minima(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each group's minimum of ``values`` and the index (into ``values``) of its first occurrence."""
        ordered = values[self.order]
        if self.singles:
            return ordered, self.order
        minima, first = _first_minima(ordered, self.starts, self.of)
        return minima, self.order[first]


class Trials:
    """The points grouped as the analysis selects them, held as arrays so that the bootstrap's
    repeats are array operations (``benchmarks/frontier_scale.py``: a million points).

    Points that differ only in their seed (same model, N, T, compute and other settings) are one
    *configuration*, whose error is their mean. Configurations that differ only in their other
    settings (learning rate, batch size, ...) are one *cell*, a (model, N, T), which takes the
    best of them, as the NFNet scaling study does. The analysis works on cells; errors are
    passed in per configuration (:attr:`config_error`, or a bootstrap resample), with ``inf``
    for a configuration left out.
    """

    def __init__(self, points: list[Point]) -> None:
        self.points = points
        configs: dict[tuple, int] = {}
        keys = ((p.key(), p.compute, p.settings) for p in points)
        row_config = np.fromiter((configs.setdefault(k, len(configs)) for k in keys), np.int64, len(points))
        row_error = np.fromiter((p.error for p in points), float, len(points))
        self.sizes = np.bincount(row_config, minlength=len(configs))
        self.config_error = np.bincount(row_config, weights=row_error, minlength=len(configs)) / self.sizes
        self.first_row = np.unique(row_config, return_index=True)[1]  # configurations number by their first row
        cells: dict[tuple, int] = {}
        first = [points[r] for r in self.first_row]
        cell_keys = ((p.key(), p.compute) for p in first)
        self.by_cell = _Segments(np.fromiter((cells.setdefault(k, len(cells)) for k in cell_keys), np.int64,
                                             len(first)))  # fmt: skip
        representative = [first[c] for c in self.by_cell.order[self.by_cell.starts]]
        self.compute = np.array([p.compute for p in representative])
        self.params = np.array([p.params for p in representative])
        self.examples = np.array([p.examples for p in representative])
        self.examples_seen = np.array([p.examples_seen for p in representative])
        # Cells by compute (the frontier, the allocation's bins) and by P and N (the bottleneck laws).
        self.by = {axis: _Segments(getattr(self, axis)) for axis in ("compute", "params", "examples")}
        self.log_compute = np.log10(self.compute[self.by["compute"].order])
        # Rows by configuration, for resampling seeds.
        rows = np.argsort(row_config, kind="stable")
        self.sorted_config, self.sorted_error = row_config[rows], row_error[rows]
        self.config_starts = np.r_[0, np.cumsum(self.sizes)[:-1]]
        # C / (P D): 6 for dense models (FLOP(f) = 2P); what turns a budget into D = C / (k P).
        self.compute_ratio = float(np.exp(np.mean(np.log(self.compute / (self.params * self.examples_seen)))))
        self._curves: dict[float, isoflop.Curves] = {}

    def curves(self, bins_per_decade: float) -> isoflop.Curves:
        """Each model size's cells by compute, and the IsoFLOP budgets (built once per spacing)."""
        if bins_per_decade not in self._curves:
            self._curves[bins_per_decade] = isoflop.Curves(self.params, self.compute, bins_per_decade)
        return self._curves[bins_per_decade]

    def cells(self, config_error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per cell: the lowest error of its configurations (``inf`` where none is in), and which
        configuration has it."""
        return self.by_cell.minima(config_error)

    def frontier(self, cell_error: np.ndarray) -> np.ndarray:
        """The cells on the lower envelope (no cell of lower or equal compute does better), by compute."""
        minima, first = self.by["compute"].minima(cell_error)
        return first[minima < np.r_[np.inf, np.minimum.accumulate(minima)[:-1]]]

    def best_by(self, cell_error: np.ndarray, axis: str) -> tuple[np.ndarray, np.ndarray]:
        """The distinct values x of ``axis`` (``params`` or ``examples``) and the lowest error at each."""
        minima, _ = self.by[axis].minima(cell_error)
        present = np.isfinite(minima)
        return self.by[axis].keys[present], minima[present]

    def best_per_bin(self, cell_error: np.ndarray, bins_per_decade: float = 4) -> np.ndarray:
        """The lowest-error cell of each compute bin (bins of equal width in log C between the
        cheapest and the costliest cell present), by compute."""
        order = self.by["compute"].order
        ordered = cell_error[order]
        present = np.flatnonzero(np.isfinite(ordered))
        low, high = self.log_compute[present[0]], self.log_compute[present[-1]]
        count = max(1, math.ceil((high - low) * bins_per_decade))
        # A bin holds the cells from its lower edge up to the next; the last one its upper edge too.
        starts = np.unique(np.searchsorted(self.log_compute, np.linspace(low, high, count + 1)[1:-1]))
        starts = np.r_[0, starts[(starts > present[0]) & (starts <= present[-1])] - present[0]]
        present_on = ordered[present[0] :]
        minima, first = _first_minima(present_on, starts, _segment_of(starts, len(present_on)))
        return order[present[0] + first[np.isfinite(minima)]]

    def point(self, cell: int, cell_error: np.ndarray, cell_config: np.ndarray) -> Point:
        """The cell as a point: its best configuration's first point, with the configuration's error."""
        p = self.points[self.first_row[cell_config[cell]]]
        return p if p.error == cell_error[cell] else dataclasses.replace(p, error=float(cell_error[cell]))

    def selected(self, cell_error: np.ndarray, cell_config: np.ndarray) -> list[Point]:
        """Every cell present as a point (:meth:`point`), by compute, then error."""
        present = np.flatnonzero(np.isfinite(cell_error))
        order = present[np.lexsort((cell_error[present], self.compute[present]))]
        return [self.point(c, cell_error, cell_config) for c in order]

    def resample(self, configs: np.random.Generator, seeds: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Configuration errors of one bootstrap resample: configurations drawn with replacement
        (``inf`` for those not drawn; by ``configs``), each the mean of its seeds drawn with
        replacement (by ``seeds``), and how many times each was drawn. A point given many times
        is one configuration of identical seeds: it draws the same resamples as the point given once."""
        n = len(self.sizes)
        counts = np.bincount(configs.integers(0, n, n), minlength=n)
        errors = self.config_error
        if self.sizes.max() > 1:
            config = self.sorted_config
            rows = self.config_starts[config] + (seeds.random(len(config)) * self.sizes[config]).astype(np.int64)
            errors = np.bincount(config, weights=self.sorted_error[rows], minlength=n) / self.sizes
        return np.where(counts > 0, errors, np.inf), counts

    def fit_frontier(self, cell_error: np.ndarray, space: str = "log", near: PowerLaw | None = None,
                     e_inf: float | None = None) -> tuple[np.ndarray, PowerLaw]:  # fmt: skip
        """The frontier's cells and E(C) fitted to them (:func:`fit_power_law`)."""
        frontier = self.frontier(cell_error)
        if len(frontier) < MIN_FRONTIER_POINTS:
            raise FitError(
                f"{len(self.points)} points give a frontier of {len(frontier)}; fitting E(C) = a(b+C)^-alpha + E_inf"
                f" needs at least {MIN_FRONTIER_POINTS} frontier points: add trials at more compute budgets"
            )
        return frontier, fit_power_law(self.compute[frontier], cell_error[frontier], space, near, e_inf)

    def fit(self, config_error: np.ndarray, options: FitOptions, near: Fitted | None = None,
            counts: np.ndarray | None = None) -> Fitted:  # fmt: skip
        """All three approaches on the cells at these configuration errors. ``near``: the fit of
        similar data (the analysis', for a resample), where each fit starts; ``counts``: how many
        times each configuration was drawn (approach 3 counts a cell that many times)."""
        cell_error, cell_config = self.cells(config_error)
        frontier, fit = self.fit_frontier(cell_error, options.space, near.fit if near else None, options.e_inf)
        fitted = Fitted(fit, None, {}, [], cell_error, cell_config, frontier)
        try:
            bins = self.best_per_bin(cell_error, options.bins_per_decade)
            fitted.allocation = fit_allocation(self.compute[bins], self.params[bins], self.examples_seen[bins],
                                               tuple(self.point(b, cell_error, cell_config) for b in bins))  # fmt: skip
        except FitError as e:
            fitted.notes.append(f"allocation not fitted: {e}")
        for axis in ("params", "examples"):
            try:
                fitted.laws[axis] = fit_law(*self.best_by(cell_error, axis), axis, fit.e_inf)
            except FitError as e:
                fitted.notes.append(f"E({axis}) not fitted: {e}")
        try:
            fitted.isoflop = isoflop.fit(self.curves(options.bins_per_decade), cell_error, self.compute_ratio,
                                         options.space)  # fmt: skip
        except isoflop.IsoFlopError as e:
            fitted.notes.append(f"IsoFLOP profiles (approach 2) not fitted: {e}")
        present = np.flatnonzero(np.isfinite(cell_error))
        weights = None if counts is None else counts[cell_config[present]]
        try:
            fitted.parametric = parametric.fit(
                self.params[present], self.examples_seen[present], cell_error[present], self.compute_ratio, weights,
                options.e_inf, options.starts, near.parametric if near else None,
            )  # fmt: skip
        except parametric.ParametricFitError as e:
            fitted.notes.append(f"E(P, D) (approach 3) not fitted: {e}")
        floor = IRREDUCIBLE_FLOOR * cell_error[present].min()
        flat = fitted.parametric.e_inf_range if fitted.parametric else None
        if flat:
            fitted.notes.append(
                f"E(P, D)'s irreducible error is not identified: held anywhere from {flat[0]:.3g} to {flat[1]:.3g},"
                f" the law fits within {parametric.FLAT_LOSS:.0%} of its best loss, so no interval is given for it;"
                " --e-inf holds it at a value you choose"
            )
        elif fitted.parametric and options.e_inf is None and fitted.parametric.e_inf < floor:
            fitted.notes.append(
                f"E(P, D)'s irreducible error fell to {fitted.parametric.e_inf:.3g}: the trials do not constrain it;"
                " --e-inf holds it at a value you choose"
            )
        return fitted


def best_settings(points: list[Point]) -> list[Point]:
    """One point per (model, N, T): seeds averaged, then the best of the other settings; by
    compute, then error."""
    trials = Trials(points)
    return trials.selected(*trials.cells(trials.config_error))


def lower_envelope(points: list[Point]) -> list[Point]:
    """The (model, N, T) that no point of lower or equal compute beats, by increasing compute."""
    trials = Trials(points)
    cell_error, cell_config = trials.cells(trials.config_error)
    return [trials.point(c, cell_error, cell_config) for c in trials.frontier(cell_error)]


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


def fit_power_law(compute: np.ndarray, error: np.ndarray, space: str = "log", near: PowerLaw | None = None,
                  e_inf: float | None = None) -> PowerLaw:  # fmt: skip
    """Fit E(C) = a (b + C)^-alpha + E_inf with ``curve_fit`` (trust-region, bounded).

    ``space="log"`` (default) minimises the squared differences of log E: every point counts
    by its relative miss. On a frontier the error falls several-fold, and in linear space the
    cheap, high-error points dominate while the expensive end, the one extrapolation depends
    on, is fitted loosely (``benchmarks/frontier_recovery.py`` measures both). ``"linear"`` is
    the paper's plain least squares on E.

    Compute is rescaled by the smallest C so that the parameters are of order one; several
    starting points guard against local minima. ``near``: the fit of similar points (a
    bootstrap resample's whole data), the one start tried first. ``e_inf``: hold E_inf at this
    value (below every error) and fit the other three. Raises :class:`FitError` on failure.
    """
    from scipy.optimize import curve_fit  # 0.6 s to import: paid by the first fit, not by every import

    compute, error = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    if len(compute) < MIN_FRONTIER_POINTS:
        raise FitError(
            f"the frontier has {len(compute)} point(s); fitting E(C) = a(b+C)^-alpha + E_inf needs at least"
            f" {MIN_FRONTIER_POINTS}: add trials at more compute budgets (models, N or T)"
        )
    scale = compute.min()
    x = compute / scale
    ceiling = error.min() * (1 - 1e-9)
    if e_inf is not None and not 0 <= e_inf < error.min():
        raise FitError(f"a fixed E_inf of {e_inf:g} must be at least 0 and below every error (the lowest is"
                       f" {error.min():g})")  # fmt: skip
    free = 4 if e_inf is None else 3  # the parameters fitted: log a, b, alpha (and E_inf)
    lower = np.array([-50.0, 0.0, 1e-3, 0.0])[:free]
    upper = np.array([50.0, float(x.max()), MAX_ALPHA, ceiling])[:free]

    def model(x: np.ndarray, log_a: float, b: float, alpha: float, *rest: float) -> np.ndarray:
        e = np.exp(log_a) * (b + x) ** -alpha + (rest[0] if rest else e_inf)
        return np.log(e) if space == "log" else e

    def jacobian(x: np.ndarray, log_a: float, b: float, alpha: float, *rest: float) -> np.ndarray:
        power = np.exp(log_a) * (b + x) ** -alpha
        columns = np.stack([power, -alpha * power / (b + x), -power * np.log(b + x), np.ones_like(x)], axis=1)
        columns = columns[:, :free]
        return columns / (power + (rest[0] if rest else e_inf))[:, None] if space == "log" else columns

    def starts() -> Iterator[list[float]]:
        for e_inf0 in (0.0, 0.5 * ceiling, 0.9 * ceiling) if e_inf is None else (e_inf,):
            slope, intercept = np.polyfit(np.log(x), np.log(error - e_inf0), 1)
            alpha0 = float(np.clip(-slope, 0.01, MAX_ALPHA * 0.9))
            for b0 in (0.0, 1.0):
                yield [float(np.clip(intercept, -49, 49)), min(b0, float(x.max())), alpha0, e_inf0][:free]

    def best_of(starts: Iterable[list[float]]) -> np.ndarray | None:
        best, best_cost = None, np.inf
        for start in starts:
            try:
                theta, _ = curve_fit(model, x, target, p0=start, jac=jacobian, bounds=(lower, upper), method="trf",
                                     max_nfev=5000)  # fmt: skip
            except (RuntimeError, ValueError):
                continue
            cost = float(np.sum((model(x, *theta) - target) ** 2))
            if np.all(np.isfinite(theta)) and cost < best_cost:
                best, best_cost = theta, cost
        return best

    target = np.log(error) if space == "log" else error
    best = None
    if near is not None:
        start = [math.log(near.a) - near.alpha * math.log(scale), near.b / scale, near.alpha, near.e_inf][:free]
        best = best_of([list(np.clip(start, lower, upper))])
    if best is None:
        best = best_of(starts())
    if best is None:
        raise FitError(f"fitting E(C) to the {len(x)} frontier points did not converge")
    log_a, b, alpha = (float(v) for v in best[:3])
    e_inf = float(best[3]) if free == 4 or e_inf is None else float(e_inf)
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


def fit_allocation(compute: np.ndarray, params: np.ndarray, examples_seen: np.ndarray,
                   bins: tuple[Point, ...]) -> Allocation:  # fmt: skip
    """Lines through log P and log D against log C of the best point of each compute bin."""
    if len(compute) < MIN_ALLOCATION_BINS:
        raise FitError(
            f"{len(compute)} compute bin(s) hold trials; the allocation fit needs at least {MIN_ALLOCATION_BINS}:"
            " spread the trials' compute over a wider range"
        )
    log_c = np.log10(compute)
    p_slope, p_coef = np.polyfit(log_c, np.log10(params), 1)
    d_slope, d_coef = np.polyfit(log_c, np.log10(examples_seen), 1)
    return Allocation(float(p_slope), float(p_coef), float(d_slope), float(d_coef), bins)


@dataclass(frozen=True)
class Law:
    """A bottlenecked law E(x) = e_inf + 10^log_coef x^-exponent, x = P or N."""

    exponent: float
    log_coef: float
    e_inf: float

    def __call__(self, x: Any) -> Any:
        return self.e_inf + 10 ** (self.log_coef - self.exponent * np.log10(x))


def fit_law(x: np.ndarray, error: np.ndarray, axis: str, e_inf: float) -> Law:
    """E(x) through the best error at each distinct x (:meth:`Trials.best_by`)."""
    if len(x) < MIN_LAW_POINTS:
        raise FitError(f"E({axis}) needs {MIN_LAW_POINTS} distinct {axis} values or more; the trials have {len(x)}")
    slope, coef = np.polyfit(np.log10(x), np.log10(error - e_inf), 1)
    return Law(float(-slope), float(coef), e_inf)


# --- the whole analysis ---------------------------------------------------------------------


# Hoffmann et al.'s three ways to the allocation, by the name the report gives each, and the
# attribute of :class:`Fitted` that holds it.
APPROACHES = {"envelope": "allocation", "isoflop": "isoflop", "parametric": "parametric"}


@dataclass
class Fitted:
    """What one selection of the trials fits: E(C), the three allocations, the bottleneck laws."""

    fit: PowerLaw
    allocation: Allocation | None  # approach 1: the best trial of each compute bin
    laws: dict[str, Law]  # "params" and/or "examples"
    notes: list[str]  # what could not be fitted, and why
    cell_error: np.ndarray  # per (model, N, T) cell of :class:`Trials`
    cell_config: np.ndarray
    frontier_cells: np.ndarray
    isoflop: isoflop.IsoFlop | None = None  # approach 2
    parametric: parametric.Parametric | None = None  # approach 3

    def approach(self, name: str) -> Any:
        """The allocation of approach ``name`` (a key of :data:`APPROACHES`), or None."""
        return getattr(self, APPROACHES[name])

    def optimal_error(self, name: str, compute: float) -> float | None:
        """The error the approach predicts at ``compute``: E(C) for the envelope, E*(C) of E(P, D)."""
        if name == "envelope":
            return float(self.fit(compute))
        if name == "parametric" and self.parametric is not None:
            return float(self.parametric.optimal_error(compute))
        return None


@dataclass
class Analysis:
    points: list[Point]  # every point given
    selected: list[Point]  # best settings per (model, N, T), by compute
    frontier: list[Point]
    fitted: Fitted
    best_at: dict[str, tuple[np.ndarray, np.ndarray]]  # per axis: distinct P (or N), the best error at each
    trials: Trials = field(repr=False)  # the points as arrays, for the bootstrap
    options: FitOptions = FitOptions()

    @property
    def fit(self) -> PowerLaw:
        return self.fitted.fit

    @property
    def allocation(self) -> Allocation | None:
        return self.fitted.allocation

    @property
    def laws(self) -> dict[str, Law]:
        return self.fitted.laws

    @property
    def notes(self) -> list[str]:
        return self.fitted.notes


def analyse(points: list[Point], options: FitOptions = FitOptions()) -> Analysis:
    """Frontier, E(C), the three allocations and the bottlenecked laws of ``points``.

    Raises :class:`FitError` when E(C) cannot be fitted; the allocations and the laws are left
    out (with a note saying why) when the points cannot support them.
    """
    trials = Trials(points)
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        fitted = trials.fit(trials.config_error, options)
    error, config = fitted.cell_error, fitted.cell_config
    selected = trials.selected(error, config)
    frontier = [trials.point(c, error, config) for c in fitted.frontier_cells]
    best_at = {axis: trials.best_by(error, axis) for axis in ("params", "examples")}
    return Analysis(points, selected, frontier, fitted, best_at, trials, options)


# --- uncertainty ------------------------------------------------------------------------------


@dataclass
class Bootstrap:
    """The analysis repeated on trials resampled with replacement."""

    samples: list[Fitted]
    failed: int  # resamples whose E(C) could not be fitted
    level: float
    seed: int = 0

    @property
    def repeats(self) -> int:
        return len(self.samples) + self.failed

    def interval(self, values: Iterable[float | None]) -> list[float] | None:
        """The central ``level`` of the values; None unless most resamples gave one (the few
        that fit are not a sample of what the data allow)."""
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if len(finite) < max(2, MIN_FITTED_SHARE * self.repeats):
            return None
        tail = (1 - self.level) / 2 * 100
        return [float(v) for v in np.percentile(finite, [tail, 100 - tail])]

    def fit_ci(self) -> dict[str, list[float] | None]:
        return {k: self.interval([getattr(s.fit, k) for s in self.samples]) for k in ("a", "b", "alpha", "e_inf")}

    def allocation_ci(self, name: str = "envelope") -> dict[str, list[float] | None]:
        fits = [a for a in (s.approach(name) for s in self.samples) if a is not None]
        return {
            "params_exponent": self.interval([a.params_exponent for a in fits]),
            "examples_exponent": self.interval([a.examples_exponent for a in fits]),
        }

    def parametric_ci(self) -> dict[str, list[float] | None]:
        fits = [s.parametric for s in self.samples if s.parametric is not None]
        return {k: self.interval([getattr(f, k) for f in fits]) for k in ("e_inf", "a", "alpha", "b", "beta")}

    def law_ci(self, axis: str) -> list[float] | None:
        return self.interval([s.laws[axis].exponent for s in self.samples if axis in s.laws])

    def error_ci(self, compute: float, name: str = "envelope") -> list[float] | None:
        return self.interval([s.optimal_error(name, compute) for s in self.samples])

    def params_ci(self, compute: float, name: str = "envelope") -> list[float] | None:
        fits = (s.approach(name) for s in self.samples)
        return self.interval([float(a.params(compute)) for a in fits if a is not None])

    def examples_seen_ci(self, compute: float, name: str = "envelope") -> list[float] | None:
        fits = (s.approach(name) for s in self.samples)
        return self.interval([float(a.examples_seen(compute)) for a in fits if a is not None])


def bootstrap(analysis: Analysis, repeats: int = 200, level: float = 0.95, seed: int = 0) -> Bootstrap:
    """The analysis re-fitted on ``repeats`` resamples of its points (:meth:`Trials.resample`;
    seeded: reproducible), each fit starting from the analysis' own."""
    trials, (configs, seeds) = analysis.trials, np.random.default_rng(seed).spawn(2)
    samples, failed = [], 0
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        for _ in range(repeats):
            try:
                errors, counts = trials.resample(configs, seeds)
                samples.append(trials.fit(errors, analysis.options, near=analysis.fitted, counts=counts))
            except FitError:
                failed += 1
    return Bootstrap(samples, failed, level, seed)


def holdout(points: list[Point], fraction: float = 1 / 3, space: str = "log",
            e_inf: float | None = None) -> list[dict[str, float]]:  # fmt: skip
    """Fit on the cheapest ``1 - fraction`` of the trials; predict the held-out frontier.

    Returns, for each frontier point among the held-out (most expensive) trials, its compute,
    measured error, predicted error and relative error of the prediction.
    """
    ordered = sorted(points, key=lambda p: p.compute)
    cut = len(ordered) - max(1, round(len(ordered) * fraction))
    cheaper = Trials(ordered[:cut])
    _, fit = cheaper.fit_frontier(cheaper.cells(cheaper.config_error)[0], space, e_inf=e_inf)
    held_out = [p for p in lower_envelope(ordered) if p.compute > ordered[cut - 1].compute]
    rows = []
    for p in held_out:
        predicted = float(fit(p.compute))
        rows.append({"compute": p.compute, "measured": p.error, "predicted": predicted,
                     "relative_error": abs(predicted - p.error) / p.error})  # fmt: skip
    return rows


# --- answers ------------------------------------------------------------------------------------


def query(analysis: Analysis, boot: Bootstrap, budget: float) -> dict[str, Any]:
    """The error reachable with compute ``budget`` and the allocation that reaches it: the
    envelope's (approach 1) at the top, and each approach's under ``approaches``."""
    answer: dict[str, Any] = {"budget": budget, "error": float(analysis.fit(budget)), "error_ci": boot.error_ci(budget)}
    approaches = {}
    for name in APPROACHES:
        allocation = analysis.fitted.approach(name)
        if allocation is None:
            continue
        params, seen = float(allocation.params(budget)), float(allocation.examples_seen(budget))
        error = analysis.fitted.optimal_error(name, budget)
        approaches[name] = {
            "params": params, "params_ci": boot.params_ci(budget, name), "examples_seen": seen,
            "examples_seen_ci": boot.examples_seen_ci(budget, name), "examples_per_param": seen / params,
            "error": error, "error_ci": None if error is None else boot.error_ci(budget, name),
        }  # fmt: skip
    if "envelope" in approaches:
        answer |= {k: approaches["envelope"][k] for k in ("params", "params_ci", "examples_seen", "examples_seen_ci")}
    return answer | {"approaches": approaches}


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
        "approaches": approaches(analysis, boot),
        "bottlenecks": {
            axis: {"exponent": law.exponent, "log10_coef": law.log_coef, "e_inf": law.e_inf,
                   "points": [[float(x), float(e)] for x, e in zip(*analysis.best_at[axis], strict=True)],
                   "ci": boot.law_ci(axis)}
            for axis, law in analysis.laws.items()
        },
        "options": dataclasses.asdict(analysis.options),
        "bootstrap": {"repeats": boot.repeats, "failed": boot.failed, "level": boot.level,
                      "intervals": boot.repeats - boot.failed >= max(2, MIN_FITTED_SHARE * boot.repeats),
                      "seed": boot.seed},
        "notes": analysis.notes,
    }  # fmt: skip


def approaches(analysis: Analysis, boot: Bootstrap) -> dict[str, Any]:
    """Each approach's allocation exponents with intervals, side by side (None: not fitted), and
    what each rests on: the compute bins, the IsoFLOP profiles, the parametric law."""
    fitted = analysis.fitted
    out: dict[str, Any] = {}
    for name in APPROACHES:
        allocation = fitted.approach(name)
        out[name] = None if allocation is None else {
            "params_exponent": allocation.params_exponent, "examples_exponent": allocation.examples_exponent,
            "ci": boot.allocation_ci(name),
        }  # fmt: skip
    if fitted.allocation:
        out["envelope"]["bins"] = [p.as_dict() for p in fitted.allocation.bins]
    if fitted.isoflop:
        iso = fitted.isoflop
        out["isoflop"] |= {"profiles": [p.as_dict() for p in iso.profiles], "used": len(iso.used()),
                           "compute_ratio": iso.compute_ratio}  # fmt: skip
    if fitted.parametric:
        law_ci = boot.parametric_ci()
        if fitted.parametric.e_inf_range:  # the resamples' spread would be luck (see the note)
            law_ci["e_inf"] = None
        out["parametric"] |= {"law": fitted.parametric.as_dict(), "law_ci": law_ci}
    return out
