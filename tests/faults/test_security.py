"""A grid writes only under its storage directory, and tracking credentials never reach a log."""

import os
import subprocess

import numpy as np
from mlflow import MlflowClient

from conftest import mlpgrid_command
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader
from synthetic_law import Law, draw

SECRET = "pa55-9f8e7d6c5b4a"
GRID = """
base: {model: B-1/Wi-16, examples: 500, batch_size: 50, epochs: 1, optimizer: adamw, lr: 1.0e-3}
grid:
  seed: [0, 1]
"""


def files_under(root):
    return {p for p in root.rglob("*") if p.is_file()}


def test_writes_stay_in_storage_and_credentials_stay_out_of_logs(tmp_path, write_grid, fashion_mnist):
    path, storage, cwd = write_grid(GRID), tmp_path / "store", tmp_path / "cwd"
    cwd.mkdir()
    before = files_under(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SECRET}
    result = subprocess.run(mlpgrid_command("run", str(path), "--in-process", "--storage", str(storage)), cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr

    written = files_under(tmp_path) - before
    assert written and all(storage in p.parents for p in written), sorted(map(str, written - files_under(storage)))

    grid_run = reader.find_grid(spec.load(path), reader.tracking_uri(StorageLayout(storage)))
    client = MlflowClient(grid_run.tracking_uri)
    for run in client.search_runs([grid_run.experiment_id]):
        recorded = {**run.data.params, **run.data.tags, **{k: str(v) for k, v in run.data.metrics.items()}}
        assert not any(SECRET in f"{k}={v}" for k, v in recorded.items())
    assert not any(SECRET.encode() in p.read_bytes() for p in files_under(storage) if p.suffix != ".db")
    assert SECRET.encode() not in (storage / "mlflow.db").read_bytes()


class _Planted:
    """Unpickling this runs a shell command: what a planted cache file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_or_damaged_stage_cache_never_runs_and_is_rebuilt(tmp_path, fashion_mnist, monkeypatch):
    import torch

    from mlpgrid.data import Datasets
    from mlpgrid.grid.layout import TrialLayout
    from mlpgrid.grid.spec import TrialConfig
    from mlpgrid.training.loop import run_trial

    cfg = TrialConfig(model="B-1/Wi-16", epochs=1, examples=500, batch_size=100, probe_datasets=("fashion-mnist",),
                      probe_examples=500, probe_epochs=2)  # fmt: skip
    layout, datasets = TrialLayout(tmp_path / "trial"), lambda: Datasets({"fashion-mnist": fashion_mnist})
    probed = run_trial(cfg, layout, datasets=datasets()).stages
    cache, results, marker = (
        layout.stages / "features-fashion-mnist.pt",
        layout.stages / "stages.json",
        tmp_path / "ran",
    )
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # as people set it to open old checkpoints
    for planted in ({"train_x": _Planted(marker)}, b"\x80\x04 not a torch file"):
        if isinstance(planted, bytes):
            cache.write_bytes(planted)
        else:
            torch.save(planted, cache)
        results.write_bytes(b"\xff{ damaged")  # so the stages run again
        assert run_trial(cfg, layout, datasets=datasets()).stages == probed, "rebuilt, the same features"
        assert not marker.exists(), "the planted file ran code"
        assert set(torch.load(cache, weights_only=True)) == {"train_x", "train_y", "test_x", "test_y"}


def test_links_planted_in_storage_or_the_plot_folder_are_never_written_through(tmp_path, write_grid, fashion_mnist):
    """A link at a trial's lock, at the store's lock or at a figure's name points outside: the run
    refuses it (saying which), a figure replaces it, and the file it points to is untouched; a
    dataset's NAME is never a path."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    path, storage = write_grid(GRID), tmp_path / "store"
    grid = spec.load(path)
    storage.mkdir()
    (storage / "mlflow.lock").symlink_to(precious)
    refused = subprocess.run(mlpgrid_command("run", str(path), "--in-process", "--storage", str(storage)),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 1 and "mlflow.lock is a symbolic link" in refused.stderr, refused.stderr
    (storage / "mlflow.lock").unlink()
    lock = StorageLayout(storage).grid(grid.name).trial(grid.trials[0].id).lock
    lock.parent.mkdir(parents=True)
    lock.symlink_to(precious)
    ran = subprocess.run(mlpgrid_command("run", str(path), "--in-process", "--storage", str(storage), "--group", "off"),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ran.returncode == 1 and f"{lock} is a symbolic link" in ran.stdout + ran.stderr, ran.stdout + ran.stderr
    assert "1 finished" in ran.stdout, "the other trial trains"

    plots, table = tmp_path / "plots", tmp_path / "trials.csv"
    plots.mkdir()
    (plots / "error_vs_compute.png").symlink_to(precious)
    points = draw(Law(), np.random.default_rng(0))
    table.write_text("compute,error,params,examples\n" + "".join(f"{p.compute},{p.error},{p.params},{p.examples}\n"
                                                                 for p in points))  # fmt: skip
    drawn = subprocess.run(mlpgrid_command("frontier", "--from-csv", str(table), "--plot-dir", str(plots)),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    figure = plots / "error_vs_compute.png"
    assert drawn.returncode == 0, drawn.stderr
    assert not figure.is_symlink() and figure.read_bytes()[:4] == b"\x89PNG", "the link replaced by the figure"
    assert f"plot: {figure} (replaced the earlier one)" in drawn.stdout
    assert precious.read_text() == "keep me"
    for name in ("../outside", str(tmp_path / "abs")):
        prepared = subprocess.run(mlpgrid_command("data", "prepare", name, "--source", str(tmp_path)),
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
        assert prepared.returncode == 2 and "not a path; --out says where it goes" in prepared.stderr
    assert not (tmp_path / "abs").exists()


def test_a_password_in_the_tracking_uri_is_sent_never_shown(tmp_path, write_grid, mlflow_server_process):
    """http://user:password@host: `status` reaches the live server with it, and no message about a
    server it cannot reach shows the password."""
    from mlflow_server import free_port

    path = write_grid(GRID)
    live = mlflow_server_process.url.replace("http://", f"http://alice:{SECRET}@")
    found = subprocess.run(mlpgrid_command("status", str(path), "--tracking-uri", live), capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert found.returncode == 0 and "2 trials: 2 pending" in found.stdout, found.stderr
    assert SECRET not in found.stdout + found.stderr and "alice:***@" in found.stderr
    refused = f"http://alice:{SECRET}@127.0.0.1:{free_port()}"
    for command in (["status", str(path)], ["frontier", str(path)]):
        out = subprocess.run(mlpgrid_command(*command, "--tracking-uri", refused), capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert out.returncode == 1 and "alice:***@127.0.0.1" in out.stderr, out.stderr
        assert SECRET not in out.stdout + out.stderr
