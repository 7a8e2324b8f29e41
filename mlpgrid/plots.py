"""Paper-style figures of a frontier analysis (Bachmann et al. 2023, Figs. 1, 6 and 7)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from mlpgrid.frontier import Analysis, Bootstrap, PowerLaw  # noqa: E402
from mlpgrid.points import Point  # noqa: E402

DPI = 200
# Above this many points Fig. 1 shows their density: drawing a million sized markers with white
# edges took 34 s, plain dots of one size 9 s, hexagonal cells 3.5 s (and markers that dense
# hide each other anyway).
DENSE_POINTS = 20_000


def _band(ax: plt.Axes, x: np.ndarray, curves: list[np.ndarray], level: float, color: str) -> None:
    if len(curves) >= 2:
        tail = (1 - level) / 2 * 100
        lo, hi = np.percentile(np.array(curves), [tail, 100 - tail], axis=0)
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0, label=f"{level:.0%} bootstrap interval")


def _compute_axis(analysis: Analysis, budgets: list[float]) -> np.ndarray:
    computes = [p.compute for p in analysis.points] + list(budgets)
    return np.logspace(np.log10(min(computes)) - 0.2, np.log10(max(computes)) + 0.2, 200)


def error_vs_compute(analysis: Analysis, boot: Bootstrap, budgets: list[float], path: Path) -> Path:
    """Fig. 1: every (model, N, T) by colour = model size and marker size = N, lines joining a
    (model, N) across T (above :data:`DENSE_POINTS` points, their density instead), the frontier
    circled and the fitted E(C) dashed."""
    fig, ax = plt.subplots(figsize=(7, 5))
    points = analysis.selected
    params = np.array([p.params for p in points])
    norm = LogNorm(params.min(), params.max() * 1.0001)
    draw = _density if len(points) > DENSE_POINTS else _markers
    colours = draw(ax, points, params, norm)
    ax.scatter([p.compute for p in analysis.frontier], [p.error for p in analysis.frontier], s=160,
               facecolors="none", edgecolors="black", linewidths=1, zorder=3, label="frontier")  # fmt: skip
    x = _compute_axis(analysis, budgets)
    fit = analysis.fit
    _band(ax, x, [s.fit(x) for s in boot.samples], boot.level, "black")
    ax.plot(x, fit(x), "k--", linewidth=1.5, zorder=4,
            label=f"E(C) = {fit.a:.3g}({fit.b:.2g} + C)$^{{-{fit.alpha:.3f}}}$ + {fit.e_inf:.3f}")  # fmt: skip
    if budgets:
        ax.errorbar(budgets, fit(np.array(budgets)), fmt="*", color="crimson", markersize=12, zorder=5,
                    yerr=_yerr(boot, budgets, fit), label="query")  # fmt: skip
    fig.colorbar(colours, ax=ax, label="parameters P" + (" (median)" if draw is _density else ""))
    ax.set(xscale="log", yscale="log", xlabel="compute C = FLOP(f) · 3 · N · T", ylabel="error",
           title="Error vs compute")  # fmt: skip
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, which="both", alpha=0.2)
    return _save(fig, path)


def _markers(ax: plt.Axes, points: list[Point], params: np.ndarray, norm: LogNorm) -> Any:
    """Each point a marker sized by its N; a line through each (model, N)'s epochs."""
    examples = np.array([p.examples for p in points])
    span = np.log(examples.max() / examples.min()) or 1.0

    def size(n: Any) -> Any:
        return 25 + 120 * np.log(n / examples.min()) / span

    runs = defaultdict(list)
    for p in points:
        runs[(p.model or p.params, p.examples)].append(p)
    lines = [sorted(run, key=lambda p: p.epochs) for run in runs.values() if len(run) > 1]
    # One artist for all the lines: one ax.plot per line took 150 s for 10^5 points.
    ax.add_collection(LineCollection([[(p.compute, p.error) for p in line] for line in lines], cmap="viridis",
                                     norm=norm, array=[line[0].params for line in lines], alpha=0.6, linewidth=1,
                                     zorder=1))  # fmt: skip
    dots = ax.scatter([p.compute for p in points], [p.error for p in points], c=params, cmap="viridis", norm=norm,
                      s=size(examples), edgecolors="white", linewidths=0.5, zorder=2)  # fmt: skip
    shown: list[float] = []  # sizes for the legend, each at least 1.5x apart
    for n in sorted(set(examples), reverse=True):
        if not shown or n <= shown[-1] / 1.5:
            shown.append(n)
    for n in sorted(shown)[-4:]:
        ax.scatter([], [], s=size(n), color="grey", label=f"N = {n:,.0f}")
    return dots


def _density(ax: plt.Axes, points: list[Point], params: np.ndarray, norm: LogNorm) -> Any:
    """The points as hexagonal cells, each coloured by the median P of the points in it."""
    return ax.hexbin([p.compute for p in points], [p.error for p in points], C=params, reduce_C_function=np.median,
                     xscale="log", yscale="log", gridsize=150, cmap="viridis", norm=norm, mincnt=1, linewidths=0,
                     zorder=2)  # fmt: skip


def _yerr(boot: Bootstrap, budgets: list[float], fit: PowerLaw) -> np.ndarray | None:
    intervals = [boot.error_ci(c) for c in budgets]
    if any(i is None for i in intervals):
        return None
    centre = fit(np.array(budgets))
    return np.array([[max(c - lo, 0), max(hi - c, 0)] for c, (lo, hi) in zip(centre, intervals, strict=True)]).T


def allocation(analysis: Analysis, boot: Bootstrap, budgets: list[float], path: Path) -> Path | None:
    """Fig. 7: P*(C) and D*(C) = (N T)*(C), the best trial of each compute bin and the fits."""
    alloc = analysis.allocation
    if alloc is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = _compute_axis(analysis, budgets)
    samples = [s.allocation for s in boot.samples if s.allocation]
    panels = [
        ("params", "P*(C), parameters", alloc.params_exponent, alloc.params, [a.params for a in samples]),
        ("examples_seen", "D*(C) = N·T, examples seen", alloc.examples_exponent, alloc.examples_seen,
         [a.examples_seen for a in samples]),
    ]  # fmt: skip
    for ax, (attr, label, exponent, law, sample_laws) in zip(axes, panels, strict=True):
        bins = alloc.bins
        ax.scatter([p.compute for p in bins], [getattr(p, attr) for p in bins], color="tab:blue", zorder=3,
                   label="best trial per compute bin")  # fmt: skip
        _band(ax, x, [s(x) for s in sample_laws], boot.level, "tab:blue")
        ax.plot(x, law(x), "k--", label=f"∝ C$^{{{exponent:.2f}}}$")
        ax.set(xscale="log", yscale="log", xlabel="compute C", ylabel=label)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.2)
    fig.suptitle("Compute-optimal allocation")
    return _save(fig, path)


def bottlenecks(analysis: Analysis, path: Path) -> Path:
    """Fig. 6: the best error at each model size P and at each subset size N, with the fitted
    E_inf + A x^-alpha where there are enough distinct values."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, label in zip(axes, ("params", "examples"), ("parameters P", "examples N"), strict=True):
        values, best = analysis.best_at[axis]
        ax.scatter(values, best, color="tab:orange", zorder=3, label=f"best error at each {label[-1]}")
        law = analysis.laws.get(axis)
        if law is not None:
            x = np.logspace(np.log10(values.min()) - 0.2, np.log10(values.max()) + 0.5, 100)
            ax.plot(x, law(x), "k--", label=f"E$_\\infty$ + A·x$^{{-{law.exponent:.2f}}}$")
        ax.axhline(analysis.fit.e_inf, color="grey", linestyle=":", label="E$_\\infty$ of E(C)")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="error")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.2)
    fig.suptitle("Bottlenecked scaling: E(P) and E(N)")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def draw_all(analysis: Analysis, boot: Bootstrap, budgets: list[float], folder: Path) -> list[Path]:
    """Every figure as a PNG in ``folder``; returns their paths."""
    paths = [
        error_vs_compute(analysis, boot, budgets, folder / "error_vs_compute.png"),
        allocation(analysis, boot, budgets, folder / "allocation.png"),
        bottlenecks(analysis, folder / "bottlenecks.png"),
    ]
    return [p for p in paths if p is not None]
