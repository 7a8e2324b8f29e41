"""The frontier of a grid, as one report: what ``mlpgrid frontier`` computes, callable without the CLI.

:func:`frontier_report` takes the points (a grid's finished trials from MLflow, or a CSV),
fits the frontier (:func:`mlpgrid.analysis.frontier.analyse`) with bootstrap intervals, answers the
budget queries with a concrete trial of the grid's family, holds out the costliest trials if
asked, compares earlier proposals with what their trials measured, writes a new proposal if
asked, draws the figures if asked (``plot_dir``), and logs the report (and the figures) on the
grid's MLflow run. It returns the report as plain data (what ``--json`` prints).

MLflow's client (2.3 s to import) and matplotlib are imported only where they are used: a
``--from-csv`` report needs neither, and the client is imported while the grid's runs are read.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mlpgrid.analysis import frontier, outputs, propose
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.grid.spec import GridSpec
from mlpgrid.tracking import reader
from mlpgrid.tracking.points import Point


def _tracking() -> ModuleType:
    """:mod:`mlpgrid.tracking.writer`, imported on first use: it imports MLflow's client."""
    return importlib.import_module("mlpgrid.tracking.writer")


class ReportError(ValueError):
    """The report cannot be made; the message says why, for the user."""


class RequestError(ReportError):
    """The request itself is incomplete (what to read, or where to write, is missing)."""


@dataclass(frozen=True)
class FrontierRequest:
    """What to fit and ask. ``grid`` or ``csv_file`` (or both: the grid's family, the CSV's points)."""

    grid: GridSpec | None = None
    csv_file: Path | None = None  # points from elsewhere instead of the grid's MLflow runs
    metric: str | None = None  # the trials' metric to use as the error; None: the grid's, else test_error
    curves: bool = False  # also the earlier epochs of constant-learning-rate trials, as points
    budgets: tuple[float, ...] = ()  # compute budgets to query
    repeats: int = 200  # bootstrap resamples; 0 = none
    level: float = 0.95  # of the intervals
    seed: int = 0  # of the bootstrap's resampling
    options: frontier.FitOptions = frontier.FitOptions()  # fit space, bins per decade, a fixed E_inf, starts
    holdout: float | None = None  # also fit without this most expensive fraction of the trials
    by_family: bool = False  # also fit each model family (B-MLP, S-MLP, Mixer, ResMLP, RepMLPNet) on its own
    propose: float | None = None  # write a grid of trials the fit calls compute-optimal at this budget ...
    out: Path | None = None  # ... to this file
    plot_dir: Path | None = None  # draw the figures here (and log them on the grid's run)

    @property
    def source(self) -> str:
        return str(self.csv_file or (self.grid.path if self.grid else ""))


def _check(request: FrontierRequest) -> None:
    if request.grid is None and request.csv_file is None:
        raise RequestError("give a GRID_FILE, --from-csv FILE, or both")
    if request.curves and request.csv_file is not None:
        raise RequestError("--curves reads the per-epoch errors of a grid's runs; a CSV gives its points itself")
    if request.propose and (request.grid is None or request.out is None):
        raise RequestError("--propose needs a GRID_FILE (its settings and family) and --out FILE")
    if request.out is not None:
        try:
            outputs.check_new(request.out)  # before any work: the grid file itself, say, is refused here
        except outputs.OutputError as e:
            raise RequestError(f"--out {e}") from None
    if request.plot_dir is not None:
        try:
            outputs.check_folder(request.plot_dir)
        except outputs.OutputError as e:
            raise RequestError(f"--plot-dir {e}") from None


@dataclass(frozen=True)
class _Read:
    points: list[Point]
    left_out: dict[str, int]  # trials not used, by why
    grid_run: reader.GridRun | None
    labels: frontier.Labels
    curves: dict[str, Any] | None = None  # with --curves: the trials that give earlier epochs, and why


def _points(request: FrontierRequest, uri: str) -> _Read:
    """The points to fit, how many trials were left out (by why), the grid's run if any, and
    what to call the axes."""
    if request.csv_file:
        try:
            points, labels = frontier.read_table(request.csv_file)
            return _Read(points, {}, None, labels)
        except frontier.FitError as e:
            raise ReportError(str(e)) from None
    grid = request.grid
    assert grid is not None, "_check: a grid or a CSV"
    metric = request.metric or grid.metric
    try:
        grid_run = reader.find_grid(grid, uri)
        records = reader.trial_runs(grid_run) if grid_run else {}
        points, left_out = reader.finished_points(grid_run, metric, records) if grid_run else ([], {})
        curves = None
        if request.curves and points and grid_run:
            extra, trials, stable = reader.curve_points(grid_run, metric, records, points)
            curves = {"points": len(extra), "trials": trials,
                      "constant_rate": [p.as_dict() for p in stable]}  # fmt: skip
            points = points + extra
    except Exception as e:  # noqa: BLE001 - e.g. an unreachable server
        raise ReportError(reader.shown(f"cannot read MLflow tracking URI {uri}: {e}")) from None
    if not points:
        found = ", ".join(f"{n} {why}" for why, n in left_out.items() if n) or "no trial runs"
        raise ReportError(reader.shown(f"{grid.path}: no finished trial with metric {metric!r} in {uri} ({found})"))
    datasets = ", ".join(dict.fromkeys(t.config.dataset for t in grid.trials))
    labels = frontier.Labels(error=metric.replace("_", " "), source=f"{grid.name}: {datasets}, {metric}")
    return _Read(points, left_out, grid_run, labels, curves)


def _query(answer: dict[str, Any], grid: GridSpec | None, analysis: frontier.Analysis) -> dict[str, Any]:
    """A query's answer plus, with a grid, the nearest model of its family with N and T."""
    if grid is None or "params" not in answer:
        return answer
    return answer | propose.recommend(grid, analysis.frontier, answer["budget"], answer["params"])


def _proposal_results(records: list[dict[str, Any]], points: list[Point]) -> list[dict[str, Any]]:
    """Each recorded proposal with the measured error of its trials that have finished."""
    measured = {p.trial_id: p.error for p in points}
    return [
        record | {"trials": [t | {"measured_error": measured.get(t["trial_id"])} for t in record["trials"]]}
        for record in records
    ]


def _families(points: list[Point], request: FrontierRequest) -> tuple[dict[str, Any], dict[str, frontier.Analysis]]:
    """Each model family's own frontier, E(C) and allocations (or why it has none): whether the
    exponents and the split change with inductive bias; and the analyses, for the figure."""
    by_family: dict[str, list[Point]] = {}
    for p in points:
        by_family.setdefault(p.family, []).append(p)
    out, analyses = {}, {}
    for family, members in sorted(by_family.items()):
        try:
            analyses[family] = frontier.analyse(members, request.options)
        except frontier.FitError as e:
            out[family] = {"points": len(members), "error": str(e)}
            continue
        boot = frontier.bootstrap(analyses[family], request.repeats, request.level, request.seed)
        summary = frontier.summary(analyses[family], boot)
        out[family] = {k: summary[k] for k in ("points", "frontier", "fit", "approaches", "notes")}
    return out, analyses


def _propose(grid: GridSpec, grid_run: reader.GridRun, analysis: frontier.Analysis, boot: frontier.Bootstrap,
             budget: float, out: Path) -> dict[str, Any]:  # fmt: skip
    """Write the proposal's grid file, record it on the grid's run, and return the record."""
    if analysis.allocation is None:
        raise ReportError("cannot propose trials: " + "; ".join(analysis.notes))
    params = float(analysis.allocation.params(budget))
    base = propose.template(grid, analysis.frontier, budget)
    configs = propose.iso_compute(budget, params, base, propose.family_models(grid, base))
    fit = analysis.fit
    header = (
        f"Proposed by `mlpgrid frontier {grid.path} --propose {budget:g}`: trials that each spend C = {budget:.3g},\n"
        f"with models around the fitted P*(C) = {params:.3g} parameters. If the fit is right, the one nearest\n"
        f"P* reaches the lowest error, about E(C) = {fit(budget):.4f}. It runs under the grid's name, so\n"
        f"`mlpgrid frontier {grid.path}` reports predicted vs measured error once these have finished.\n"
        "\n"
        f"  mlpgrid run {out}"
    )
    try:
        proposed = propose.write_grid(out, grid, configs, header)
    except outputs.OutputError as e:
        raise ReportError(f"--out {e}") from None
    record = {
        "file": str(out), "budget": budget, "params": params, "fit": fit.as_dict(),
        "trials": [
            {"trial_id": t.id, "model": t.config.model, "examples": t.config.num_examples, "epochs": t.config.epochs,
             "compute": t.compute, "predicted_error": float(fit(t.compute)),
             "predicted_error_ci": boot.error_ci(t.compute)}
            for t in proposed.trials
        ],
    }  # fmt: skip
    _tracking().log_artifacts(grid_run, {f"proposals/{out.stem}.json": json.dumps(record, indent=2),
                                      f"proposals/{out.name}": out.read_text()})  # fmt: skip
    return record


@dataclass
class FrontierReport:
    """What ``mlpgrid frontier`` computes. Its sections are plain data shaped as ``--json``
    prints them (:meth:`as_dict`): the fit and its allocations (``summary``, see
    :func:`mlpgrid.analysis.frontier.summary`), the budgets asked about, and what was asked besides."""

    excluded: int  # trials left out for a reason other than still running
    left_out: dict[str, int]  # trials not used, by why
    labels: dict[str, str]  # what to call the axes
    summary: dict[str, Any]  # points, frontier, fit, allocation, approaches, bottlenecks, options, bootstrap, notes
    queries: list[dict[str, Any]]  # one per budget asked about
    curves: dict[str, Any] | None = None  # with --curves: the trials that give earlier epochs
    families: dict[str, Any] | None = None  # with --by-family: each family's own fit
    holdout: dict[str, Any] | None = None  # with --holdout: the prediction of the held-out trials
    proposals: list[dict[str, Any]] | None = None  # proposed grids run since, against their prediction
    proposed: dict[str, Any] | None = None  # with --propose: the grid file written
    plots: list[str] = field(default_factory=list)  # the figures drawn
    plots_not_drawn: dict[str, str] = field(default_factory=dict)  # figures left out, and why
    plots_replaced: list[str] = field(default_factory=list)  # of plots, those that replaced a file of their name

    def as_dict(self) -> dict[str, Any]:
        """The report as ``--json`` prints it (and the grid's run keeps as ``frontier.json``)."""
        out: dict[str, Any] = {"excluded": self.excluded, "left_out": self.left_out, "labels": self.labels}
        if self.curves is not None:
            out["curves"] = self.curves
        out |= self.summary
        out["queries"] = self.queries
        sections = {"families": self.families, "holdout": self.holdout, "proposals": self.proposals,
                    "proposed": self.proposed}  # fmt: skip
        figures = {"plots": self.plots, "plots_not_drawn": self.plots_not_drawn, "plots_replaced": self.plots_replaced}
        return out | {k: v for k, v in sections.items() if v is not None} | figures


def frontier_report(request: FrontierRequest, storage: StorageLayout,
                    tracking_uri: str | None = None) -> FrontierReport:  # fmt: skip
    """The frontier of ``request``'s points, everything it asks; raises
    :class:`ReportError` with a message for the user when it cannot be made.

    MLflow is the one at ``tracking_uri`` (default: the store under ``storage``); with a grid,
    the figures and the report are logged on the grid's run there.
    """
    _check(request)
    uri = reader.tracking_uri(storage, tracking_uri)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_points, request, uri)
        if request.grid is not None:
            # What comes next is imported while the store answers the search: SciPy's optimizer
            # for the fit (0.6 s) and MLflow's client to log the report (2.3 s).
            importlib.import_module("scipy.optimize")
            _tracking()
        read = reading.result()
    points, left_out, grid_run = read.points, read.left_out, read.grid_run
    if request.by_family and any(p.family == "" for p in points):
        raise ReportError(f"{request.source}: --by-family needs each point's model name (a model column in a CSV)")
    try:
        analysis = frontier.analyse(points, request.options)
    except frontier.FitError as e:
        raise ReportError(f"{request.source}: cannot fit the frontier: {e}") from None
    boot = frontier.bootstrap(analysis, request.repeats, request.level, request.seed)
    excluded = sum(n for why, n in left_out.items() if why != "running")
    report = FrontierReport(
        excluded=excluded, left_out=left_out, labels=dataclasses.asdict(read.labels), curves=read.curves,
        summary=frontier.summary(analysis, boot),
        queries=[_query(frontier.query(analysis, boot, b), request.grid, analysis) for b in request.budgets],
    )  # fmt: skip
    families: dict[str, frontier.Analysis] = {}
    if request.by_family:
        report.families, families = _families(points, request)
    if request.holdout:
        try:
            report.holdout = {"fraction": request.holdout,
                              "points": frontier.holdout(points, request.holdout, request.options.space,
                                                         request.options.e_inf)}  # fmt: skip
        except frontier.FitError as e:
            report.holdout = {"fraction": request.holdout, "error": str(e)}
    if grid_run:
        report.proposals = _proposal_results(_tracking().proposals(grid_run), points)
    if request.propose and request.grid is not None and request.out is not None:  # both, by _check
        if grid_run is None:
            try:
                grid_run = _tracking().open_grid(request.grid, uri, storage)
            except Exception as e:  # noqa: BLE001 - whatever stops MLflow, stop before writing
                raise ReportError(reader.shown(f"cannot use MLflow tracking URI {uri}: {e}")) from None
        report.proposed = _propose(request.grid, grid_run, analysis, boot, request.propose, request.out)
    figures = []
    if request.plot_dir:
        from mlpgrid.analysis import plots

        stable = (read.curves or {}).get("constant_rate", [])
        there = {p.name for p in request.plot_dir.iterdir()}
        figures = plots.draw_all(analysis, boot, list(request.budgets), request.plot_dir, read.labels,
                                 [(p["compute"], p["error"]) for p in stable])  # fmt: skip
        if families:
            figures.append(plots.by_family(families, request.plot_dir / "families.png", read.labels))
        report.plots_not_drawn = plots.not_drawn(analysis)
        report.plots_replaced = [str(p) for p in figures if p.name in there]
    report.plots = [str(p) for p in figures]
    if grid_run:
        _tracking().relocate_store(storage, uri)  # a copied store logs into itself
        _tracking().log_files(grid_run, figures, "frontier")
        _tracking().log_artifacts(grid_run, {"frontier/frontier.json": json.dumps(report.as_dict(), indent=2)})
    return report
