"""Reading a grid's runs back (mlpgrid.tracking.reader) from a real `mlflow server`: the REST reader gives
what MlflowClient gives, for every kind of trial run a grid holds."""

import dataclasses
import math

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow_server import MlflowServer

from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader, writer

GRID = """name: {name}
grid:
  model: [B-1/Wi-16, B-1/Wi-32]
  examples: [1000, 2000, 4000]
  epochs: [1, 2]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real `mlflow server` for this file's tests (each uses its own experiment)."""
    process = MlflowServer(tmp_path_factory.mktemp("server"))
    process.start()
    try:
        yield process.url
    finally:
        process.stop()


def comparable(record):
    """NaN is not equal to itself: compared as a word."""
    return dataclasses.replace(record, metrics={k: "NaN" if math.isnan(v) else v for k, v in record.metrics.items()})


def test_the_rest_reader_gives_what_mlflowclient_gives(tmp_path, write_grid, server):
    grid, mlflow_server = spec.load(write_grid(GRID.format(name="reader"))), server
    assert reader.find_grid(grid, mlflow_server) is None, "no experiment yet: nothing is created"
    grid_run = writer.open_grid(grid, mlflow_server, StorageLayout(tmp_path / "store"))
    assert reader.find_grid(grid, mlflow_server) == grid_run
    for i, trial in enumerate(grid.trials):  # finished, failed, running, one with a NaN loss
        run = writer.TrialRun.open(grid_run, trial, tags={"note": "ä ✓ 'quoted'"})
        run.log_epochs([{"epoch": 1, "train_loss": math.nan if i == 3 else 0.5, "test_loss": 0.6,
                         "test_error": 0.1 + i / 100}])  # fmt: skip
        if i % 3 != 2:
            run.finish(reader.FINISHED if i % 3 == 0 else reader.FAILED, error=None if i % 3 == 0 else "boom")
        else:
            run.flush(timeout_s=60)  # still running, its metrics delivered

    read = reader.trial_runs(grid_run)
    client = MlflowClient(mlflow_server)
    expected = {r.data.tags["trial_id"]: reader.record_of(r) for r in client.search_runs([grid_run.experiment_id])
                if r.data.tags.get("mlpgrid_role") == "trial"}  # fmt: skip
    assert set(read) == set(expected) == {t.id for t in grid.trials}
    for trial_id, record in read.items():
        assert comparable(record) == comparable(expected[trial_id])
    assert any(math.isnan(r.metrics["train_loss"]) for r in read.values())
    states = sorted(r.tags["status"] for r in read.values())
    assert states == ["failed"] * 4 + ["finished"] * 4 + ["running"] * 4
    assert {r.tags["note"] for r in read.values()} == {"ä ✓ 'quoted'"}

    # Metric histories (frontier --curves) by REST, as MlflowClient reads them.
    run = writer.TrialRun.open(grid_run, grid.trials[0])
    run.log_epochs([{"epoch": e, "test_error": 0.5 / e} for e in range(2, 5)])
    run.flush(timeout_s=60)
    ids = [r.run_id for r in read.values()]
    histories = reader.metric_histories(grid_run, ids, "test_error")
    by_client = {i: {m.step: m.value for m in client.get_metric_history(i, "test_error")} for i in ids}
    assert histories == by_client and histories[read[grid.trials[0].id].run_id] == {1: 0.1, 2: 0.25, 3: 0.5 / 3,
                                                                                    4: 0.125}  # fmt: skip


@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_many_runs_are_read_whole_and_once(tmp_path, write_grid, monkeypatch, server, store):
    """More runs than a page holds (in every shard, on a server): none lost, none twice."""
    monkeypatch.setattr(reader, "PAGE_SIZE", 2)
    grid, layout = spec.load(write_grid(GRID.format(name=f"pages-{store}"))), StorageLayout(tmp_path / "store")
    uri = server if store == "server" else reader.tracking_uri(layout)
    grid_run = writer.open_grid(grid, uri, layout)
    client = MlflowClient(uri)
    made = set()
    for i in range(40):
        trial_id = f"{i % 16:x}{i:011d}"  # every first digit, some several times
        run = client.create_run(grid_run.experiment_id, tags={"mlpgrid_role": "trial", "trial_id": trial_id})
        client.log_batch(run.info.run_id, metrics=[Metric("epoch", float(i), 0, 1)])
        made.add(trial_id)
    read = reader.trial_runs(grid_run)
    assert set(read) == made
    assert sorted(int(r.metrics["epoch"]) for r in read.values()) == list(range(40))


def test_a_trials_numbers_are_metrics_mlflow_filters_and_plots_by(tmp_path, write_grid):
    """MLflow's UI draws and filters numbers, not params or tags (strings): P, N, T, C, FLOP(f)
    and every numeric setting are metrics too, found by a range query; the run is named as
    people read the trial."""
    grid = spec.load(write_grid(GRID.format(name="numbers") + "  lr: [1.0e-3, 3.0e-3]\n"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid_run = writer.open_grid(grid, uri, StorageLayout(tmp_path / "store"))
    for trial in grid.trials:
        writer.TrialRun.open(grid_run, trial, name=grid.labels[trial.id])
    big = grid.trials[-1]
    writer.TrialRun.open(grid_run, big, tags={"trained_compute": "123.0"})  # reopened: numbers logged once
    client = MlflowClient(uri)
    found = client.search_runs([grid_run.experiment_id], "metrics.examples > 1500 and metrics.peak_lr < 2e-3")
    expected = {t.id for t in grid.trials if t.config.num_examples > 1500 and t.config.lr < 2e-3}
    assert {r.data.tags["trial_id"] for r in found} == expected and len(expected) == 8
    run = client.get_run(writer.trial_run(grid_run, big.id).info.run_id)
    numbers = run.data.metrics
    assert numbers["compute"] == pytest.approx(big.compute) and numbers["params"] == big.params
    assert (numbers["epochs"], numbers["forward_flops"], numbers["batch_size"]) == (2, big.forward_flops, 256)
    assert "trained_compute" not in numbers and len(client.get_metric_history(run.info.run_id, "compute")) == 1
    assert run.info.run_name == grid.labels[big.id] == "B-1/Wi-32 N=4k T=2 lr=0.003"


def test_labels_name_every_setting_that_varies_and_no_two_trials_alike(write_grid):
    sweep = spec.load(
        write_grid("base: {model: B-1/Wi-16, epochs: 1}\ngrid:\n  lr: [1.0e-3, 3.0e-3]\n  seed: [0, 1]\n")
    )
    assert sorted(sweep.labels.values()) == [f"B-1/Wi-16 N=60k T=1 lr={lr} seed={s}" for lr in ("0.001", "0.003")
                                             for s in (0, 1)]  # fmt: skip
    # An ablation grid varies many settings, one at a time: each label shows its departure.
    ablation = spec.load(write_grid(
        "base: {model: B-1/Wi-16, examples: 1000, epochs: 1}\nzip:\n  lr: [0.001, 0.01, 0.001, 0.001, 0.001]\n"
        "  weight_decay: [0, 0, 0.1, 0, 0]\n  mixup: [0, 0, 0, 0.5, 0]\n  flip: [true, true, true, true, false]\n"
    ))  # fmt: skip
    departures = ["", " lr=0.01", " weight_decay=0.1", " mixup=0.5", " flip=False"]
    assert sorted(ablation.labels.values()) == sorted(f"B-1/Wi-16 N=1k T=1{d}" for d in departures)
    close = spec.load(write_grid("base: {model: B-1/Wi-16, epochs: 1}\ngrid:\n  examples: [10000, 10001]\n"))
    assert sorted(close.labels.values()) == ["B-1/Wi-16 N=10000 T=1", "B-1/Wi-16 N=10001 T=1"], "N exact"


def test_status_says_when_no_store_or_no_runs_are_there_and_names_scaled_runs(tmp_path, write_grid):
    from click.testing import CliRunner

    from mlpgrid.cli import cli

    path = write_grid(GRID.format(name="said"))
    missing = CliRunner().invoke(cli, ["status", str(path), "--storage", str(tmp_path / "typo")])
    assert missing.exit_code == 1 and f"no MLflow store at {tmp_path / 'typo' / 'mlflow.db'}" in missing.output
    assert not (tmp_path / "typo").exists(), "asking creates nothing"
    storage = StorageLayout(tmp_path / "store")
    writer.open_grid(spec.reduce(spec.load(path), 0.5), reader.tracking_uri(storage), storage)
    shown = CliRunner().invoke(cli, ["status", str(path), "--storage", str(storage.root)])
    assert shown.exit_code == 0 and "said has no runs in" in shown.output, shown.output
    assert "Runs of it scaled: said-scale0.5 (pass the same --scale)" in shown.output
