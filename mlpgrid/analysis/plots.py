"""Paper-style figures of a frontier analysis (Bachmann et al. 2023, Figs. 1, 6 and 7), the
three approaches' allocations side by side and the IsoFLOP profiles (Hoffmann et al. 2022,
Figs. 3 and A5)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from mlpgrid.analysis import outputs  # noqa: E402
from mlpgrid.analysis.frontier import (  # noqa: E402
    APPROACHES,
    MIN_FITTED_SHARE,
    Analysis,
    Bootstrap,
    Labels,
    PowerLaw,
)
from mlpgrid.analysis.isoflop import USED  # noqa: E402
from mlpgrid.tracking.points import Point  # noqa: E402

DPI = 200
# Above this many points Fig. 1 shows their density: drawing a million sized markers with white
# edges took 34 s, plain dots of one size 9 s, hexagonal cells 3.5 s (and markers that dense
# hide each other anyway).
DENSE_POINTS = 20_000
FAMILY_MARKERS = {"B": "o", "S": "v", "Mixer": "s", "ResMLP": "D", "RepMLPNet": "P", "": "o"}  # by Point.family
_FAMILY_NAMES = {"B": "B-MLP", "S": "S-MLP"}


def _band(ax: plt.Axes, x: np.ndarray, curves: list[np.ndarray], boot: Bootstrap, color: str,
          centre: np.ndarray) -> None:  # fmt: skip
    """The resamples' central interval around the fitted ``centre``: only where most resamples
    fitted (as the report's intervals) and the fit lies inside it; else a legend line says why."""
    if len(curves) < max(2, MIN_FITTED_SHARE * boot.repeats):
        ax.plot([], [], " ", label=f"no interval: {len(curves)} of {boot.repeats} resamples fitted")
        return
    tail = (1 - boot.level) / 2 * 100
    lo, hi = np.percentile(np.array(curves), [tail, 100 - tail], axis=0)
    if np.any(centre < lo * (1 - 1e-6)) or np.any(centre > hi * (1 + 1e-6)):
        ax.plot([], [], " ", label="no interval: the fit lies outside its resamples' band")
        return
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0, label=f"{boot.level:.0%} bootstrap interval")


def _compute_axis(analysis: Analysis, budgets: list[float]) -> np.ndarray:
    computes = [p.compute for p in analysis.points] + list(budgets)
    return np.logspace(np.log10(min(computes)) - 0.2, np.log10(max(computes)) + 0.2, 200)


def error_vs_compute(analysis: Analysis, boot: Bootstrap, budgets: list[float], path: Path, labels: Labels,
                     constant_rate: Sequence[tuple[float, float]] = ()) -> Path:  # fmt: skip
    """Fig. 1: every (model, N, T) by colour = model size and marker size = N, lines joining a
    (model, N) across T (above :data:`DENSE_POINTS` points, their density instead), the frontier
    circled and the fitted E(C) dashed; wsd trunks' constant-rate epochs as grey crosses."""
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    points = analysis.selected
    params = np.array([p.params for p in points])
    norm = LogNorm(params.min(), params.max() * 1.0001)
    draw = _density if len(points) > DENSE_POINTS else _markers
    colours = draw(ax, points, params, norm)
    named = draw is _markers and len({p.model for p in points}) <= LEGEND_MODELS and all(p.model for p in points)
    if constant_rate:
        compute, error = zip(*constant_rate, strict=True)
        ax.scatter(compute, error, marker="x", color="grey", s=18, zorder=1,
                   label="wsd before its cooldown (not cooled down, not fitted)")  # fmt: skip
    ax.scatter([p.compute for p in analysis.frontier], [p.error for p in analysis.frontier], s=160,
               facecolors="none", edgecolors="black", linewidths=1, zorder=3, label="frontier")  # fmt: skip
    x = _compute_axis(analysis, budgets)
    fit = analysis.fit
    _band(ax, x, [s.fit(x) for s in boot.samples], boot, "black", fit(x))
    ax.plot(x, fit(x), "k--", linewidth=1.5, zorder=4,
            label=f"E(C) = {fit.a:.3g}({fit.b:.2g} + C)$^{{-{fit.alpha:.3f}}}$ + {fit.e_inf:.3f}")  # fmt: skip
    if budgets:
        ax.errorbar(budgets, fit(np.array(budgets)), fmt="*", color="crimson", markersize=12, zorder=5,
                    yerr=_yerr(boot, budgets, fit), label="query")  # fmt: skip
    if named:  # each model a legend entry, in the colour of its size
        for model, size in sorted({(p.model, p.params) for p in points}, key=lambda m: m[1]):
            ax.plot([], [], "o", color=plt.get_cmap("viridis")(norm(size)), label=f"{model} ({_count(size)})")
    else:
        fig.colorbar(colours, ax=ax, label="parameters P" + (" (median)" if draw is _density else ""))
    ax.set(xscale="log", yscale="log", xlabel=labels.compute, ylabel=labels.error)
    _title(ax, f"{labels.error.capitalize()} vs compute", labels)
    _plain_ticks(ax.yaxis, [p.error for p in points])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(True, which="both", alpha=0.2)
    return _save(fig, path)


# Up to this many models, error_vs_compute names each in its legend; beyond, a colour bar of P.
LEGEND_MODELS = 12


def _count(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def _title(ax: plt.Axes, what: str, labels: Labels) -> None:
    ax.set_title(f"{what}\n{labels.source}" if labels.source else what, fontsize=10)


def _plain_ticks(axis: Any, values: Sequence[float] | np.ndarray, count: bool = False) -> None:
    """Tick labels as plain numbers on a log axis (0.4, not 4×10⁻¹; 20k for a count of 2×10⁴), the
    ticks between powers of ten labelled too where ``values`` span less than a decade."""
    plain = FuncFormatter(lambda value, _: _count(value) if count and value >= 1e3 else f"{value:g}")
    axis.set_major_formatter(plain)
    if max(values) < 10 * min(values):
        axis.set_minor_formatter(plain)


# Up to this many points each is labelled with its T.
ANNOTATED_POINTS = 200


def _markers(ax: plt.Axes, points: list[Point], params: np.ndarray, norm: LogNorm) -> Any:
    """Each point a marker sized by its N, shaped by its model family, labelled with its T (up to
    :data:`ANNOTATED_POINTS`); a line through each (model, N)'s epochs."""
    examples = np.array([p.examples for p in points])
    span = np.log(examples.max() / examples.min()) or 1.0

    def size(n: Any) -> Any:
        return 25 + 120 * np.log(n / examples.min()) / span

    runs = defaultdict(list)
    for p in points:
        runs[(p.model or p.params, p.examples)].append(p)
    lines = [sorted(run, key=lambda p: p.epochs) for run in runs.values() if len(run) > 1]
    if len(points) <= ANNOTATED_POINTS:  # T beside each point: epochs grow along each line
        for p in points:
            ax.annotate(f"{p.epochs:g}", (p.compute, p.error), textcoords="offset points", xytext=(3, 3), fontsize=5,
                        color="dimgrey")  # fmt: skip
    # One artist for all the lines: one ax.plot per line took 150 s for 10^5 points.
    ax.add_collection(LineCollection([[(p.compute, p.error) for p in line] for line in lines], cmap="viridis",
                                     norm=norm, array=[line[0].params for line in lines], alpha=0.6, linewidth=1,
                                     zorder=1))  # fmt: skip
    compute, error = np.array([p.compute for p in points]), np.array([p.error for p in points])
    families = np.array([p.family for p in points])
    several = len(set(families)) > 1
    for family in dict.fromkeys(families):  # a marker per model family, named when there are several
        mine = families == family
        dots = ax.scatter(compute[mine], error[mine], c=params[mine], cmap="viridis", norm=norm,
                          s=size(examples[mine]), marker=FAMILY_MARKERS[family], edgecolors="white", linewidths=0.5,
                          zorder=2)  # fmt: skip
        if several:
            ax.scatter([], [], marker=FAMILY_MARKERS[family], color="grey", label=_FAMILY_NAMES.get(family, family))
    shown: list[float] = []  # sizes for the legend, each at least 1.5x apart
    for n in sorted(set(examples), reverse=True):
        if not shown or n <= shown[-1] / 1.5:
            shown.append(n)
    for n in sorted(shown)[-4:]:
        ax.scatter([], [], s=size(n), color="grey", label=f"N = {n:,.0f}")
    if lines:
        ax.plot([], [], color="grey", alpha=0.6, label="one (model, N) across T" + (
            " (T beside each point)" if len(points) <= ANNOTATED_POINTS else ""))  # fmt: skip
    return dots


def _density(ax: plt.Axes, points: list[Point], params: np.ndarray, norm: LogNorm) -> Any:
    """The points as hexagonal cells, each coloured by the median P of the points in it."""
    return ax.hexbin([p.compute for p in points], [p.error for p in points], C=params, reduce_C_function=np.median,
                     xscale="log", yscale="log", gridsize=150, cmap="viridis", norm=norm, mincnt=1, linewidths=0,
                     zorder=2)  # fmt: skip


def _yerr(boot: Bootstrap, budgets: list[float], fit: PowerLaw) -> np.ndarray | None:
    intervals = [i for i in (boot.error_ci(c) for c in budgets) if i is not None]
    if len(intervals) < len(budgets):
        return None
    centre = fit(np.array(budgets))
    return np.array([[max(c - lo, 0), max(hi - c, 0)] for c, (lo, hi) in zip(centre, intervals, strict=True)]).T


COLOURS = {"envelope": "tab:blue", "isoflop": "tab:orange", "parametric": "tab:green"}
NAMES = {"envelope": "1: best trial per compute bin", "isoflop": "2: IsoFLOP minima", "parametric": "3: E(P, D)"}


def allocation(analysis: Analysis, boot: Bootstrap, budgets: list[float], path: Path, labels: Labels) -> Path | None:
    """Fig. 7 three ways: P*(C) and D*(C) = (N T)*(C) of each approach fitted, with the points
    each rests on (the best trial of each compute bin, the IsoFLOP minima) and its intervals."""
    fitted = analysis.fitted
    if all(fitted.approach(name) is None for name in APPROACHES):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    x = _compute_axis(analysis, budgets)
    points = {"envelope": [(p.compute, p.params, p.examples_seen) for p in fitted.allocation.bins]
              if fitted.allocation else []}  # fmt: skip
    if fitted.isoflop:
        used = fitted.isoflop.used()
        ratio = fitted.isoflop.compute_ratio
        best = [(p.compute, float(p.best_params)) for p in used if p.best_params is not None]  # every used one
        points["isoflop"] = [(c, params, c / ratio / params) for c, params in best]
    panels = [("params", "P*(C), parameters", 1), ("examples_seen", f"D*(C), {labels.examples} seen", 2)]
    for ax, (attr, label, column) in zip(axes, panels, strict=True):
        for name in APPROACHES:
            fit = fitted.approach(name)
            if fit is None:
                continue
            colour = COLOURS[name]
            if points.get(name):
                ax.scatter([p[0] for p in points[name]], [p[column] for p in points[name]], color=colour, s=18,
                           zorder=3)  # fmt: skip
            samples = [a for a in (s.approach(name) for s in boot.samples) if a is not None]
            _band(ax, x, [getattr(a, attr)(x) for a in samples], boot, colour, getattr(fit, attr)(x))
            exponent = fit.params_exponent if attr == "params" else fit.examples_exponent
            ax.plot(
                x, getattr(fit, attr)(x), color=colour, linestyle="--", label=f"{NAMES[name]}: ∝ C$^{{{exponent:.3f}}}$"
            )
        ax.set(xscale="log", yscale="log", xlabel=labels.compute, ylabel=label)
        handles, names = ax.get_legend_handles_labels()
        keep = [i for i, n in enumerate(names) if "interval" not in n]  # one band label per figure is enough
        ax.legend([handles[i] for i in keep], [names[i] for i in keep], fontsize=7)
        ax.grid(True, which="both", alpha=0.2)
    drawn = [name for name in APPROACHES if fitted.approach(name) is not None]
    missing = [NAMES[name].split(":")[0] for name in APPROACHES if name not in drawn]
    why = f"; approach {' and '.join(missing)} not fitted (the report says why)" if missing else ""
    fig.suptitle(f"Compute-optimal allocation by approach {', '.join(NAMES[n].split(':')[0] for n in drawn)}"
                 f"{why} (bands: {boot.level:.0%} bootstrap intervals)\n{labels.source}", fontsize=10)  # fmt: skip
    return _save(fig, path)


def isoflop_profiles(analysis: Analysis, path: Path, labels: Labels) -> Path | None:
    """Each IsoFLOP profile: the sizes at the budget, the parabola and its minimum (hollow where
    the profile was not used: too few sizes, no valley, or a minimum outside the sizes)."""
    iso = analysis.fitted.isoflop
    if iso is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    profiles = [p for p in iso.profiles if len(p.params) > 0]
    norm = LogNorm(min(p.compute for p in profiles), max(p.compute for p in profiles) * 1.0001)
    cmap = plt.get_cmap("plasma")
    for p in profiles:
        colour, used = cmap(norm(p.compute)), p.status == USED
        ax.scatter(p.params, p.errors, color=colour, s=14, alpha=1 if used else 0.35)
        if p.curve is not None and p.fitted is not None:
            low, high = np.log10(p.fitted)
            log_p = np.linspace(low, high, 50)
            y = np.polyval(p.curve, log_p)
            ax.plot(10**log_p, np.exp(y) if analysis.options.space == "log" else y, color=colour,
                    alpha=1 if used else 0.35, linewidth=1)  # fmt: skip
        if p.best_params is not None and used:
            ax.scatter([p.best_params], [p.best_error or np.nan], marker="*", s=90, color=colour, edgecolors="black",
                       linewidths=0.5, zorder=4)  # fmt: skip
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"budget: {labels.compute}")
    ax.set(xscale="log", xlabel="parameters P", ylabel=labels.error)
    _title(ax, f"IsoFLOP profiles: {len(iso.used())} of {len(iso.profiles)} used (stars: their minima)", labels)
    ax.grid(True, which="both", alpha=0.2)
    return _save(fig, path)


def bottlenecks(analysis: Analysis, path: Path, labels: Labels) -> Path:
    """Fig. 6: the best error at each model size P and at each subset size N, with the fitted
    E_inf + A x^-alpha where there are enough distinct values."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, label in zip(axes, ("params", "examples"), ("parameters P", f"{labels.examples} N"), strict=True):
        values, best = analysis.best_at[axis]
        ax.scatter(values, best, color="tab:orange", zorder=3, label=f"best error at each {label[-1]}")
        law = analysis.laws.get(axis)
        if law is not None:
            x = np.logspace(np.log10(values.min()) - 0.2, np.log10(values.max()) + 0.5, 100)
            ax.plot(x, law(x), "k--", label=f"E$_\\infty$ + A·x$^{{-{law.exponent:.2f}}}$")
        else:
            why = next((n.split(": ", 1)[1] for n in analysis.fitted.notes if n.startswith(f"E({axis})")), "")
            ax.set_title(f"no law fitted: {why}", fontsize=7)
        ax.axhline(analysis.fit.e_inf, color="grey", linestyle=":", label="E$_\\infty$ of E(C)")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel=labels.error)
        _plain_ticks(ax.yaxis, best)
        _plain_ticks(ax.xaxis, values, count=True)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.2)
    fig.suptitle(f"Bottlenecked scaling: E(P) and E(N)\n{labels.source}", fontsize=10)
    return _save(fig, path)


def by_family(analyses: dict[str, Analysis], path: Path, labels: Labels) -> Path:
    """Each model family's trials (a colour and marker each), its frontier and its own E(C)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    computes = [p.compute for a in analyses.values() for p in a.points]
    x = np.logspace(np.log10(min(computes)) - 0.2, np.log10(max(computes)) + 0.2, 200)
    for family, analysis in analyses.items():
        points, marker = analysis.selected, FAMILY_MARKERS[family]
        dots = ax.scatter([p.compute for p in points], [p.error for p in points], marker=marker, s=18, alpha=0.5)
        colour: Any = dots.get_facecolor()[0]
        ax.scatter([p.compute for p in analysis.frontier], [p.error for p in analysis.frontier], marker=marker, s=60,
                   facecolors="none", edgecolors=[colour])  # fmt: skip
        fit = analysis.fit
        name = _FAMILY_NAMES.get(family, family)
        ax.plot(x, fit(x), color=colour, linestyle="--", label=f"{name}: α = {fit.alpha:.3f}, E∞ = {fit.e_inf:.3f}")
    ax.set(xscale="log", yscale="log", xlabel=labels.compute, ylabel=labels.error)
    _title(ax, "By model family", labels)
    _plain_ticks(ax.yaxis, [p.error for a in analyses.values() for p in a.points])
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    """The figure as ``path``, replacing an earlier one, never written through a link
    (:func:`mlpgrid.analysis.outputs.replace_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        outputs.replace_file(path, lambda f: fig.savefig(f, dpi=DPI, format="png"))
    finally:
        plt.close(fig)
    return path


def not_drawn(analysis: Analysis) -> dict[str, str]:
    """The figures :func:`draw_all` leaves out for this analysis, each with why."""
    notes = analysis.fitted.notes
    missing = {}
    if analysis.fitted.isoflop is None:
        missing["isoflop.png"] = next((n for n in notes if n.startswith("IsoFLOP")), "no IsoFLOP profiles")
    if all(analysis.fitted.approach(name) is None for name in APPROACHES):
        missing["allocation.png"] = "no approach to the allocation was fitted: " + "; ".join(notes)
    return missing


def draw_all(analysis: Analysis, boot: Bootstrap, budgets: list[float], folder: Path, labels: Labels | None = None,
             constant_rate: Sequence[tuple[float, float]] = ()) -> list[Path]:  # fmt: skip
    """Every figure as a PNG in ``folder``; returns their paths. ``constant_rate``: (compute,
    error) of wsd trunks before their cooldown, drawn apart and not fitted."""
    labels = labels or Labels()
    paths = [
        error_vs_compute(analysis, boot, budgets, folder / "error_vs_compute.png", labels, constant_rate),
        allocation(analysis, boot, budgets, folder / "allocation.png", labels),
        isoflop_profiles(analysis, folder / "isoflop.png", labels),
        bottlenecks(analysis, folder / "bottlenecks.png", labels),
    ]
    return [p for p in paths if p is not None]
