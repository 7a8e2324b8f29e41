"""The ``mlpgrid`` command line. Thin: parsing and printing; the work is in the modules."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlpgrid.data.prepare import FORMATS, LAYOUTS
from mlpgrid.grid import metrics, spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.grid.spec import GridSpec, SpecError

if TYPE_CHECKING:
    from mlpgrid.execution.driver import RunOutcome
    from mlpgrid.tracking.reader import StatusRow
from mlpgrid.models import architecture


def _json(value: Any, indent: int | None = None) -> str:
    """JSON as JSON parsers read it: a value that is not a finite number (a fit with no interval)
    is null, not the NaN or Infinity Python would write."""

    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=indent, allow_nan=False)


class FiniteRange(click.FloatRange):
    """A float option in a range, and finite: click's own range lets nan through (every
    comparison with it is false) and a bound on one side lets inf through."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


storage_option = click.option(
    "--storage",
    type=click.Path(file_okay=False, path_type=Path),
    default=".mlpgrid",
    envvar="MLPGRID_STORAGE",
    show_default=True,
    callback=lambda ctx, param, value: StorageLayout(value),
    help="Directory for checkpoints and results (env MLPGRID_STORAGE).",
)


def _run_option(param: click.Parameter, key: str, value: Any) -> Any:
    """A command-line option that sets ``run.<key>``, checked by the grid file's rule."""
    if value is not None and (problem := spec.run_option_problem(key, value)) is not None:
        raise click.BadParameter(problem, param=param)
    return value


def _load_grid(path: str, filtered: bool = True) -> GridSpec:
    """The grid file, reduced by the command's --scale and (when ``filtered``) --only (see
    :func:`_reduce_options`)."""
    meta = click.get_current_context().meta
    try:
        only = tuple(tuple(o.split("=", 1)) for o in meta.get("only", ()) if filtered)
        if any(len(o) != 2 for o in only):
            raise SpecError(f"--only takes FIELD=VALUE, got {' '.join(meta['only'])}")
        full = spec.load(path)
        reduced = spec.reduce(full, meta.get("scale"), only)
        merged = len(spec.reduce(full, None, only).trials) if meta.get("scale") else 0
        if len(reduced.trials) < merged:
            click.echo(f"--scale {meta['scale']:g}: {merged} trials became {len(reduced.trials)} (trials that "
                       "differ only in stage epochs or TTA crops become alike)", err=True)  # fmt: skip
        return reduced
    except SpecError as e:
        raise click.ClickException(str(e)) from None


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[param.name] = value
    return value


def _reduce_options(command: Any) -> Any:
    """--scale and --only, shared by every command that reads a grid file."""
    command = click.option(
        "--scale", type=FiniteRange(0, 1, min_open=True), expose_value=False, callback=_remember,
        help="Try the grid small first: N, T, stage epochs and TTA crops times this, N and T values that differ "
             "kept apart (T = 2, 4, 8 at 0.1: 1, 2, 3); a grid of its own name.",
    )(command)  # fmt: skip
    return click.option(
        "--only", multiple=True, metavar="FIELD=VALUE", expose_value=False, callback=_remember,
        help="Only the trials with this setting, e.g. --only dataset=cifar-10; repeatable.",
    )(command)  # fmt: skip


def _millions(n: Any) -> str:
    if n < 1e4:
        return f"{n:.3g}"
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}G"


def _print_table(rows: Sequence[Sequence[Any]], header: list[str], colours: Sequence[str | None] = ()) -> None:
    """Columns aligned, the first left and the rest right; row ``i`` in ``colours[i]`` if given."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for n, row in enumerate([header, *rows]):
        line = "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        colour = colours[n - 1] if 0 < n <= len(colours) else None
        click.echo(click.style(line, fg=colour) if colour else line)


def _print_plan(grid: GridSpec) -> None:
    rows = [
        [t.id, t.config.model, _millions(t.params), t.config.num_examples, t.config.epochs,
         _millions(t.forward_flops), f"{t.compute:.3e}"]
        for t in grid.trials
    ]  # fmt: skip
    _print_table(rows, ["trial", "model", "params P", "examples N", "epochs T", "FLOP(f)", "compute C"])
    total = sum(t.compute for t in grid.trials)
    click.echo(f"{len(grid.trials)} trials, total compute C = {total:.3e} FLOPs (C = FLOP(f) x 3 x N x T)")
    from mlpgrid.execution import trunks

    trunk_line = trunks.describe(trunks.form_trunks(grid.trials), grid.trials)
    if trunk_line:
        click.echo(trunk_line)
    training = sum(2 * t.checkpoint_bytes for t in grid.trials)
    final = sum(t.final_weights_bytes for t in grid.trials)
    click.echo(f"storage for checkpoints: {_gigabytes(training)} at most while the trials train (two each, "
               f"with optimizer state), {_gigabytes(final)} once they have finished (final weights each)")  # fmt: skip


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _print_status(rows: list[StatusRow], grid: GridSpec) -> None:
    """The trials' table: each trial's settings that vary in the grid beside model, N and T, the
    lowest final test error of each model marked *, states in colour on a terminal."""

    def err(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    best = _best_per_model(rows)
    # A label's words after model, N and T: the settings that vary (spec.trial_labels).
    varying = {r.trial_id: " ".join(grid.labels.get(r.trial_id, "").split()[3:]) for r in rows}
    shown = any(varying.values())
    table = [
        [r.trial_id, r.model, r.examples, r.epochs, *([varying[r.trial_id]] if shown else []), f"{r.compute:.3e}",
         r.state, f"{r.last_epoch}/{r.epochs}", err(r.test_error) + ("*" if r.trial_id in best else " "),
         err(r.best_test_error)]
        for r in rows
    ]  # fmt: skip
    header = ["trial", "model", "N", "T", *(["settings"] if shown else []), "compute C", "state", "epoch",
              "test error ", "best"]  # fmt: skip
    from mlpgrid.tracking.reader import STATE_COLOURS  # click.echo drops colours where output is no terminal

    _print_table(table, header, [STATE_COLOURS.get(r.state) for r in rows])
    click.echo(f"{len(rows)} trials: " + ", ".join(f"{n} {state}" for state, n in _totals(rows).items())
               + ("; * the lowest final test error of its model" if best else ""))  # fmt: skip


def _best_per_model(rows: list[StatusRow]) -> set[str]:
    """The finished trial of each model with the lowest final test error, by id."""
    best: dict[str, StatusRow] = {}
    for r in rows:
        if r.state != "finished" or r.test_error is None or not math.isfinite(r.test_error):
            continue
        if r.model not in best or r.test_error < (best[r.model].test_error or math.inf):
            best[r.model] = r
    return {r.trial_id for r in best.values()}


def _totals(rows: list[StatusRow]) -> dict[str, int]:
    states = [r.state for r in rows]
    return {state: states.count(state) for state in sorted(set(states))}


def _group_option(value: str | None) -> str | int | None:
    """--group: None (the grid's), "auto", or the most members (off = 1)."""
    if value is None or value == "auto":
        return value
    if value == "off":
        return 1
    if value.isascii() and value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"expected auto, off or a number of trials >= 1, got {value!r}", param_hint="--group")


tracking_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI (env MLFLOW_TRACKING_URI); default: SQLite under --storage.",
)


def grid_argument(command: Any) -> Any:
    return _reduce_options(click.argument("grid_file", type=click.Path(exists=True, dir_okay=False))(command))


@click.group()
@click.version_option(package_name="mlpgrid")
def cli() -> None:
    """Compute grids of vision-MLP training runs and their compute-optimal frontier.

    \b
    Quick start:
      mlpgrid run grids/quickstart.yaml --dry-run   # the trials and their compute
      mlpgrid run grids/quickstart.yaml             # train them (re-run = resume)
      mlpgrid status grids/quickstart.yaml          # what is done, running, failed
      mlpgrid frontier grids/quickstart.yaml --budget 1e13   # fit and query the frontier
    """


@cli.command()
@grid_argument
@click.option("--dry-run", is_flag=True, help="Print the trials and their compute, then exit.")
@storage_option
@tracking_option
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster address (env RAY_ADDRESS); default: local Ray.")
@click.option("--max-concurrent", type=click.IntRange(min=1), help="Trials at a time; default: as resources allow.")
@click.option("--gpus-per-trial", type=FiniteRange(min=0, min_open=True), callback=lambda ctx, param, value:
              _run_option(param, "gpus_per_trial", value),
              help="Share of a GPU per trial, e.g. 0.5: two trials per GPU; a whole number k > 1: k data-parallel "
                   "workers of a GPU each (as --workers k). Default: the grid's run.gpus_per_trial, else a third for "
                   "compiled trials, 0.125 for small models run eagerly and 0.5 for the rest, more where the trials "
                   "are too few to cover every GPU.")  # fmt: skip
@click.option("--workers", type=click.IntRange(min=1),
              help="Data-parallel workers per trial (Ray Train, DDP): a GPU each, or --cpus-per-trial cores without "
                   "GPUs. Default: the grid's run.workers, else 1, more for a trial that alone on one GPU would "
                   "outlast the rest of the grid on the others.")  # fmt: skip
@click.option("--ray-train/--reused-actors", "ray_train", default=None,
              help="Train every trial through a Ray Train TorchTrainer (one worker unless data-parallel), or only "
                   "the data-parallel ones, the rest in Ray actors reused from trial to trial. Default: the grid's "
                   "run.ray_train, else reused actors (they start a trial faster).")  # fmt: skip
@click.option("--cpus-per-trial", type=FiniteRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPU cores per trial when there is no GPU.")  # fmt: skip
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Restarts of a failed trial, each from its last checkpoint.")  # fmt: skip
@click.option("--wait-for-resources", "wait_s", type=FiniteRange(min=0, min_open=True), default=600.0,
              show_default=True, metavar="SECONDS",
              help="Give up when no trial has run for this long because Ray cannot place any (too few CPUs or GPUs "
                   "for what a trial asks, a node lost).")  # fmt: skip
@click.option("--group", metavar="auto|off|K", callback=lambda ctx, param, value: _group_option(value),
              help="Trials trained together by one worker, on one batch stream: auto (up to 16 that can), off, or "
                   "at most K. Default: the grid's run.group, else auto.")  # fmt: skip
@click.option("--in-process", is_flag=True, help="Run the trials one by one in this process, without Ray.")
@click.option("--allow-changes", is_flag=True,
              help="Run the file as it is now even if an edit left trials that already ended out of it, or its "
                   "prepared data changed since trials trained on it.")  # fmt: skip
def run(grid_file: str, dry_run: bool, storage: StorageLayout, tracking_uri: str | None, address: str | None,
        max_concurrent: int | None, gpus_per_trial: float | None, workers: int | None, ray_train: bool | None,
        cpus_per_trial: float,
        retries: int, wait_s: float, group: str | int | None, in_process: bool,
        allow_changes: bool) -> None:  # fmt: skip
    """Run every trial of GRID_FILE that has not ended yet.

    Trials that differ only in epochs, learning rate and other optimiser settings are trained
    together by one worker (a group: one start-up, one stream of batches). Each group is a Ray
    Tune trial, trained on a share of a GPU (or CPU cores when there is none) by a worker
    process that Ray keeps for the next group;
    each trial is recorded as one MLflow run. Re-running the same command resumes:
    finished trials are skipped, interrupted ones continue from their last checkpoint, and
    trials added to the file since are run.

    \b
    Examples:
      mlpgrid run grids/quickstart.yaml --dry-run
      mlpgrid run grids/quickstart.yaml
      mlpgrid run grids/quickstart.yaml --group off
      mlpgrid run grids/quickstart.yaml --address ray://head:10001 --gpus-per-trial 0.5 \\
          --storage /shared/mlpgrid --tracking-uri http://mlflow:5000
    """
    grid = _load_grid(grid_file)
    if dry_run:
        _print_plan(grid)
        return
    from mlpgrid.execution import driver
    from mlpgrid.execution.ray_tune import RayOptions

    request = driver.RunRequest(
        group=grid.run.group if group is None else None if group == "auto" else int(group), in_process=in_process,
        allow_changes=allow_changes,
        ray=RayOptions(address, max_concurrent, gpus_per_trial, workers, ray_train, cpus_per_trial, retries, wait_s),
    )  # fmt: skip
    try:
        outcome = driver.run_grid(grid, storage, tracking_uri, request, _load_grid(grid_file, filtered=False))
    except driver.RunRefused as e:
        raise click.ClickException(str(e)) from None
    _print_status(outcome.rows, grid)
    if outcome.stopped_by:
        _stopped(outcome, grid_file)
    tracebacks = False
    for n in outcome.not_finished:
        lines = n.why.strip().splitlines() or [n.why]
        tracebacks = tracebacks or len(lines) > 1
        click.echo(f"{n.trial_id} {n.state}: {lines[-1]}", err=True)  # the exception, not its traceback
    if tracebacks:
        click.echo("Tracebacks: each trial's MLflow run, tag 'error' (also `mlpgrid status --json`).", err=True)
    _next_steps(grid, grid_file, storage, tracking_uri, outcome.rows, outcome.experiment_id)
    if not outcome.ok:
        left = outcome.left_to_others
        left_note = f"; {left} left to another process: run again once it is done" if left else ""
        raise click.ClickException(f"{len(outcome.not_finished)} of {outcome.trials_run} trials run did not finish"
                                   f"{left_note}" + (f"\n{outcome.failure}" if outcome.failure else ""))  # fmt: skip


def _next_steps(grid: GridSpec, grid_file: str, storage: StorageLayout, tracking_uri: str | None,
                rows: list[StatusRow], experiment_id: str) -> None:  # fmt: skip
    """After a run: the best trial of each model, where the records are, the commands to go on with."""
    from mlpgrid.tracking import reader, writer

    best = [r for r in rows if r.trial_id in _best_per_model(rows)]
    for r in sorted(best, key=lambda r: r.params):
        click.echo(f"best {r.model}: {grid.labels.get(r.trial_id, r.trial_id)}, test error {r.test_error:.4f}")
    uri = reader.tracking_uri(storage, tracking_uri)
    shown = reader.shown(uri)
    largest = max((r.compute for r in rows), default=0.0)
    click.echo(f"Stored in {storage.root} (MLflow: {shown}).\nNext: mlpgrid frontier {grid_file} --budget "
               f"{10 * largest:.0e}   # the frontier, and the split of a budget")  # fmt: skip
    if uri.startswith(("http://", "https://")):
        click.echo(f"      {writer.view_address(shown, experiment_id)}   # the trials in MLflow")
    else:
        click.echo(f"      mlflow ui --backend-store-uri {shown}   # then the trials in MLflow at\n"
                   f"      {writer.view_address('http://127.0.0.1:5000', experiment_id)}")  # fmt: skip


def _stopped(outcome: RunOutcome, grid_file: str) -> None:
    """What a run stopped by Ctrl-C or SIGTERM kept, and how to go on; exits 130 or 143 as a shell
    reports a process ended by that signal."""
    counts = collections.Counter(r.state for r in outcome.rows)
    cut = [r for r in outcome.rows if r.state == "interrupted"]
    kept = ", ".join(f"{counts[s]} {s}" for s in ("finished", "diverged", "failed") if counts[s]) or "no trial ended"
    click.echo(
        f"Stopped by {'Ctrl-C' if outcome.stopped_by == 'SIGINT' else outcome.stopped_by}. Kept: {kept}; "
        f"{len(cut)} interrupted, each at its last checkpoint"
        + (f" ({', '.join(f'{r.trial_id[:8]} epoch {r.last_epoch}/{r.epochs}' for r in cut[:3])}"
           f"{', ...' if len(cut) > 3 else ''})" if cut else "")
        + f"; {counts['pending']} not started. Run the same command again to resume ({grid_file}).",
        err=True,
    )  # fmt: skip
    sys.exit(130 if outcome.stopped_by == "SIGINT" else 143)


@cli.command()
@grid_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@storage_option
@tracking_option
def status(grid_file: str, as_json: bool, storage: StorageLayout, tracking_uri: str | None) -> None:
    """What is done, running, failed or pending in GRID_FILE; works while it runs.

    \b
    Examples:
      mlpgrid status grids/quickstart.yaml
      mlpgrid status grids/quickstart.yaml --json
    """
    from mlpgrid.tracking import reader

    grid = _load_grid(grid_file)
    uri = reader.tracking_uri(storage, tracking_uri)
    where = reader.missing_store(uri)
    if where:
        raise click.ClickException(f"no MLflow store at {where}: nothing has run with this --storage (or "
                                   "MLPGRID_STORAGE, --tracking-uri). Is it the one `run` used?")  # fmt: skip
    try:
        found = reader.find_grid(grid, uri)
        rows = reader.grid_status(grid, found, storage)
    except Exception as e:  # noqa: BLE001 - e.g. a store still being created, or unreachable
        raise click.ClickException(reader.shown(f"cannot read MLflow tracking URI {uri}: {e}")) from None
    if found is None and not as_json:
        scaled = reader.scaled_versions(grid, uri)
        hint = f" Runs of it scaled: {', '.join(scaled)} (pass the same --scale)." if scaled else ""
        click.echo(reader.shown(f"{grid.name} has no runs in {uri} yet: every trial is pending.{hint}"), err=True)
    if as_json:
        click.echo(
            _json(
                {"grid": grid.name, "trials": [dataclasses.asdict(r) for r in rows], "totals": _totals(rows)}, indent=2
            )
        )
    else:
        _print_status(rows, grid)


@cli.command()
@grid_argument
@click.option("--trial", "trial_id", required=True, help="Trial id (or a unique prefix) from --dry-run.")
@storage_option
@tracking_option
def trial(grid_file: str, trial_id: str, storage: StorageLayout, tracking_uri: str | None) -> None:
    """Run one trial of GRID_FILE in this process, without Ray (for debugging).

    It resumes and records in MLflow exactly as `run` does.

    \b
    Example:
      mlpgrid trial grids/quickstart.yaml --trial 3fa2
    """
    from mlpgrid.execution import driver, runner

    grid = _load_grid(grid_file)
    try:
        chosen, status = driver.run_one(grid, trial_id, storage, tracking_uri)
    except driver.RunRefused as e:
        raise click.ClickException(str(e)) from None
    if status == "ended":
        click.echo(f"Trial {chosen} has already ended.")
    elif status == runner.ELSEWHERE:
        raise click.ClickException(f"trial {chosen}: another process is training it")
    elif status != "finished":
        raise click.ClickException(f"trial {chosen} {status}")


positive = FiniteRange(min=0, min_open=True)


@cli.command()
@click.argument("grid_file", required=False, type=click.Path(exists=True, dir_okay=False))
@_reduce_options
@click.option("--from-csv", "csv_file", type=click.Path(exists=True, dir_okay=False),
              help="Read points from a CSV (compute,error,params,examples[,epochs,model,trial_id,lr,batch_size]; "
                   "or flops, loss and tokens for compute, error and examples) instead of MLflow.")  # fmt: skip
@click.option(
    "--metric", help=f"The trials' metric to use as the error; default: the grid's metric, else {metrics.TEST_ERROR}."
)
@click.option("--curves", is_flag=True,
              help="Also take the earlier epochs of trials with a constant learning rate as points: each is where "
                   "a shorter trial would have ended (not so under a cosine schedule).")  # fmt: skip
@click.option("--budget", "budgets", type=positive, multiple=True, help="Compute to query, e.g. 1e18; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--plot-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Draw the figures here (and log them on the grid's MLflow run).")  # fmt: skip
@click.option("--bootstrap", "repeats", type=click.IntRange(min=0), default=200, show_default=True,
              help="Bootstrap resamples of the trials for the intervals; 0 = none.")  # fmt: skip
@click.option("--level", type=FiniteRange(0, 1, min_open=True, max_open=True), default=0.95,
              show_default=True, help="Confidence level of the intervals.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap's resampling.")
@click.option("--fit-space", type=click.Choice(["log", "linear"]), default="log", show_default=True,
              help="Least squares on log error, or on error as the paper (also the IsoFLOP parabolas').")  # fmt: skip
@click.option("--bins-per-decade", type=positive, default=4, show_default=True,
              help="Compute bins per decade of the envelope's allocation (approach 1), and IsoFLOP budgets per "
                   "decade (approach 2).")  # fmt: skip
@click.option("--e-inf", type=FiniteRange(min=0), help="Hold the irreducible error fixed at this value instead of "
              "fitting it (in E(C), E(P), E(N) and E(P, D)).")  # fmt: skip
@click.option("--starts", type=click.IntRange(min=1),
              help="Starting points of the E(P, D) fit (approach 3) to optimise, the most promising of a grid "
                   "of 4,500 (default: 64; 4500 optimises them all).")  # fmt: skip
@click.option(
    "--by-family",
    is_flag=True,
    help="Also fit each model family (B-MLP, S-MLP, Mixer, ResMLP, RepMLPNet) on its own, side by side.",
)
@click.option("--holdout", type=FiniteRange(0, 1, min_open=True, max_open=True),
              help="Also fit without the most expensive FRACTION of trials and report how well that fit "
                   "predicts their frontier.")  # fmt: skip
@click.option("--propose", type=positive, help="Write a grid of trials the fit calls compute-optimal at this budget.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Grid file --propose writes.")
@storage_option
@tracking_option
def frontier(grid_file: str | None, csv_file: str | None, metric: str | None, curves: bool,
             budgets: tuple[float, ...], as_json: bool, plot_dir: Path | None, repeats: int, level: float, seed: int,
             fit_space: str, bins_per_decade: float, e_inf: float | None, starts: int | None, by_family: bool,
             holdout: float | None, propose: float | None, out: Path | None, storage: StorageLayout,
             tracking_uri: str | None) -> None:  # fmt: skip
    """Fit the compute-optimal frontier of GRID_FILE's finished trials and query it.

    Takes the best setting per (model, N, T), the lower envelope of error vs compute, fits
    E(C) = a(b + C)^-alpha + E_inf to it, and the laws E(P) and E(N). Fits the allocation
    P*(C) and D*(C) = (N T)*(C) three ways, as Hoffmann et al.: (1) the best trial of each
    compute bin, (2) the minima of IsoFLOP profiles, (3) one law E(P, D) = E + A/P^alpha +
    B/D^beta through every trial; side by side, so that where they disagree shows. Intervals
    come from resampling the trials. Works while the grid is still running, on what has
    finished. The report is logged on the grid's MLflow run; the figures are drawn with
    --plot-dir, and logged there too.

    \b
    Examples:
      mlpgrid frontier grids/quickstart.yaml --budget 1e13 --plot-dir plots
      mlpgrid frontier grids/quickstart.yaml --budget 1e13 --budget 3.5e13 --json
      mlpgrid frontier grids/quickstart.yaml --propose 1e13 --out next.yaml
      mlpgrid frontier --from-csv results.csv --budget 1e18
      mlpgrid frontier --from-csv lm.csv --bootstrap 0   # columns flops,loss,params,tokens
    """
    from mlpgrid.analysis import report
    from mlpgrid.analysis.frontier import FitOptions

    try:
        options = FitOptions(space=fit_space, bins_per_decade=bins_per_decade, e_inf=e_inf)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--bins-per-decade") from None
    request = report.FrontierRequest(
        grid=_load_grid(grid_file) if grid_file else None, csv_file=Path(csv_file) if csv_file else None,
        metric=metric, curves=curves, budgets=budgets, by_family=by_family, repeats=repeats, level=level, seed=seed,
        holdout=holdout,
        options=options if starts is None else dataclasses.replace(options, starts=starts),
        propose=propose, out=out, plot_dir=plot_dir,
    )  # fmt: skip
    try:
        result = report.frontier_report(request, storage, tracking_uri)
    except report.RequestError as e:
        raise click.UsageError(str(e)) from None
    except report.ReportError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(_json(result.as_dict(), indent=2))
    else:
        _print_frontier(result.as_dict(), request.source)


def _interval(ci: list[float] | None, fmt: str = "{:.4f}") -> str:
    return "n/a" if ci is None else "[" + ", ".join(fmt.format(v) for v in ci) + "]"


APPROACH_NAMES = {"envelope": "1 envelope", "isoflop": "2 IsoFLOP", "parametric": "3 E(P, D)"}


def _print_approaches(approaches: dict[str, Any], level: str) -> None:
    """The three allocations side by side, what each rests on, then E(P, D) and the profiles."""
    rows = []
    for name, fit in approaches.items():
        if fit is None:
            rows.append([APPROACH_NAMES[name], "-", "-", "-", "-", "not fitted (see the notes)"])
            continue
        ci = fit["ci"]
        if name == "envelope":
            basis = f"the best trial of {len(fit['bins'])} compute bins"
        elif name == "isoflop":
            basis = f"the minima of {fit['used']} of {len(fit['profiles'])} profiles"
        else:
            basis = f"every trial; {fit['law']['converged']} of {fit['law']['starts']} starts reached the best"
        exponents = [f"{fit['params_exponent']:.3f}", _interval(ci["params_exponent"], "{:.3f}"),
                     f"{fit['examples_exponent']:.3f}", _interval(ci["examples_exponent"], "{:.3f}")]  # fmt: skip
        rows.append([APPROACH_NAMES[name], *exponents, basis])
    click.echo(f"Compute-optimal allocation P*(C) ∝ C^a, D*(C) = (N·T)* ∝ C^b, three ways ({level} intervals):")
    _print_table(rows, ["approach", "a", "interval", "b", "interval", "from"])
    if approaches.get("parametric"):
        law, ci = approaches["parametric"]["law"], approaches["parametric"]["law_ci"]
        click.echo(f"E(P, D) = {law['e_inf']:.4g} + {law['a']:.4g}/P^{law['alpha']:.4f} + {law['b']:.4g}/D^"
                   f"{law['beta']:.4f}, D = N·T:  E {_interval(ci['e_inf'])}  alpha {_interval(ci['alpha'])}"
                   f"  beta {_interval(ci['beta'])}")  # fmt: skip
    if approaches.get("isoflop"):
        rows = [
            [f"{p['compute']:.3g}", p["sizes"], "-" if p["best_params"] is None else _millions(p["best_params"]),
             "-" if p["position"] is None else f"{p['position']:.2f}",
             "-" if p["best_error"] is None else f"{p['best_error']:.4f}", p["status"]]
            for p in approaches["isoflop"]["profiles"]
        ]  # fmt: skip
        click.echo("IsoFLOP profiles (position of the minimum: 0 at the smallest size, 1 at the largest):")
        _print_table(rows, ["budget C", "sizes", "P*", "position", "error at P*", "status"])


def _print_families(families: dict[str, Any]) -> None:
    """Each family's E(C) exponent and allocation exponents, one row each."""
    rows = []
    for family, fit in families.items():
        if "error" in fit:
            rows.append([family, fit["points"], "-", "-", "-", "-", "-", fit["error"]])
            continue
        a = [f"{x['params_exponent']:.3f}" if x else "-" for x in fit["approaches"].values()]
        alpha = [f"{fit['fit']['alpha']:.3f}", _interval(fit["fit"]["ci"]["alpha"], "{:.3f}")]
        rows.append([family, fit["points"], *alpha, f"{fit['fit']['e_inf']:.4f}", *a])
    click.echo("By family (a: P*(C) ∝ C^a of approaches 1, 2, 3):")
    _print_table(rows, ["family", "points", "alpha", "interval", "E_inf", "a (1)", "a (2)", "a (3)"])


def _print_frontier(report: dict[str, Any], source: str) -> None:
    fit, left = report["fit"], report["left_out"]
    skipped = ", ".join(f"{n} {why}" for why, n in left.items() if n)
    click.echo(f"{source}: {report['points']} points" + (f" (left out: {skipped})" if skipped else "")
               + f", {fit['frontier_points']} on the frontier")  # fmt: skip
    if "curves" in report:
        curves = report["curves"]
        click.echo(f"--curves: {curves['points']} earlier epochs added as points; trials by why:")
        for why, n in curves["trials"].items():
            click.echo(f"  {n} trials: {why}")
    click.echo(f"E(C) = {fit['a']:.4g} ({fit['b']:.3g} + C)^-{fit['alpha']:.4f} + {fit['e_inf']:.4f}")
    boot = report["bootstrap"]
    level = f"{boot['level']:.0%}"
    fitted = boot["repeats"] - boot["failed"]
    if not boot["repeats"]:
        resamples = "no intervals: --bootstrap 0"
    elif boot["intervals"]:
        resamples = f"{level} intervals, {boot['repeats']} resamples, {boot['failed']} failed"
    else:
        resamples = f"n/a: intervals need most resamples fitted, {fitted} of {boot['repeats']} were"
    click.echo(f"  alpha {fit['alpha']:.4f} {_interval(fit['ci']['alpha'])}   E_inf {fit['e_inf']:.4f}"
               f" {_interval(fit['ci']['e_inf'])}   ({resamples})")  # fmt: skip
    _print_approaches(report["approaches"], level)
    for axis, law in report["bottlenecks"].items():
        x = {"params": "P", "examples": "N"}[axis]
        click.echo(f"E({x}) = E_inf + A {x}^{-law['exponent']:+.3f}, exponent {_interval(law['ci'], '{:.3f}')}")
    for note in report["notes"]:
        click.echo(f"note: {note}")
    if report["queries"]:
        rows = [
            [f"{q['budget']:.3g}", f"{q['error']:.4f}", _interval(q["error_ci"]), _millions(q.get("params", 0)),
             f"{q.get('examples_seen', 0):.3g}", q.get("model", "-"), q.get("examples", "-"), q.get("epochs", "-")]
            for q in report["queries"]
        ]  # fmt: skip
        _print_table(rows, ["budget C", "error", f"{level} interval", "P*", "N·T*", "model", "N", "T"])
        rows = [
            [f"{q['budget']:.3g}", APPROACH_NAMES[name], "-" if a["error"] is None else f"{a['error']:.4f}",
             _interval(a["error_ci"]), _millions(a["params"]), _interval(a["params_ci"], "{:.3g}"),
             f"{a['examples_seen']:.3g}", _interval(a["examples_seen_ci"], "{:.3g}"), f"{a['examples_per_param']:.3g}"]
            for q in report["queries"] for name, a in q["approaches"].items()
        ]  # fmt: skip
        _print_table(rows, ["budget C", "approach", "error", f"{level} interval", "P*", "interval", "N·T*", "interval",
                            "N·T*/P*"])  # fmt: skip
    if "families" in report:
        _print_families(report["families"])
    if "holdout" in report:
        held = report["holdout"]
        if "error" in held:
            click.echo(f"holdout: {held['error']}")
        for row in held.get("points", []):
            click.echo(f"holdout: C {row['compute']:.3g}  measured {row['measured']:.4f}  predicted"
                       f" {row['predicted']:.4f}  ({row['relative_error']:.1%} off)")  # fmt: skip
    for record in report.get("proposals", []):
        click.echo(f"proposal {record['file']} at C = {record['budget']:.3g}:")
        for t in record["trials"]:
            got = "-" if t["measured_error"] is None else f"{t['measured_error']:.4f}"
            click.echo(f"  {t['trial_id']} {t['model']} N={t['examples']} T={t['epochs']}  predicted"
                       f" {t['predicted_error']:.4f}  measured {got}")  # fmt: skip
    if "proposed" in report:
        proposed = report["proposed"]
        click.echo(f"wrote {proposed['file']}: {len(proposed['trials'])} trials at C = {proposed['budget']:.3g};"
                   f" run it with `mlpgrid run {proposed['file']}`")  # fmt: skip
    for path in report["plots"]:
        click.echo(f"plot: {path}" + (" (replaced the earlier one)" if path in report["plots_replaced"] else ""))
    for name, why in report["plots_not_drawn"].items():
        click.echo(f"not drawn: {name}: {why}")


@cli.command("model-info")
@click.argument("name", required=False)
@click.option("--resolution", default=64, show_default=True, help="Image side in pixels.")
@click.option("--channels", default=3, show_default=True, help="Image channels.")
@click.option("--classes", default=1000, show_default=True, help="Output classes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def model_info(name: str, resolution: int, channels: int, classes: int, as_json: bool) -> None:
    """Parameters and forward FLOPs of a model such as B-12/Wi-1024.

    FLOPs count one multiply-add as one FLOP, as fvcore and the paper do.

    \b
    Examples:
      mlpgrid model-info B-12/Wi-1024                  # at 64x64x3 and 1,000 classes
      mlpgrid model-info B-12/Wi-1024 --resolution 64 --classes 10450 --json
      mlpgrid model-info Mixer-S/8 --resolution 32 --classes 100
    """
    if name is None:
        raise click.UsageError("name a model, e.g. `mlpgrid model-info B-12/Wi-1024` (families: B-<depth>/Wi-<width>, "
                               "Mixer-{S,B,L,H}/<patch>, ResMLP-{S12,S24,S36,B24}/<patch>, "
                               "RepMLPNet-{T,B,D,L}/<patch>)")  # fmt: skip
    try:
        cfg = architecture.config_for(name, channels * resolution * resolution, classes, image=(channels, resolution))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    info = {
        "name": cfg.name,
        "params": architecture.count_params(cfg),
        "forward_flops": architecture.forward_flops(cfg),
    }
    if isinstance(cfg, architecture.RepConfig):  # and its merged form, evaluated after training
        merged = architecture.deployed(cfg)
        info |= {"deployed_params": architecture.count_params(merged),
                 "deployed_forward_flops": architecture.forward_flops(merged)}  # fmt: skip
    if as_json:
        click.echo(_json(info))
    else:
        line = (f"{info['name']} at {resolution}x{resolution}x{channels}, {classes:,} classes: "
                f"{_millions(info['params'])} parameters, {_millions(info['forward_flops'])} FLOPs per "
                "forward")  # fmt: skip
        if "deployed_params" in info:
            line += (f" in training; merged (its conv branches in its FCs): {_millions(info['deployed_params'])} "
                     f"parameters, {_millions(info['deployed_forward_flops'])} FLOPs")  # fmt: skip
        click.echo(line)


@cli.group("bench")
def bench_group() -> None:
    """Measure models on this machine."""


@bench_group.command("models")
@click.argument("names", nargs=-1, required=True)
@click.option("--resolution", default=64, show_default=True, help="Image side in pixels.")
@click.option("--channels", default=3, show_default=True, help="Image channels.")
@click.option("--classes", default=1000, show_default=True, help="Output classes.")
@click.option("--batch", "batch_sizes", type=click.IntRange(min=1), multiple=True,
              help="Batch sizes to try for throughput; default 256..16384 on a GPU, 16..256 on a CPU.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_models(names: tuple[str, ...], resolution: int, channels: int, classes: int, batch_sizes: tuple[int, ...],
                 as_json: bool) -> None:  # fmt: skip
    """The paper's Table 7 for NAMES on this device: parameters, latency at batch 1,
    throughput at the best batch, FLOPs per forward (a RepMLPNet's merged form on a row of its
    own).

    \b
    Example:
      mlpgrid bench models B-6/Wi-1024 B-12/Wi-768 B-12/Wi-1024
    """
    import torch

    from mlpgrid.training.bench import efficiency
    from mlpgrid.training.hardware import pick_device

    device = pick_device()
    batch_sizes = batch_sizes or ((256, 1024, 4096, 16384) if device.type == "cuda" else (16, 64, 256))
    try:
        rows = [row for n in names for row in efficiency(n, resolution, channels, classes, device, batch_sizes)]
    except (ValueError, torch.cuda.OutOfMemoryError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(_json(rows, indent=1))
        return
    table = [[r["model"], _millions(r["params"]), f"{r['latency_ms']:.2f}", f"{r['images_per_s']:,.0f}",
              r["best_batch"], _millions(r["forward_flops"])] for r in rows]  # fmt: skip
    _print_table(table, ["model", "params", "latency ms (batch 1)", "images/s", "at batch", "FLOPs/forward"])
    click.echo(f"{rows[0]['device']}, {resolution}x{resolution}x{channels} inputs, {classes} classes")


@cli.group("data")
def data_group() -> None:
    """Prepare datasets at a fixed resolution and list the prepared ones.

    \b
    Examples:
      mlpgrid data prepare cifar-100-64 --source ~/cifar-100-python
      mlpgrid data prepare tiny-imagenet-64 --source ~/tiny-imagenet-200 --format beton
      mlpgrid data ls
    """


@data_group.command("prepare")
@click.argument("name")
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The dataset as distributed: idx files, CIFAR pickles, STL-10 binaries or an image-folder tree.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write; default: $MLPGRID_DATA/NAME (data/prepared/NAME).",
)
@click.option("--layout", type=click.Choice(LAYOUTS), help="The source's layout; default: recognised from its files.")
@click.option("--resolution", type=click.IntRange(min=1), default=64, show_default=True, help="Image side in pixels.")
@click.option(
    "--channels",
    type=click.Choice(["3", "1"]),
    default="3",
    show_default=True,
    help="3 turns grayscale into RGB; 1 keeps grayscale sources gray.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="npy",
    show_default=True,
    help="npy: memory-mappable arrays; beton: an FFCV file (needs mlpgrid[ffcv]).",
)
@click.option(
    "--holdout",
    type=FiniteRange(0, 1, max_open=True),
    default=0.0,
    help="For sources without a test split: hold out this class-proportional fraction of train.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the held-out split.")
@click.option("--workers", type=click.IntRange(min=1), help="Processes decoding images; default: every core.")
def data_prepare(name: str, source: Path, out: Path | None, layout: str | None, resolution: int, channels: str,
                 fmt: str, holdout: float, seed: int, workers: int | None) -> None:  # fmt: skip
    """Prepare the dataset at --source as NAME: RxR uint8 images, labels, a manifest.

    Image folders (train/<class>/*.jpg, val/<class>/...) are decoded on every core in
    shards; an interrupted run picks up at the shards it had not finished. Unreadable images
    are skipped and listed. Grids then use it as `dataset: NAME`.
    """
    from mlpgrid.data import prepare, prepared

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise click.BadParameter(f"{name!r}: a dataset's name in grid files (letters, digits, '.', '_', '-'), not a "
                                 "path; --out says where it goes", param_hint="NAME")  # fmt: skip
    out = out or prepared.home() / name
    try:
        request = prepare.Request(name, source, out, layout or prepare.detect_layout(source), resolution,
                                  int(channels), fmt, holdout, seed)  # fmt: skip
        with click.progressbar(length=1, label=f"{name} <- {source} ({request.layout})", file=sys.stderr) as bar:

            def progress(done: int, total: int) -> None:
                bar.length = total
                bar.update(done - bar.pos)

            manifest = prepare.prepare(request, workers, progress)
    except (prepare.PrepareError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    click.echo(f"{out}: {name}, {len(manifest['classes'])} classes, {counts} images at {resolution}x{resolution}"
               f"x{manifest['channels']} ({manifest['format']}), {manifest['seconds']} s")  # fmt: skip
    if manifest["skipped"]:
        click.echo(f"skipped {len(manifest['skipped'])} unreadable images (all listed in {out / prepared.MANIFEST}):")
        for s in manifest["skipped"][:20]:
            click.echo(f"  {s['file']}: {s['reason']}")


@data_group.command("ls")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--verify", is_flag=True, help="Also recompute every file's checksum.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON.")
def data_ls(directory: Path | None, verify: bool, as_json: bool) -> None:
    """List prepared datasets in DIRECTORY (default: $MLPGRID_DATA, else data/prepared)."""
    from mlpgrid.data import prepared

    directory = directory or prepared.home()
    found, problems = prepared.find_all(directory)
    for path, _ in found:
        try:
            if verify:
                problems += prepared.verify(path)
            else:
                prepared.locate(path)  # a file missing, or of another size than listed
        except (OSError, ValueError) as e:
            problems.append(str(e))
    if as_json:
        click.echo(_json([{"path": str(path), **m} for path, m in found], indent=1))
    elif not found:
        click.echo(f"no prepared datasets in {directory} (make one with `mlpgrid data prepare`)")
    else:
        rows = [
            [m["name"], f"{m['resolution']}x{m['resolution']}x{m['channels']}", len(m["classes"]),
             m["splits"]["train"]["count"], m["splits"].get("test", {}).get("count", "-"), m["format"],
             f"{sum(f['bytes'] for f in prepared.files(m).values()) / 2**20:.1f} MiB", len(m["skipped"]), str(path)]
            for path, m in found
        ]  # fmt: skip
        _print_table(rows, ["name", "images", "classes", "train", "test", "format", "size", "skipped", "path"])
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        raise click.ClickException(
            f"{len(problems)} problem{'s' * (len(problems) > 1)} in prepared datasets: re-prepare those"
        )
    if verify and not as_json and found:
        click.echo(f"checksums match ({len(found)} datasets)")
    if not as_json:
        from mlpgrid.data import DATASETS

        where = {
            name: f"{info.root()}{'' if info.root().exists() else ', not found'}" for name, info in DATASETS.items()
        }
        click.echo("built in (read where they are, not prepared): " + ", ".join(f"{n} ({w})" for n, w in where.items()))


def main() -> Any:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its INFO lines on database setup
    return cli(prog_name="mlpgrid")


if __name__ == "__main__":
    sys.exit(main())
