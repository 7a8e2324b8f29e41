"""Trial groups: same-shape trials trained together on one batch stream, each still a trial."""

import json
import math
import os
import shutil
import signal
import subprocess

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import (
    FASHION_MNIST,
    REPO,
    final_checkpoint,
    mlpgrid_command,
    start_driver,
    stop_group,
    wait_until_held,
    without_timing,
)
from mlpgrid import policy
from mlpgrid.cli import cli
from mlpgrid.data import Datasets
from mlpgrid.execution.groups import form_groups, group_key
from mlpgrid.execution.runner import execute, pending_tasks
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout, TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.tracking import reader, writer
from mlpgrid.training.checkpoint import HOLD_AT, CheckpointDir
from mlpgrid.training.loop import Hooks, TrialDiverged, TrialResult, run_group, run_trial
from mlpgrid.training.setup import TrialOptions

SHARED = dict(model="B-1/Wi-32", examples=1500, batch_size=100, flip=True, crop_padding=2, mixup=0.2)
MEMBERS = [
    TrialConfig(**SHARED, optimizer="adamw", epochs=2, lr=1e-3),
    TrialConfig(**SHARED, optimizer="adamw", epochs=3, lr=3e-4, weight_decay=0.05, label_smoothing=0.1,
                clip_grad=0.5, warmup_epochs=1),
    TrialConfig(**SHARED, optimizer="adamw", epochs=1, lr=1e-3, schedule="constant"),
    TrialConfig(**SHARED, optimizer="adamw", epochs=3, lr=1e9),  # diverges
]  # fmt: skip
# Fused members compute each layer for all members in one batched multiply, alone in one
# multiply each: the float sums are ordered differently. Measured on this grid: train losses
# differ by < 2e-7; these bounds leave room for other CPUs.
FUSED_LOSS_TOLERANCE = 1e-4
FUSED_ERROR_TOLERANCE = 0.002  # 20 of the 10,000 test images


def test_groups_are_same_shape_trials_on_one_stream():
    grid = spec.parse(
        "base: {model: B-1/Wi-16, examples: 1000}\ngrid:\n  epochs: [1, 2]\n  lr: [1.0e-3, 3.0e-3]\n  seed: [0, 1]\n",
        spec.Path("g.yaml"),
    )
    groups = form_groups(grid.trials, None)
    assert sorted(len(g.trials) for g in groups) == [4, 4], "seeds draw other batches: a group per seed"
    assert {t.config.seed for t in groups[0].trials} == {0}
    assert [len(g.trials) for g in form_groups(grid.trials, 3)] == [3, 1, 3, 1]
    assert all(len(g.trials) == 1 for g in form_groups(grid.trials, 1))
    assert group_key(TrialConfig(model="B-1/Wi-16", epochs=1, dropout=0.1)) is None, "dropout masks are not shared"


def test_a_gpu_groups_automatically_only_where_fused_compiled_steps_pay():
    small = "base: {model: B-6/Wi-256, examples: 60000, batch_size: 4096}\ngrid:\n  epochs: [%s]\n"
    short = spec.parse(small % "1, 2", spec.Path("g.yaml")).trials
    assert [len(g.trials) for g in form_groups(short, None, device_type="cpu")] == [2], "the CPU shares the loader"
    assert [len(g.trials) for g in form_groups(short, None, device_type="cuda")] == [1, 1], "too short to compile"
    assert [len(g.trials) for g in form_groups(short, None, device_type="cuda", fuse=True)] == [1, 1], "across T"
    assert [len(g.trials) for g in form_groups(short, 2, device_type="cuda")] == [2], "a size given stands"
    long = spec.parse(small % "400, 500", spec.Path("g.yaml")).trials
    assert [len(g.trials) for g in form_groups(long, None, device_type="cuda")] == [1, 1], "members would leave"
    assert [len(g.trials) for g in form_groups(long, 2, device_type="cuda")] == [2], "--group 2 groups across T"
    seconds_per_epoch = policy.shortest_training_s(long[0].config) / long[0].config.epochs
    hours = math.ceil(policy.LEAVE_PAYS_S / seconds_per_epoch)  # epochs that take LEAVE_PAYS_S at the matmul limit
    longest = spec.parse(small % f"{hours}, {hours + 100}", spec.Path("g.yaml")).trials
    assert [len(g.trials) for g in form_groups(longest, None, device_type="cuda")] == [2], "a leave costs <1%"
    sweep = "base: {model: B-6/Wi-256, examples: 60000, batch_size: 4096, epochs: 500}\ngrid:\n  lr: [1.0e-4, 3.0e-4]\n"
    lrs = spec.parse(sweep, spec.Path("g.yaml")).trials
    assert [len(g.trials) for g in form_groups(lrs, None, device_type="cuda")] == [2], "an lr sweep ends together"
    eight = spec.parse(sweep.replace("lr: [1.0e-4, 3.0e-4]", "lr: [1, 2, 3, 4, 5, 6, 7, 8]"), spec.Path("g.yaml"))
    assert [len(g.trials) for g in form_groups(eight.trials, None, 1, device_type="cuda")] == [8], "one GPU"
    per_gpu = [len(g.trials) for g in form_groups(eight.trials, None, 4, device_type="cuda")]
    assert per_gpu == [2, 2, 2, 2], "on four GPUs a group each, where each still compiles"
    assert [len(g.trials) for g in form_groups(lrs, None, 4, device_type="cuda")] == [1, 1], "a GPU each"
    short_lrs = spec.parse(sweep.replace("epochs: 500", "epochs: 1"), spec.Path("g.yaml")).trials
    assert [len(g.trials) for g in form_groups(short_lrs, None, device_type="cuda")] == [1, 1], "too short to compile"
    assert [len(g.trials) for g in form_groups(short_lrs, None, device_type="cuda", fuse=True)] == [2], "fuse: true"
    big = spec.parse(small.replace("B-6/Wi-256", "B-12/Wi-2048") % "400, 500", spec.Path("g.yaml")).trials
    assert [len(g.trials) for g in form_groups(big, None, device_type="cuda")] == [1, 1], "too large to fuse"


def test_run_group_and_fuse_options(write_grid):
    base = "base: {model: B-1/Wi-16, epochs: 1}\n"
    assert spec.load(write_grid("run: {group: off, fuse: true}\n" + base)).run.group == 1
    assert spec.load(write_grid("run: {group: 4, fuse: auto}\n" + base)).run == spec.RunOptions(group=4)
    assert spec.load(write_grid("run: {group: auto}\n" + base)).run.group is None
    with pytest.raises(spec.SpecError) as refused:
        spec.load(write_grid("run: {group: 0, fuse: sometimes}\n" + base))
    assert "run.group: expected the most trials a worker trains together (>= 1), off or auto, got 0" in str(
        refused.value
    )
    assert "run.fuse: expected true, false or auto, got 'sometimes'" in str(refused.value)
    for value in ("none", "²"):  # a superscript is a digit to str.isdigit, not to int()
        result = CliRunner().invoke(cli, ["run", str(write_grid(base)), "--dry-run", "--group", value])
        assert (
            result.exit_code == 2 and f"expected auto, off or a number of trials >= 1, got '{value}'" in result.output
        )


def _run_members(cfgs, root, fuse, fashion_mnist, compile=False):
    outcomes = {}
    layouts = [TrialLayout(root / str(i)) for i in range(len(cfgs))]
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    options = TrialOptions(checkpoint_every_steps=4, compile=compile)
    run_group(cfgs, layouts, options, datasets=datasets, hooks=[Hooks()] * len(cfgs), device=torch.device("cpu"),
              fuse=fuse, on_end=outcomes.__setitem__)  # fmt: skip
    return outcomes, layouts


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The members that do not diverge, each trained alone."""
    root, datasets = tmp_path_factory.mktemp("alone"), Datasets({"fashion-mnist": FASHION_MNIST})
    return [run_trial(cfg, TrialLayout(root / str(i)), datasets=datasets) for i, cfg in enumerate(MEMBERS[:3])]


@pytest.mark.parametrize("fuse,compile", [(False, False), (True, False), (True, True)],
                         ids=["one after another", "fused", "fused and compiled"])  # fmt: skip
def test_members_match_their_trials_alone_end_at_their_t_and_a_diverging_one_leaves_alone(
    tmp_path, fashion_mnist, alone, fuse, compile
):
    """Compiled, the fused step is recompiled as members leave (as on a GPU, where it is compiled)."""
    outcomes, layouts = _run_members(MEMBERS, tmp_path, fuse, fashion_mnist, compile)
    assert isinstance(outcomes[3], TrialDiverged) and "training loss is nan in epoch 1" in str(outcomes[3])
    for i, expected in enumerate(alone):
        result = outcomes[i]
        assert isinstance(result, TrialResult) and result.epochs == MEMBERS[i].epochs
        assert CheckpointDir(layouts[i].checkpoints).positions()[-1] == (MEMBERS[i].epochs, 0), "ended at its T"
        if not fuse:  # each member computes exactly what it computes alone
            assert without_timing(result.history) == without_timing(expected.history)
            continue
        for got, want in zip(result.history, expected.history, strict=True):
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=FUSED_LOSS_TOLERANCE)
            assert got["test_loss"] == pytest.approx(want["test_loss"], rel=FUSED_LOSS_TOLERANCE)
            assert abs(got["test_error"] - want["test_error"]) <= FUSED_ERROR_TOLERANCE


def test_a_compiled_stack_compiles_again_only_when_its_member_count_changes(tmp_path, fashion_mnist):
    """Graphs compiled by the end of each epoch of the member that goes on: none while the same
    members go on, the stack's again when one leaves; and its compile seconds are logged."""
    from torch._dynamo.utils import counters

    cfgs = [TrialConfig(**SHARED, optimizer="adamw", epochs=t, lr=1e-3) for t in (1, 3)]
    graphs, outcomes = [], {}
    hooks = [Hooks(), Hooks(epoch=lambda metrics: graphs.append(counters["stats"]["unique_graphs"]))]
    run_group(cfgs, [TrialLayout(tmp_path / str(i)) for i in range(2)], TrialOptions(compile=True),
              datasets=Datasets({"fashion-mnist": fashion_mnist}), hooks=hooks, device=torch.device("cpu"),
              fuse=True, on_end=outcomes.__setitem__)  # fmt: skip
    assert isinstance(outcomes[1], TrialResult) and outcomes[1].epochs == 3
    assert graphs[2] == graphs[1] > graphs[0], "compiled for two members, then one, then nothing new"
    logged = [("compile_seconds" in m) for m in outcomes[1].history]
    assert logged == [True, True, False], "the first compile and the one after the member left"


def test_a_fused_members_checkpoint_is_an_ordinary_one(tmp_path, fashion_mnist):
    """A member's checkpoint from a fused group resumes alone and ends where the group ended it."""
    outcomes, layouts = _run_members(MEMBERS[:2], tmp_path / "group", True, fashion_mnist)
    alone = TrialLayout(tmp_path / "alone")
    shutil.copytree(layouts[1].root, alone.root)
    checkpoints = CheckpointDir(alone.checkpoints)
    *_, earlier, last = checkpoints.positions()
    assert earlier[0] == 2 and earlier[1] > 0, "the group's checkpoint in the middle of the last epoch"
    for suffix in (".pt", ".sha256"):
        checkpoints.file(*last).with_suffix(suffix).unlink()
    resumed = run_trial(MEMBERS[1], alone, datasets=Datasets({"fashion-mnist": fashion_mnist}))
    assert resumed.resumed_from == [list(earlier)]
    group_end, alone_end = outcomes[1].history[-1], resumed.history[-1]
    assert alone_end["train_loss"] == pytest.approx(group_end["train_loss"], rel=FUSED_LOSS_TOLERANCE)
    assert abs(alone_end["test_error"] - group_end["test_error"]) <= FUSED_ERROR_TOLERANCE


# --- through Ray and MLflow ----------------------------------------------------------------

GROUP_GRID = """
run: {checkpoint_every_steps: 5}
base: {model: B-1/Wi-16, examples: 1000, batch_size: 50, optimizer: adamw}
zip:
  epochs: [1, 2, 3, 2]
  lr: [1.0e-3, 3.0e-3, 1.0e-3, 1.0e+9]
  label_smoothing: [0.0, 0.1, 0.0, 0.0]
"""


def _runs(grid, storage):
    return reader.trial_runs(reader.find_grid(grid, reader.tracking_uri(StorageLayout(storage))))


def _history(storage, run, key):
    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.run_id, key), key=lambda m: m.step)]


def _alone_in_this_process(grid, storage):
    """Each trial alone, with a Ray CPU trial's single torch thread, recorded in MLflow."""
    layout = StorageLayout(storage)
    grid_run = writer.open_grid(grid, reader.tracking_uri(layout), layout)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for task in pending_tasks(grid, layout, grid_run):
            execute(task)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_grouped_grid_on_ray_records_its_trials_as_alone_and_resumes_a_killed_worker_exactly(
    tmp_path, write_grid, fashion_mnist, monkeypatch
):
    """One run of a group on Ray, its worker SIGKILLed in the middle of an epoch at a checkpoint
    this test chooses: each member ends as its trial alone (one torch thread, as a Ray CPU trial)."""
    path = write_grid(GROUP_GRID)
    grid = spec.load(path)
    _alone_in_this_process(grid, tmp_path / "alone")
    storage = tmp_path / "grouped"
    longest = max(grid.trials, key=lambda t: t.config.epochs)
    held = StorageLayout(storage).grid(grid.name).trial(longest.id).root / "held"
    monkeypatch.setenv(HOLD_AT, "1:10")  # the group stops after its checkpoint at step 10 of epoch 2
    driver = start_driver(path, storage, "--max-concurrent", "1")
    try:
        os.kill(wait_until_held(held, driver), signal.SIGKILL)
        out, _ = driver.communicate(timeout=300)
    finally:
        stop_group(driver)
    assert "4 trials in 1 worker: 1 group of 4" in out, out
    assert "retry  " in out and "1 of 4 trials run did not finish" in out, out

    recorded, runs_alone = _runs(grid, storage), _runs(grid, tmp_path / "alone")
    assert set(recorded) == set(runs_alone) == {t.id for t in grid.trials}, "one run per member"
    assert len({run.tags["group_id"] for run in recorded.values()}) == 1
    assert all(run.tags["ran_in"] == "group" and run.tags["group_size"] == "4" for run in recorded.values())
    for trial in grid.trials:
        run, single = recorded[trial.id], runs_alone[trial.id]
        diverges = trial.config.lr > 1
        assert run.tags["status"] == single.tags["status"] == ("diverged" if diverges else "finished")
        assert set(run.params.items()) == set(single.params.items())
        if diverges:
            continue
        # Members are stepped one after another on the CPU: each computes exactly what it does alone.
        for key in ("test_error", "train_loss", "test_loss", "lr"):
            assert _history(storage, run, key) == _history(tmp_path / "alone", single, key), key
        assert [step for step, _ in _history(storage, run, "epoch")] == list(range(1, trial.config.epochs + 1))
        client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
        assert {"trial_config.json", "first_layer.png"} <= {a.path for a in client.list_artifacts(run.run_id)}
        final, expected = final_checkpoint(storage, grid, trial), final_checkpoint(tmp_path / "alone", grid, trial)
        if trial.config.epochs > 1:  # the one-epoch member had left the group before the kill
            assert final["resumed_from"] == [[1, 10]], "resumed from the checkpoint the worker was killed after"
        assert without_timing(final["history"]) == without_timing(expected["history"])
        for name, tensor in expected["model"].items():
            assert torch.equal(final["model"][name], tensor), (trial.id, name)
        if expected["optimizer"] is None:  # a finished trial keeps its weights only
            assert final["optimizer"] is None
        else:  # the diverged member's last checkpoint, optimizer state and all
            for key, state in expected["optimizer"]["state"].items():
                assert all(torch.equal(final["optimizer"]["state"][key][k], v) for k, v in state.items())
    status = subprocess.run(mlpgrid_command("status", str(path), "--storage", str(storage), "--json"),
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert json.loads(status.stdout)["totals"] == {"diverged": 1, "finished": 3}
