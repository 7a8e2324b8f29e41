"""wsd trunks: the trials of one wsd run that differ only in T train it once, and each shorter
one (a branch) ends as it would alone."""

import dataclasses
import hashlib
import os
import signal

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import final_checkpoint, start_driver, stop_group, wait_until_held, without_timing
from mlpgrid.cli import cli
from mlpgrid.data import Datasets
from mlpgrid.execution import trunks
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout, TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.tracking import reader
from mlpgrid.training.checkpoint import HOLD_AT
from mlpgrid.training.loop import lr_at, run_trial

# 1000 images at batch 100: 10 steps an epoch. Cooldowns of half of T: T = 2 branches at epoch
# 1 (an epoch's end), T = 3 at step 15 (epoch 1, step 5: mid-epoch), T = 6 is the trunk.
WSD = dict(model="B-1/Wi-16", examples=1000, batch_size=100, schedule="wsd", cooldown=0.5, optimizer="adamw",
           lr=1e-3, warmup_epochs=1, flip=True, mixup=0.2)  # fmt: skip


def grid_text(epochs: str) -> str:
    """A grid file of the WSD trials at these T."""
    return "base: {" + ", ".join(f"{k}: {v}" for k, v in WSD.items()) + "}\ngrid:\n  epochs: [" + epochs + "]\n"


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode() + tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_wsd_is_constant_until_its_cooldown_whatever_t_then_falls_to_zero():
    short = TrialConfig(**WSD, epochs=3)
    long = dataclasses.replace(short, epochs=6)
    assert short.cooldown_start() == 15 and long.cooldown_start() == 30
    assert [lr_at(short, s, 10) for s in range(15)] == [lr_at(long, s, 10) for s in range(15)], "T plays no part"
    assert lr_at(short, 4, 10) == pytest.approx(5e-4) and lr_at(short, 14, 10) == 1e-3, "warm-up, then constant"
    assert lr_at(short, 15, 10) == 1e-3 and lr_at(short, 29, 10) == pytest.approx(1e-3 * (1 - (14 / 15) ** 0.5))
    linear = dataclasses.replace(short, cooldown_shape="linear")
    assert lr_at(linear, 25, 10) == pytest.approx(1e-3 * (1 - 10 / 15))
    assert trunks.branch_point(short) == (1, 5) and trunks.branch_point(dataclasses.replace(short, epochs=2)) == (1, 0)
    (trunk,) = trunks.form_trunks(spec.parse(grid_text("2, 3, 6"), spec.Path("g.yaml")).trials)
    assert trunk.trunk.config.epochs == 6 and [b.config.epochs for b in trunk.branches] == [2, 3]
    cosine = spec.parse(grid_text("2, 3, 6").replace("wsd", "cosine"), spec.Path("g.yaml")).trials
    assert trunks.form_trunks(cosine) == [], "a cosine schedule knows its length: no trunk"


def _final_state(directory, epochs):
    import torch

    return torch.load(TrialLayout(directory).checkpoints / f"epoch-{epochs:04d}-step-000000.pt", weights_only=True)


def _runs(path, storage):
    grid = spec.load(path)
    grid_run = reader.find_grid(grid, reader.tracking_uri(StorageLayout(storage)))
    return grid, reader.trial_runs(grid_run)


def test_branches_train_only_their_cooldown_and_end_as_alone(tmp_path, write_grid, fashion_mnist):
    path, storage = write_grid(grid_text("2, 3, 6")), tmp_path / "store"
    dry = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert "2 trials branch from 1 wsd trunks" in dry.output and "(23% less)" in dry.output, dry.output
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", str(storage), "--in-process"])
    assert result.exit_code == 0, result.output
    assert "2 trials branch from 1 wsd trunks" in result.output
    grid, runs = _runs(path, storage)
    by_t = {t.config.epochs: t for t in grid.trials}
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    for epochs, point, at in ((2, "epoch 1 step 0", [1, 0]), (3, "epoch 1 step 5", [1, 5])):
        trial = by_t[epochs]
        alone = run_trial(trial.config, TrialLayout(tmp_path / f"alone-{epochs}"), datasets=datasets)
        branched = final_checkpoint(storage, grid, trial)
        state = _final_state(tmp_path / f"alone-{epochs}", epochs)
        assert branched["resumed_from"] == [at], "it trained only from its trunk's state at its cooldown start"
        assert digest(branched["model"]) == digest(state["model"]), f"T={epochs}: bit for bit the trial alone"
        assert without_timing(branched["history"]) == without_timing(alone.history)
        tags = runs[trial.id].tags
        assert tags["trunk"] == by_t[6].id and tags["branch_point"] == point
        total = epochs * 10
        share = (total - trial.config.cooldown_start()) / total
        assert float(tags["trained_compute"]) == pytest.approx(trial.compute * share, rel=1e-6)
        assert float(tags["compute"]) == pytest.approx(trial.compute), "C as the paper counts it"
    assert runs[by_t[6].id].tags["branches"] == "2"
    assert float(runs[by_t[6].id].tags["trained_compute"]) == pytest.approx(by_t[6].compute)

    # --curves: every branch is a point as alone; the trunk's constant-rate epochs are drawn, not fitted.
    grid_run = reader.find_grid(grid, reader.tracking_uri(StorageLayout(storage)))
    points, _ = reader.finished_points(grid_run, "test_error", runs)
    extra, why, stable = reader.curve_points(grid_run, "test_error", runs, points)
    assert extra == [] and why == {reader.CURVE_WSD: 3}
    trunk = by_t[6]
    assert [(p.trial_id, p.compute) for p in stable] == [(f"{trunk.id}@1", trunk.compute / 6),
                                                        (f"{trunk.id}@2", trunk.compute / 3)]  # fmt: skip
    assert all("constant rate, not cooled down" in dict(p.settings)["end"] for p in stable)

    # A trial added once its trunk has ended trains alone, and the run says so.
    more = write_grid(grid_text("2, 3, 4, 6"))
    again = CliRunner().invoke(cli, ["run", str(more), "--storage", str(storage), "--in-process"])
    assert again.exit_code == 0, again.output
    assert "1 train alone from the start: their trunk is past their cooldown start" in again.output
    grid, runs = _runs(more, storage)
    four = next(t for t in grid.trials if t.config.epochs == 4)
    assert "trunk" not in runs[four.id].tags and float(runs[four.id].tags["trained_compute"]) == four.compute


def test_a_trunk_and_then_its_branch_killed_resume_and_the_branch_ends_as_alone(tmp_path, write_grid, fashion_mnist,
                                                                                 monkeypatch):  # fmt: skip
    """Held at epoch 2, step 5: past the branch's cooldown start (epoch 1, step 5) for the trunk,
    inside its cooldown for the branch. The trunk is killed there; the run again resumes it
    (from that checkpoint, so it is not held again) and holds the branch there, killed in turn;
    a third run ends both."""
    path = write_grid("run: {checkpoint_every_steps: 5}\n" + grid_text("3, 6"))
    storage = tmp_path / "store"
    grid = spec.load(path)
    trunk, branch = sorted(grid.trials, key=lambda t: -t.config.epochs)
    layout = StorageLayout(storage).grid(grid.name)
    monkeypatch.setenv(HOLD_AT, "2:5")
    for held in (trunk, branch):
        driver = start_driver(path, storage, "--in-process")
        try:
            os.kill(wait_until_held(layout.trial(held.id).root / "held", driver), signal.SIGKILL)
            driver.communicate(timeout=300)
        finally:
            stop_group(driver)
    monkeypatch.delenv(HOLD_AT)
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", str(storage), "--in-process"])
    assert result.exit_code == 0, result.output
    run_trial(branch.config, TrialLayout(tmp_path / "alone"), datasets=Datasets({"fashion-mnist": fashion_mnist}))
    final = final_checkpoint(storage, grid, branch)
    assert final["resumed_from"] == [[1, 5], [2, 5]], "from its trunk's state, then from its own checkpoint"
    assert digest(final["model"]) == digest(_final_state(tmp_path / "alone", 3)["model"])
    _, runs = _runs(path, storage)
    assert runs[branch.id].tags["trunk"] == trunk.id, "its first checkpoint is its trunk's: still a branch"
    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    steps = [m.step for m in client.get_metric_history(runs[trunk.id].run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 7)), "each of the trunk's epochs once"


def test_a_learning_rate_sweep_of_trunks_trains_grouped_and_each_branch_ends_as_alone(tmp_path, write_grid,
                                                                                        fashion_mnist):  # fmt: skip
    sweep = grid_text("2, 4").replace("lr: 0.001, ", "") + "  lr: [1.0e-3, 3.0e-3]\n"
    path, storage = write_grid(sweep), tmp_path / "store"
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", str(storage), "--in-process", "--group", "2"])
    assert result.exit_code == 0, result.output
    assert "2 trials branch from 2 wsd trunks" in result.output
    assert "1 group of 2" in result.output, "the trunks train together, then the branches"
    grid, runs = _runs(path, storage)
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    for trial in (t for t in grid.trials if t.config.epochs == 2):
        run_trial(trial.config, TrialLayout(tmp_path / trial.id), datasets=datasets)
        branched = final_checkpoint(storage, grid, trial)
        assert branched["resumed_from"] == [[1, 0]] and runs[trial.id].tags["ran_in"] == "group"
        assert digest(branched["model"]) == digest(_final_state(tmp_path / trial.id, 2)["model"])


def test_the_frontier_figure_draws_constant_rate_epochs_apart(tmp_path):
    import numpy as np

    from mlpgrid.analysis import frontier, plots
    from synthetic_law import Law, draw

    analysis = frontier.analyse(draw(Law(), np.random.default_rng(0)))
    boot = frontier.bootstrap(analysis, repeats=4)
    path = plots.error_vs_compute(analysis, boot, [], tmp_path / "f.png", frontier.Labels(), [(1e12, 0.5), (1e13, 0.3)])
    assert path.stat().st_size > 10_000
