"""Hoffmann et al.'s approach 2: IsoFLOP profiles.

At each compute budget, the error of every model size that reaches it, against log P, is a
valley; a curve through it puts the best size P* at its minimum. Lines through the minima
give P*(C) and D*(C).

Trials seldom land on exactly the same compute, so a profile is read off each model's own
curve: the lowest error a size reaches at compute up to C (its envelope over N and T), in
log-log, interpolated at the budget between the size's two nearest trials when they lie at
most :data:`MAX_GAP` decades apart, or taken from its nearest trial when that lies within
:data:`NEAR` decades of the budget. Budgets are spaced ``bins_per_decade`` to a decade across
the trials. A profile is used only if it has :data:`MIN_SIZES` sizes or more, is a valley
(positive curvature), and has its minimum inside the sizes tried: a minimum found outside is
an extrapolation, and one near the edge of an off-centre grid is biased, so each profile
reports where its minimum lies between its smallest and largest size. The curve is fitted
near the valley's floor only (:data:`WINDOW`): a cubic in log P where :data:`CUBIC_SIZES` sizes
or more lie there, else a parabola.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_SIZES = 3  # a parabola has 3 parameters (with exactly 3 sizes it has no residual: the profile says so)
MIN_PROFILES = 3  # a line through log C needs more than 2 minima to mean anything
MAX_GAP = 0.5  # decades between a size's trials to interpolate across (Chinchilla's IsoFLOP budgets: 1e19, 3e19)
NEAR = 0.05  # decades: a trial within 12% of the budget's compute stands for the budget
# The curve is fitted to the sizes within this many decades of the profile's best size. A valley
# E(P) at fixed C steeper on one side (P^-1 against D^-0.35, the paper's Fig. 6) is no parabola:
# one through +-0.75 decade put P* 0.09 decade (24%) above the truth at every budget, +-0.4
# decade 0.01-0.03 (noisier), a cubic through +-1 decade 0.011-0.019 (4%), as close as a
# smoothing spline and steadier (the synthetic law of tests/synthetic_law.py, 4 and 8 sizes a
# decade, 0-3% noise, 20 draws; on valleys as even as Chinchilla's every fit is within 0.01).
# The exponent of P*(C) barely moves; its level does.
WINDOW = 1.0
CUBIC_SIZES = 5  # a cubic has 4 parameters: from 5 sizes it has a residual to average the noise
SAME_SIZE = 1e-3  # sizes within 0.1% are one model (sets read off published figures carry such jitter)

USED, FEW, FLAT, OUTSIDE = "used", "too few sizes", "no minimum", "minimum outside the sizes tried"


class IsoFlopError(ValueError):
    """The trials give too few usable profiles; the message says why."""


@dataclass(frozen=True)
class Profile:
    """One budget's valley: the sizes that reach it, their error there, the fitted curve's minimum."""

    compute: float
    params: tuple[float, ...]
    errors: tuple[float, ...]
    status: str  # USED, or why not
    fitted: tuple[float, float] | None = None  # the smallest and largest size the curve was fitted to
    best_params: float | None = None  # the curve's minimum
    best_error: float | None = None
    position: float | None = None  # of the minimum, in log P: 0 at the smallest size fitted, 1 at the largest
    curve: tuple[float, ...] | None = None  # the cubic or parabola in log10 P (highest power first), of log E or E

    def as_dict(self) -> dict[str, Any]:
        return {"compute": self.compute, "sizes": len(self.params), "status": self.status,
                "params": list(self.params), "errors": list(self.errors), "fitted": self.fitted,
                "best_params": self.best_params, "best_error": self.best_error,
                "position": self.position}  # fmt: skip


@dataclass(frozen=True)
class IsoFlop:
    """The profiles and the lines through their minima: P*(C) = 10^coef C^exponent, D* = C / (k P*)."""

    profiles: tuple[Profile, ...]
    params_exponent: float
    params_log_coef: float
    examples_exponent: float
    examples_log_coef: float
    compute_ratio: float

    def params(self, compute: Any) -> Any:
        return 10 ** (self.params_log_coef + self.params_exponent * np.log10(compute))

    def examples_seen(self, compute: Any) -> Any:
        return 10 ** (self.examples_log_coef + self.examples_exponent * np.log10(compute))

    def used(self) -> list[Profile]:
        return [p for p in self.profiles if p.status == USED]


class Curves:
    """Each model size's cells, by compute: built once, read for any cell errors."""

    def __init__(self, params: np.ndarray, compute: np.ndarray, bins_per_decade: float) -> None:
        log_p, self.log_c = np.log10(params), np.log10(compute)
        order = np.argsort(log_p, kind="stable")
        size = np.empty(len(params), np.int64)
        size[order] = np.r_[0, np.cumsum(np.diff(log_p[order]) > math.log10(1 + SAME_SIZE))]
        self.members = [np.flatnonzero(size == s) for s in range(size.max() + 1 if len(size) else 0)]
        self.members = [m[np.argsort(self.log_c[m], kind="stable")] for m in self.members]
        self.size_log_p = np.array([log_p[m].mean() for m in self.members])
        low, high = self.log_c.min(), self.log_c.max()
        self.budgets = low + np.arange(math.floor((high - low) * bins_per_decade + 1e-9) + 1) / bins_per_decade

    def at_budgets(self, cell_error: np.ndarray) -> np.ndarray:
        """log E of each size (rows) at each budget (columns); NaN where the size does not reach it."""
        table = np.full((len(self.members), len(self.budgets)), np.nan)
        for row, members in enumerate(self.members):
            present = members[np.isfinite(cell_error[members])]
            if len(present) == 0:
                continue
            x, y = self.log_c[present], np.minimum.accumulate(np.log(cell_error[present]))
            right = np.searchsorted(x, self.budgets)  # the first trial at or above each budget
            above, below = np.minimum(right, len(x) - 1), np.maximum(right - 1, 0)
            gap_ok = (right > 0) & (right < len(x)) & (x[above] - x[below] <= MAX_GAP)
            nearest = np.where(np.abs(x[above] - self.budgets) < np.abs(x[below] - self.budgets), above, below)
            near = np.abs(x[nearest] - self.budgets) <= NEAR
            # Within NEAR of a trial, that trial; else the interpolation across a small enough gap.
            table[row] = np.where(near, y[nearest], np.where(gap_ok, np.interp(self.budgets, x, y), np.nan))
        return table


def fit(curves: Curves, cell_error: np.ndarray, compute_ratio: float, space: str = "log") -> IsoFlop:
    """The profiles of the cells at these errors and the lines through their minima.

    ``space="log"`` fits each profile's curve to log E, ``"linear"`` to E. Raises :class:`IsoFlopError`
    when fewer than :data:`MIN_PROFILES` profiles are usable.
    """
    table = curves.at_budgets(cell_error)
    profiles = []
    for column, log_c in enumerate(curves.budgets):
        reached = np.isfinite(table[:, column])
        profiles.append(_profile(10**log_c, curves.size_log_p[reached], table[reached, column], space))
    used = [p for p in profiles if p.status == USED]
    if len(used) < MIN_PROFILES:
        counts = {s: sum(p.status == s for p in profiles) for s in (FEW, FLAT, OUTSIDE)}
        why = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no budgets"
        raise IsoFlopError(
            f"{len(used)} of {len(profiles)} IsoFLOP profiles are usable ({why}); the fit needs {MIN_PROFILES}:"
            f" train {MIN_SIZES} or more model sizes at each of several compute budgets, around their best size"
        )
    log_c = np.log10([p.compute for p in used])
    log_p = np.log10(np.array([p.best_params for p in used], dtype=float))  # set on every used profile
    p_slope, p_coef = np.polyfit(log_c, log_p, 1)
    log_d = log_c - np.log10(compute_ratio) - log_p
    d_slope, d_coef = np.polyfit(log_c, log_d, 1)
    return IsoFlop(tuple(profiles), float(p_slope), float(p_coef), float(d_slope), float(d_coef), compute_ratio)


def _profile(compute: float, log_p: np.ndarray, log_e: np.ndarray, space: str) -> Profile:
    params, errors = tuple(10**log_p), tuple(np.exp(log_e))
    if len(log_p) < MIN_SIZES:
        return Profile(compute, params, errors, FEW)
    near = np.abs(log_p - log_p[np.argmin(log_e)]) <= WINDOW
    log_p, log_e = log_p[near], log_e[near]
    if len(log_p) < MIN_SIZES:
        return Profile(compute, params, errors, FEW)
    fitted = (float(10 ** log_p.min()), float(10 ** log_p.max()))
    y = log_e if space == "log" else np.exp(log_e)
    curve = np.polyfit(log_p, y, 3 if len(log_p) >= CUBIC_SIZES else 2)
    vertex = _minimum(curve)
    if vertex is None:
        return Profile(compute, params, errors, FLAT, fitted, curve=tuple(curve))
    value = float(np.polyval(curve, vertex))
    position = float((vertex - log_p.min()) / (log_p.max() - log_p.min()))
    status = USED if 0 <= position <= 1 else OUTSIDE
    best_error = math.exp(value) if space == "log" else value
    best = float(10 ** min(vertex, 30.0))  # a minimum far outside (a nearly flat valley) stays a number
    return Profile(compute, params, errors, status, fitted, best, best_error, position, tuple(curve))


def _minimum(curve: np.ndarray) -> float | None:
    """The local minimum of a parabola or cubic (coefficients highest power first); None if it has none."""
    slope, bend = np.polyder(curve), np.polyder(curve, 2)
    roots = np.roots(slope) if np.any(slope) else np.array([])
    minima = [float(r.real) for r in roots if abs(r.imag) < 1e-12 and np.polyval(bend, r.real) > 0]
    return minima[0] if minima else None
