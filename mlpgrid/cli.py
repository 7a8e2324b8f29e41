"""The ``mlpgrid`` command line. Thin: parsing and printing; the work is in the modules."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from mlpgrid import models, spec
from mlpgrid.spec import GridSpec, SpecError

storage_option = click.option(
    "--storage",
    type=click.Path(file_okay=False, path_type=Path),
    default=".mlpgrid",
    envvar="MLPGRID_STORAGE",
    show_default=True,
    help="Directory for checkpoints and results (env MLPGRID_STORAGE).",
)


def _load_grid(path: str) -> GridSpec:
    try:
        return spec.load(path)
    except SpecError as e:
        raise click.ClickException(str(e)) from None


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}G"


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo(
            "  ".join(
                str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def _print_plan(grid: GridSpec) -> None:
    rows = [
        [t.id, t.config.model, _millions(t.params), t.config.num_examples, t.config.epochs,
         _millions(t.forward_flops), f"{t.compute:.3e}"]
        for t in grid.trials
    ]  # fmt: skip
    _print_table(rows, ["trial", "model", "params P", "examples N", "epochs T", "FLOP(f)", "compute C"])
    total = sum(t.compute for t in grid.trials)
    click.echo(f"{len(grid.trials)} trials, total compute C = {total:.3e} FLOPs (C = FLOP(f) x 3 x N x T)")


def _tracking(grid: GridSpec, storage: Path, uri: str | None) -> Any:
    """The grid's MLflow experiment and parent run, or a clear error before any trial starts."""
    from mlpgrid import tracking

    uri = tracking.tracking_uri(storage, uri)
    try:
        return tracking.open_grid(grid, uri, storage)
    except Exception as e:  # noqa: BLE001 - whatever stops MLflow, stop before training
        raise click.ClickException(f"cannot use MLflow tracking URI {uri}: {e}") from None


def _print_status(rows: list[dict[str, Any]]) -> None:
    def err(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    table = [
        [r["trial_id"], r["model"], r["examples"], r["epochs"], f"{r['compute']:.3e}", r["state"],
         f"{r['last_epoch']}/{r['epochs']}", err(r["test_error"]), err(r["best_test_error"])]
        for r in rows
    ]  # fmt: skip
    _print_table(table, ["trial", "model", "N", "T", "compute C", "state", "epoch", "test error", "best"])
    click.echo(f"{len(rows)} trials: " + ", ".join(f"{n} {state}" for state, n in _totals(rows).items()))


def _totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    states = [r["state"] for r in rows]
    return {state: states.count(state) for state in sorted(set(states))}


tracking_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI (env MLFLOW_TRACKING_URI); default: SQLite under --storage.",
)
grid_argument = click.argument("grid_file", type=click.Path(exists=True, dir_okay=False))


@click.group()
@click.version_option(package_name="mlpgrid")
def cli() -> None:
    """Compute grids of vision-MLP training runs and their compute-optimal frontier.

    \b
    Quick start:
      mlpgrid run grids/quickstart.yaml --dry-run   # the trials and their compute
      mlpgrid run grids/quickstart.yaml             # train them (re-run = resume)
      mlpgrid status grids/quickstart.yaml          # what is done, running, failed
    """


@cli.command()
@grid_argument
@click.option("--dry-run", is_flag=True, help="Print the trials and their compute, then exit.")
@storage_option
@tracking_option
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster address (env RAY_ADDRESS); default: local Ray.")
@click.option("--max-concurrent", type=click.IntRange(min=1), help="Trials at a time; default: as resources allow.")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="GPUs per trial; a fraction packs several trials on one GPU.")  # fmt: skip
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPU cores per trial when there is no GPU.")  # fmt: skip
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Restarts of a failed trial, each from its last checkpoint.")  # fmt: skip
@click.option("--in-process", is_flag=True, help="Run the trials one by one in this process, without Ray.")
def run(grid_file: str, dry_run: bool, storage: Path, tracking_uri: str | None, address: str | None,
        max_concurrent: int | None, gpus_per_trial: float, cpus_per_trial: float, retries: int,
        in_process: bool) -> None:  # fmt: skip
    """Run every trial of GRID_FILE that has not ended yet.

    Each trial is a Ray Tune trial running a one-worker Ray Train job on one GPU (or CPU cores
    when there is none), recorded as one MLflow run. Re-running the same command resumes:
    finished trials are skipped, interrupted ones continue from their last checkpoint, and
    trials added to the file since are run.

    \b
    Examples:
      mlpgrid run grids/quickstart.yaml --dry-run
      mlpgrid run grids/quickstart.yaml
      mlpgrid run grids/quickstart.yaml --address ray://head:10001 --gpus-per-trial 0.5 \\
          --storage /shared/mlpgrid --tracking-uri http://mlflow:5000
    """
    from mlpgrid import runner, tracking
    from mlpgrid.progress import Progress

    grid = _load_grid(grid_file)
    if dry_run:
        _print_plan(grid)
        return
    try:
        runner.check_data(grid)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    grid_run = _tracking(grid, storage, tracking_uri)
    tasks = runner.pending_tasks(grid, storage, grid_run)
    if not tasks:
        click.echo(f"Nothing to do: all {len(grid.trials)} trials of {grid.name} have already ended.")
    else:
        progress = Progress([t.trial for t in tasks], already_done=len(grid.trials) - len(tasks))
        try:
            if in_process:
                runner.run_in_process(tasks, progress)
            else:
                opts = runner.RayOptions(address, max_concurrent, gpus_per_trial, cpus_per_trial, retries)
                runner.run_on_ray(tasks, grid, storage, opts, progress)
        finally:
            progress.close()
    rows = tracking.grid_status(grid, grid_run)
    _print_status(rows)
    # Failure is what this run did not bring to an end; diverged trials found from an earlier
    # run are reported in the table, and a re-run with nothing left to do succeeds.
    ran = {t.trial.id for t in tasks}
    bad = [
        r for r in rows if r["state"] != tracking.FINISHED and (r["trial_id"] in ran or r["state"] not in tracking.DONE)
    ]
    for r in bad:
        click.echo(f"{r['trial_id']} {r['state']}: {r['error'] or 'did not run to the end'}", err=True)
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(tasks)} trials run did not finish")


@cli.command()
@grid_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@storage_option
@tracking_option
def status(grid_file: str, as_json: bool, storage: Path, tracking_uri: str | None) -> None:
    """What is done, running, failed or pending in GRID_FILE; works while it runs.

    \b
    Examples:
      mlpgrid status grids/quickstart.yaml
      mlpgrid status grids/quickstart.yaml --json
    """
    from mlpgrid import tracking

    grid = _load_grid(grid_file)
    uri = tracking.tracking_uri(storage, tracking_uri)
    try:
        rows = tracking.grid_status(grid, tracking.find_grid(grid, uri))
    except Exception as e:  # noqa: BLE001 - e.g. a store still being created, or unreachable
        raise click.ClickException(f"cannot read MLflow tracking URI {uri}: {e}") from None
    if as_json:
        click.echo(json.dumps({"grid": grid.name, "trials": rows, "totals": _totals(rows)}, indent=2))
    else:
        _print_status(rows)


@cli.command()
@grid_argument
@click.option("--trial", "trial_id", required=True, help="Trial id (or a unique prefix) from --dry-run.")
@storage_option
@tracking_option
def trial(grid_file: str, trial_id: str, storage: Path, tracking_uri: str | None) -> None:
    """Run one trial of GRID_FILE in this process, without Ray (for debugging).

    It resumes and records in MLflow exactly as `run` does.

    \b
    Example:
      mlpgrid trial grids/quickstart.yaml --trial 3fa2
    """
    from mlpgrid import runner
    from mlpgrid.progress import Progress

    grid = _load_grid(grid_file)
    try:
        chosen = grid.trial(trial_id)
        runner.check_data(grid)
    except (SpecError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    grid_run = _tracking(grid, storage, tracking_uri)
    pending = {task.trial.id: task for task in runner.pending_tasks(grid, storage, grid_run)}
    if chosen.id not in pending:
        click.echo(f"Trial {chosen.id} has already ended.")
        return
    task = pending[chosen.id]
    progress = Progress([chosen])
    progress.start(chosen)
    status = runner.execute(task, report=lambda m: progress.epoch(chosen, m))
    progress.end(chosen, status)
    if status != "finished":
        raise click.ClickException(f"trial {chosen.id} {status}")


@cli.command("model-info")
@click.argument("name")
@click.option("--resolution", default=64, show_default=True, help="Image side in pixels.")
@click.option("--channels", default=3, show_default=True, help="Image channels.")
@click.option("--classes", default=1000, show_default=True, help="Output classes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def model_info(name: str, resolution: int, channels: int, classes: int, as_json: bool) -> None:
    """Parameters and forward FLOPs of a model such as B-12/Wi-1024.

    FLOPs count one multiply-add as one FLOP, as fvcore and the paper do.

    \b
    Example:
      mlpgrid model-info B-12/Wi-1024 --resolution 64 --classes 10450 --json
    """
    try:
        cfg = models.config_for(name, channels * resolution * resolution, classes)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    info = {"name": cfg.name, "params": models.count_params(cfg), "forward_flops": models.forward_flops(cfg)}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(
            f"{info['name']}: {_millions(info['params'])} parameters,"
            f" {_millions(info['forward_flops'])} FLOPs per forward"
        )


def main() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its INFO lines on database setup
    cli(prog_name="mlpgrid")


if __name__ == "__main__":
    sys.exit(main())
