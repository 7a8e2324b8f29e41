"""The ``mlpgrid`` command line. Thin: parsing and printing; the work is in the modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from mlpgrid import models, spec
from mlpgrid.spec import GridSpec, SpecError, Trial

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


def _epoch_line(trial: Trial, m: dict[str, Any]) -> None:
    click.echo(
        f"  {trial.id} epoch {m['epoch']}/{trial.config.epochs}  train_loss {m['train_loss']:.4f}  "
        f"test_error {m['test_error']:.4f}  {m['images_per_s']:,.0f} img/s"
    )


@click.group()
@click.version_option(package_name="mlpgrid")
def cli() -> None:
    """Compute grids of vision-MLP training runs and their compute-optimal frontier.

    \b
    Quick start:
      mlpgrid run grids/quickstart.yaml --dry-run   # the trials and their compute
      mlpgrid run grids/quickstart.yaml             # train them (re-run = resume)
    """


@cli.command()
@click.argument("grid_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the trials and their compute, then exit.")
@storage_option
def run(grid_file: str, dry_run: bool, storage: Path) -> None:
    """Run every trial of GRID_FILE that has not finished yet.

    Re-running the same command resumes: finished trials are skipped and interrupted ones
    continue from their last checkpoint.

    \b
    Examples:
      mlpgrid run grids/quickstart.yaml --dry-run
      mlpgrid run grids/quickstart.yaml --storage /scratch/mlpgrid
    """
    from mlpgrid import runner

    grid = _load_grid(grid_file)
    if dry_run:
        _print_plan(grid)
        return

    started = []

    def on_start(i: int, t: Trial) -> None:
        started.append(t)
        c = t.config
        click.echo(
            f"[{i + 1}/{len(grid.trials)}] {t.id} {c.model} N={c.num_examples} T={c.epochs}"
            f" ({_millions(t.params)} params)"
        )

    try:
        results = runner.run_in_process(grid, storage, on_start=on_start, on_epoch=_epoch_line)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    rows = [[r["trial_id"], r["model"], r["examples"], r["epochs"], f"{r['compute']:.3e}", r["status"],
             f"{r['test_error']:.4f}" if "test_error" in r else "-"] for r in results]  # fmt: skip
    _print_table(rows, ["trial", "model", "N", "T", "compute C", "status", "test error"])
    if not started:
        click.echo(f"Nothing to do: all {len(results)} trials of {grid.name} have already ended.")
    bad = [r for r in results if r["status"] != "finished"]
    for r in bad:
        click.echo(f"{r['trial_id']} {r['status']}: {r['error']}", err=True)
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(results)} trials did not finish")


@cli.command()
@click.argument("grid_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--trial", "trial_id", required=True, help="Trial id (or a unique prefix) from --dry-run.")
@storage_option
def trial(grid_file: str, trial_id: str, storage: Path) -> None:
    """Run one trial of GRID_FILE in this process (for debugging); resumes like `run`.

    \b
    Example:
      mlpgrid trial grids/quickstart.yaml --trial 3fa2
    """
    from mlpgrid import runner

    grid = _load_grid(grid_file)
    try:
        chosen = grid.trial(trial_id)
        runner.check_data(grid)
    except (SpecError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    result = runner.run_one(grid, chosen, storage, on_epoch=lambda m: _epoch_line(chosen, m))
    summary = {k: v for k, v in result.items() if k not in ("history", "config", "traceback")}
    click.echo(json.dumps(summary, indent=2))
    if result["status"] != "finished":
        raise click.ClickException(f"trial {chosen.id} {result['status']}: {result['error']}")


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
    cli(prog_name="mlpgrid")


if __name__ == "__main__":
    sys.exit(main())
