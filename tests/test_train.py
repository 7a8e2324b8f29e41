import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import (
    REPO,
    final_checkpoint,
    mlpgrid_command,
    wait_until_held,
    without_timing,
    write_fashion_mnist_subset,
)
from mlpgrid.cli import cli
from mlpgrid.data import Datasets
from mlpgrid.grid import spec
from mlpgrid.grid.layout import TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.training.checkpoint import HOLD_AT, CheckpointDir
from mlpgrid.training.loop import Hooks, TrialDiverged, lr_at, run_trial
from mlpgrid.training.setup import TrialOptions
from test_sources import write_cifar10

TINY = dict(model="B-1/Wi-32", examples=2000, epochs=2, batch_size=100)


def test_a_trial_learns_and_checkpoints(tmp_path, fashion_mnist):
    cfg = TrialConfig(**TINY, optimizer="adamw", lr=1e-3, flip=True, crop_padding=2, mixup=0.2, label_smoothing=0.1)
    seen = []
    layout = TrialLayout(tmp_path / "trial")
    result = run_trial(cfg, layout, datasets=Datasets({"fashion-mnist": fashion_mnist}), hooks=Hooks(epoch=seen.append))
    assert [m["epoch"] for m in seen] == [1, 2] and result.history == seen
    assert result.status == "finished" and result.seed == 0
    assert result.test_error < 0.4, "well below the 0.9 of chance"
    assert seen[1]["train_loss"] < seen[0]["train_loss"]
    assert CheckpointDir(layout.checkpoints).positions() == [(1, 0), (2, 0)]


@pytest.mark.parametrize("optimizer,lr", [("lion", 3e-4), ("sgd", 0.05)])
def test_each_optimizer_trains(tmp_path, fashion_mnist, optimizer, lr):
    cfg = TrialConfig(**{**TINY, "epochs": 1}, optimizer=optimizer, lr=lr, weight_decay=1e-3, clip_grad=1.0)
    result = run_trial(cfg, TrialLayout(tmp_path), datasets=Datasets({"fashion-mnist": fashion_mnist}))
    assert result.test_error < 0.5


def test_finished_trial_is_not_trained_again(tmp_path, fashion_mnist):
    cfg = TrialConfig(**TINY)
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    first = run_trial(cfg, TrialLayout(tmp_path), datasets=datasets)
    again = run_trial(cfg, TrialLayout(tmp_path), datasets=datasets)
    assert again.history == first.history and again.resumed_from == []


def test_checkpoint_of_another_config_is_refused(tmp_path, fashion_mnist):
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    run_trial(TrialConfig(**{**TINY, "epochs": 1}), TrialLayout(tmp_path), datasets=datasets)
    with pytest.raises(ValueError, match="belongs to another trial config"):
        run_trial(TrialConfig(**{**TINY, "epochs": 1}, seed=1), TrialLayout(tmp_path), datasets=datasets)


def test_diverging_trial_is_detected(tmp_path, fashion_mnist):
    cfg = TrialConfig(**{**TINY, "epochs": 1}, optimizer="sgd", lr=1e12)
    with pytest.raises(TrialDiverged, match="training loss is (nan|inf)"):
        run_trial(cfg, TrialLayout(tmp_path), datasets=Datasets({"fashion-mnist": fashion_mnist}))


def test_warmup_then_cosine():
    cfg = TrialConfig(model="B-1/Wi-8", epochs=4, lr=1.0, warmup_epochs=1)
    lrs = [lr_at(cfg, s, 10) for s in range(40)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    constant = TrialConfig(model="B-1/Wi-8", epochs=4, lr=1.0, schedule="constant")
    assert {lr_at(constant, s, 10) for s in range(40)} == {1.0}


def _run_trial_process(grid, trial_id, storage, hold=None):
    env = {k: v for k, v in os.environ.items() if k != HOLD_AT} | ({HOLD_AT: hold} if hold else {})
    return subprocess.Popen(
        mlpgrid_command("trial", str(grid), "--trial", trial_id, "--storage", str(storage)),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


# --- kill and resume ---------------------------------------------------------------------

RESUME_GRID = """
run:
  checkpoint_every_steps: 7
base:
  model: B-2/Wi-64
  examples: 12000
  epochs: 3
  batch_size: 32
  optimizer: lion
  lr: 3.0e-4
  dropout: 0.1
  flip: true
  crop_padding: 2
  mixup: 0.8
  label_smoothing: 0.1
  warmup_epochs: 0.5
  seed: 11
"""


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, write_grid, fashion_mnist):
    path = write_grid(RESUME_GRID)
    grid = spec.load(path)
    (trial,) = grid.trials

    reference = _run_trial_process(path, trial.id, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    storage = tmp_path / "interrupted"
    # Killed once its checkpoint at step 70 of the second epoch is on disk, while training goes on.
    victim = _run_trial_process(path, trial.id, storage, hold="1:70")
    assert wait_until_held(storage / grid.name / trial.id / "held", victim) == victim.pid
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL

    resumed = _run_trial_process(path, trial.id, storage)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    final, final_ref = final_checkpoint(storage, grid, trial), final_checkpoint(tmp_path / "reference", grid, trial)
    (epoch, step), *_ = final["resumed_from"]
    assert (epoch, step) == (1, 70), "resumed from the checkpoint it was killed after, mid-epoch"
    assert len(final["history"]) == 3
    assert without_timing(final["history"]) == without_timing(final_ref["history"])
    for name, tensor in final_ref["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    assert final["optimizer"] is None and final_ref["optimizer"] is None, "a finished trial keeps its weights only"


# --- the grid command --------------------------------------------------------------------


def test_run_skips_what_is_done_and_reports_diverged_trials(tmp_path, write_grid, fashion_mnist):
    path = write_grid(
        "base: {model: B-1/Wi-16, examples: 1000, epochs: 1, batch_size: 100, optimizer: sgd}\n"
        "grid:\n  lr: [0.05, 1.0e12]\n"
    )
    run = ["run", str(path), "--storage", str(tmp_path / "store"), "--in-process"]
    first = CliRunner().invoke(cli, run)
    assert first.exit_code == 1, first.output
    assert "1 of 2 trials run did not finish" in first.output and "diverged: training loss is" in first.output
    assert first.output.count("] start ") == 2

    again = CliRunner().invoke(cli, run)
    assert again.exit_code == 0, "nothing left to do"
    assert "] start " not in again.output, "nothing is re-run"
    assert "Nothing to do: all 2 trials of grid have already ended." in again.output
    assert "2 trials: 1 diverged, 1 finished" in again.output


def test_a_trial_that_runs_out_of_memory_fails_alone(tmp_path, write_grid, fashion_mnist):
    # 60000 images at 100000x100000 pixels: the allocation fails at once, for real.
    path = write_grid(
        "base: {model: B-1/Wi-16, examples: 500, epochs: 1, batch_size: 100}\ngrid:\n  resolution: [28, 100000]\n"
    )
    storage = tmp_path / "store"
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", str(storage), "--in-process"])
    assert result.exit_code == 1
    assert "1 of 2 trials run did not finish" in result.output and "failed: MemoryError" in result.output
    assert (
        "Traceback (most recent call last)" not in result.output
        and "Tracebacks: each trial's MLflow run, tag 'error'" in result.output
    )
    assert "MemoryError" in result.output and "2 trials: 1 failed, 1 finished" in result.output
    status = CliRunner().invoke(cli, ["status", str(path), "--storage", str(storage), "--json"])
    rows = {r["state"]: r for r in json.loads(status.output)["trials"]}
    assert "MemoryError" in rows["failed"]["error"] and rows["finished"]["test_error"] < 0.9
    retry = CliRunner().invoke(cli, ["run", str(path), "--storage", str(storage), "--in-process"])
    assert retry.output.count("] start ") == 1, "a failed trial is tried again, the finished one is not"


def test_run_refuses_a_missing_dataset_before_training(tmp_path, write_grid):
    path = write_grid("data:\n  fashion-mnist: nowhere\nbase: {model: B-1/Wi-16, epochs: 1}\n")
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "dataset fashion-mnist:" in result.output and "nowhere: no such directory" in result.output
    assert f"Set data.fashion-mnist in {path}" in result.output
    assert not (tmp_path / "s").exists()


def test_run_refuses_more_examples_than_a_partial_copy_of_the_dataset_holds(tmp_path, write_grid):
    """A copy of Fashion-MNIST's first 50 training images serves trials of up to 50 examples; a
    grid that asks more of it is refused before anything runs, naming the largest."""
    root = write_fashion_mnist_subset(tmp_path / "fm", 50, 20)
    path = write_grid(f"data:\n  fashion-mnist: {root}\nbase: {{model: B-1/Wi-16, epochs: 1}}\n"
                      "grid:\n  examples: [50, 60, null]\n")  # fmt: skip
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert (f"dataset fashion-mnist: {root} holds 50 training images, and 2 of the grid's trials train on more "
            "(examples up to 60,000: trial ") in result.output  # fmt: skip
    assert f"Lower their examples in {path}, or give the whole dataset. Set data.fashion-mnist in" in result.output
    assert not (tmp_path / "s").exists()
    fits = write_grid(f"data:\n  fashion-mnist: {root}\nbase: {{model: B-1/Wi-16, epochs: 1, examples: 50}}\n",
                      "fits.yaml")  # fmt: skip
    dry = CliRunner().invoke(cli, ["run", str(fits), "--storage", str(tmp_path / "s"), "--dry-run"])
    assert dry.exit_code == 0, dry.output


def test_a_trial_directory_has_one_writer_at_a_time(tmp_path):
    from mlpgrid.system.locks import exclusive

    holder = subprocess.Popen(
        [sys.executable, "-c", f"from mlpgrid.system.locks import exclusive\nimport time\n"
         f"with exclusive({str(tmp_path / 'lock')!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        held = f"held by another process \\(pid {holder.pid} on "
        with pytest.raises(RuntimeError, match=held), exclusive(tmp_path / "lock", wait_s=0.5):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path / "lock", wait_s=5):  # the lock died with its holder
        pass


@pytest.mark.parametrize("model,drop_path", [("Mixer-S/16", 0.1), ("ResMLP-S12/16", 0.1), ("RepMLPNet-T/4", 0.0)])
def test_a_patch_model_trains_resumes_exactly_and_evaluates_its_pooled_features(tmp_path, model, drop_path):
    """Mixer, ResMLP and RepMLPNet run as the MLPs do: trained (with stochastic depth where it
    has it), resumed from a checkpoint to the same history (RepMLPNet's BatchNorm statistics
    included), a stage on the pooled representation (RepMLPNet's merged form's), their
    patch-embedding filters drawn (on a small CIFAR-format set: Fashion-MNIST's 10,000 test
    images cost minutes per evaluation)."""
    write_cifar10(tmp_path / "cifar", np.random.default_rng(0), per_batch=40, test=20)
    cfg = TrialConfig(model=model, dataset="cifar-10", examples=200, epochs=2, batch_size=50, optimizer="adamw",
                      lr=1e-3, tta=2, drop_path=drop_path)  # fmt: skip
    datasets = Datasets({"cifar-10": tmp_path / "cifar"})
    layout = TrialLayout(tmp_path / "trial")
    first = run_trial(cfg, layout, datasets=datasets)
    assert first.status == "finished" and 0 <= first.stages["test_error_tta"] <= 1
    CheckpointDir(layout.checkpoints).file(2, 0).unlink()  # back to the end of epoch 1
    (layout.stages / "stages.json").unlink()
    again = run_trial(cfg, layout, datasets=datasets)
    assert without_timing(again.history) == without_timing(first.history) and again.resumed_from == [[1, 0]]
    assert again.stages == first.stages
    assert (layout.stages / "first_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_repmlpnet_learns_and_its_merged_form_scores_as_it_does(tmp_path):
    """RepMLPNet on 32x32 Fashion-MNIST learns in 40 steps; the pure MLP it merges into after
    training gives its test error."""
    from mlpgrid.models import networks
    from mlpgrid.training.setup import make_loaders
    from mlpgrid.training.step import evaluate

    datasets = Datasets({"fashion-mnist": write_fashion_mnist_subset(tmp_path / "f", 1000, 200)})
    cfg = TrialConfig(model="RepMLPNet-T/4", resolution=32, examples=1000, epochs=2, batch_size=50,
                      optimizer="adamw", lr=1e-3)  # fmt: skip
    layout = TrialLayout(tmp_path / "trial")
    result = run_trial(cfg, layout, datasets=datasets)
    assert result.test_error < 0.5, f"well below the 0.9 of chance: {result.history}"
    state = torch.load(CheckpointDir(layout.checkpoints).file(2, 0), weights_only=True)["model"]
    assert any(k.endswith("running_mean") for k in state), "BatchNorm statistics are in the checkpoint"
    model = networks.build(cfg.model_config())
    model.load_state_dict(state)
    merged = networks.inject_locality(model.eval())
    _, test = make_loaders(datasets.load("fashion-mnist", 32), cfg, torch.device("cpu"), budget_bytes=1e9)
    assert evaluate(merged, test)[1] == pytest.approx(result.test_error, abs=0.01)


def test_the_test_images_get_what_the_training_subset_leaves_of_the_budget(tmp_path):
    from mlpgrid.data import loader as loaders
    from mlpgrid.training.setup import make_loaders

    arrays = Datasets({"fashion-mnist": write_fashion_mnist_subset(tmp_path / "f", 300, 100)}).load("fashion-mnist")
    cfg = TrialConfig(model="B-1/Wi-16", epochs=1, examples=200)
    train, test = make_loaders(arrays, cfg, torch.device("cpu"), budget_bytes=250 * 784)
    assert isinstance(train, loaders.DeviceLoader) and loaders.device_bytes(train) == 200 * 784
    assert isinstance(test, loaders.StreamingLoader) and test.resident == 50, "50 of the 100 test images fit"
    train, test = make_loaders(arrays, cfg, torch.device("cpu"), budget_bytes=150 * 784)
    assert train.resident == 150 and test.resident == 0


def test_a_trial_trains_the_same_at_every_residency_and_records_it(tmp_path, fashion_mnist):
    from mlpgrid.training.setup import data_budget

    cfg = TrialConfig(**TINY, mixup=0.2, crop_padding=2)
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    cpu = torch.device("cpu")
    assert data_budget(TrialOptions(), cpu, [cfg]) == 8 * 2**30, "a CPU trial keeps up to 8 GiB of host RAM"
    assert data_budget(TrialOptions(data_budget_bytes=5.0), cpu, [cfg]) == 5.0
    results = {}
    for budget in (None, 500 * 784, 0):  # all resident, a quarter, none (a budget smaller than one image)
        layout = TrialLayout(tmp_path / str(budget))
        results[budget] = run_trial(cfg, layout, TrialOptions(data_budget_bytes=budget), datasets=datasets, device=cpu)
    assert [[m["resident_share"] for m in r.history] for r in results.values()] == [[1.0] * 2, [0.25] * 2, [0.0] * 2]
    losses = {budget: [(m["train_loss"], m["test_loss"]) for m in r.history] for budget, r in results.items()}
    assert losses[None] == losses[500 * 784] == losses[0], "the same batches, whatever is resident"


def _weights_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", ["lion-mixup", "adamw-clip", "sgd"])
def test_a_trial_alone_trains_as_recorded(tmp_path, fashion_mnist, name):
    """A trial alone, one torch thread on the CPU, against the history and final weights that the
    code before the one training loop recorded (tests/data/lone_trials.json, from commit 9da03a0:
    three optimizers, warm-up, both schedules, clipping, MixUp, flips, crops, checkpoints mid-epoch):
    the loop that trains groups trains a trial alone bit for bit as before."""
    recorded = json.loads((REPO / "tests" / "data" / "lone_trials.json").read_text())[name]
    layout = TrialLayout(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_trial(TrialConfig(**recorded["config"]), layout, TrialOptions(checkpoint_every_steps=7),
                           datasets=Datasets({"fashion-mnist": fashion_mnist}))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert without_timing(result.history) == recorded["history"]
    assert _weights_digest(CheckpointDir(layout.checkpoints).latest()["model"]) == recorded["weights_sha256"]


def test_every_epoch_trains_in_training_mode(tmp_path, fashion_mnist):
    """Evaluation after an epoch puts the model in eval mode; the next epoch must train in training
    mode again (batch norm's statistics, dropout), exactly as a resumed trial's fresh model does:
    two epochs straight equal one epoch, a resume, and the second."""
    cfg = TrialConfig(model="B-1/Wi-16", norm="batchnorm", dropout=0.1, examples=500, epochs=2, batch_size=50)
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    straight = run_trial(cfg, TrialLayout(tmp_path / "straight"), datasets=datasets)
    resumed = TrialLayout(tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight", resumed.root)
    checkpoints = CheckpointDir(resumed.checkpoints)
    assert checkpoints.positions() == [(1, 0), (2, 0)]
    for suffix in (".pt", ".sha256"):
        checkpoints.file(2, 0).with_suffix(suffix).unlink()
    again = run_trial(cfg, resumed, datasets=datasets)
    assert again.resumed_from == [[1, 0]]
    assert without_timing(again.history) == without_timing(straight.history)


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "MixUp"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_the_one_pass_loss_is_the_recipes_loss(mixed, smoothing):
    """The compiled trials' loss (one log-sum-exp, two gathers, a mean) against the recipe's
    formula through F.cross_entropy: the same value and gradient, on fresh random logits in
    float64 (rounding alone) and in float32 through torch.compile, as compiled trials run it."""
    from mlpgrid.data.loader import Batch
    from mlpgrid.training.step import compiled_recipe_loss, recipe_loss, soft_target_loss

    generator = torch.Generator().manual_seed(int(mixed) * 10 + int(smoothing * 10))
    classes, size = 10_450, 64
    logits = torch.randn(size, classes, generator=generator, dtype=torch.float64) * 3
    labels, other = (torch.randint(0, classes, (size,), generator=generator) for _ in range(2))
    lam = torch.rand((), generator=generator, dtype=torch.float64) if mixed else None
    batch = Batch(images=torch.empty(0), labels=labels, mixed_labels=other if mixed else labels, lam=lam, whole=size)
    plain, fused = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    recipe_loss(plain, batch, smoothing).backward()
    loss = soft_target_loss(fused, labels, batch.mixed_labels, lam, smoothing)
    loss.backward()
    assert loss.item() == pytest.approx(recipe_loss(logits, batch, smoothing).item(), rel=1e-12)
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-10, atol=1e-14)
    single = logits.float().requires_grad_()
    compiled_batch = dataclasses.replace(batch, lam=None if lam is None else lam.float())
    compiled_recipe_loss(single, compiled_batch, smoothing).backward()
    assert single.grad is not None
    torch.testing.assert_close(single.grad.double(), plain.grad, rtol=1e-4, atol=1e-9)


def test_evaluating_every_few_epochs_trains_the_same_and_logs_the_epochs_evaluated(tmp_path, write_grid,
                                                                                    fashion_mnist):  # fmt: skip
    from mlflow import MlflowClient

    from mlpgrid.grid.layout import StorageLayout
    from mlpgrid.tracking import reader

    cfg = TrialConfig(**{**TINY, "epochs": 5})
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    every = run_trial(cfg, TrialLayout(tmp_path / "1"), datasets=datasets)
    third = run_trial(cfg, TrialLayout(tmp_path / "3"), TrialOptions(evaluate_every=3), datasets=datasets)
    assert [m["epoch"] for m in third.history if "test_error" in m] == [3, 5], "every third epoch and the last"
    assert [m["train_loss"] for m in third.history] == [m["train_loss"] for m in every.history], (
        "evaluating trains nothing"
    )
    assert third.test_error == every.test_error and third.best_test_error >= every.best_test_error

    path = write_grid("run: {evaluate_every: 2}\nbase: {model: B-1/Wi-16, examples: 500, epochs: 3, batch_size: 100}\n")
    storage = tmp_path / "store"
    result = CliRunner().invoke(cli, ["run", str(path), "--storage", str(storage), "--in-process"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    (run,) = client.search_runs([client.get_experiment_by_name("grid").experiment_id], "tags.mlpgrid_role = 'trial'")

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))

    assert steps("train_loss") == [1, 2, 3] and steps("test_error") == steps("best_test_error") == [2, 3]
    bad = write_grid("run: {evaluate_every: 0}\nbase: {model: B-1/Wi-16, epochs: 1}\n")
    refused = CliRunner().invoke(cli, ["run", str(bad), "--dry-run"])
    assert (
        refused.exit_code == 1
        and "run.evaluate_every" in refused.output
        and "expected a whole number >= 1" in refused.output
    )
