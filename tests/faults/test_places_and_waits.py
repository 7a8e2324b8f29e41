"""A store moved or copied keeps its records in itself; every wait for something outside has a bound;
`data prepare` and `data ls` answer for damaged, busy or full places in a line, not a traceback."""

import os
import shutil
import sqlite3
import subprocess
import sys
import time

from conftest import REPO, mlpgrid_command
from mlpgrid.grid import spec
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader, writer

GRID = """
base: {model: B-1/Wi-16, examples: 500, batch_size: 50, optimizer: adamw, lr: 1.0e-3}
grid:
  epochs: [1, 2]
"""


def artifact_places(storage):
    with sqlite3.connect(storage / "mlflow.db") as db:
        runs = [uri for (uri,) in db.execute("SELECT artifact_uri FROM runs")]
        experiments = [
            loc for (loc,) in db.execute("SELECT artifact_location FROM experiments WHERE experiment_id > 0")
        ]
    return runs + experiments


def test_a_moved_or_copied_store_records_into_itself(tmp_path, write_grid, fashion_mnist):
    path, first = write_grid(GRID), tmp_path / "first"
    run = ["run", str(path), "--in-process", "--only", "epochs=1"]
    assert (
        subprocess.run(mlpgrid_command(*run, "--storage", str(first)), capture_output=True, timeout=300).returncode == 0
    )
    moved = tmp_path / "moved"
    first.rename(moved)
    done = subprocess.run(mlpgrid_command("run", str(path), "--in-process", "--storage", str(moved)),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not first.exists(), "nothing is written to where the store was"
    places = artifact_places(moved)
    assert len(places) == 4 and all(p.startswith((moved / "mlartifacts").as_uri()) for p in places), places
    pictures = list((moved / "mlartifacts").rglob("first_layer*.png"))
    assert len(pictures) == 2, "both trials' figures are in the moved store"

    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    grid = spec.load(path)
    writer.open_grid(grid, reader.tracking_uri(StorageLayout(copy)), StorageLayout(copy))
    assert all(p.startswith((copy / "mlartifacts").as_uri()) for p in artifact_places(copy))
    assert all(p.startswith((moved / "mlartifacts").as_uri()) for p in artifact_places(moved)), (
        "the original is as it was"
    )


def refused_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_a_tracking_server_or_ray_cluster_that_does_not_answer_is_an_error_within_its_bound(
    tmp_path, write_grid, fashion_mnist
):
    path, port = write_grid(GRID), refused_port()
    cases = {
        "tracking URI": ["--in-process", "--tracking-uri", f"http://alice:pw@127.0.0.1:{port}"],
        "Ray cluster": ["--address", f"127.0.0.1:{port}"],
    }
    for what, options in cases.items():
        started = time.monotonic()
        result = subprocess.run(mlpgrid_command("run", str(path), "--storage", str(tmp_path / "s"), *options),
                                capture_output=True, text=True, timeout=240)  # fmt: skip
        took = time.monotonic() - started
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"127.0.0.1:{port}" in result.stderr and "no answer in 20 s" in result.stderr, result.stderr
        assert "waiting for" in result.stderr, f"{what}: the wait says what it waits for"
        assert took < 120, f"{what}: {took:.0f} s"
        assert "pw" not in result.stderr.replace("alice:***", "")


def test_a_tracking_database_that_is_a_directory_is_refused_at_once(tmp_path, write_grid, fashion_mnist):
    path, storage = write_grid(GRID), tmp_path / "s"
    (storage / "mlflow.db").mkdir(parents=True)
    for command in (["run", str(path), "--in-process"], ["status", str(path)]):
        started = time.monotonic()
        result = subprocess.run(mlpgrid_command(*command, "--storage", str(storage)), capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"{storage / 'mlflow.db'}: a directory, not a regular file" in result.stderr
        assert time.monotonic() - started < 60


HOLD_LOCK = """
import sys, time
from mlpgrid.system import locks
with locks.claim(sys.argv[1]) as holder:
    assert holder is None
    print("held", flush=True)
    time.sleep(600)
"""


def test_data_prepare_refuses_while_another_writes_and_leaves_nothing_on_a_full_disk(tmp_path, fashion_mnist):
    out = tmp_path / "fm"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".preparing")], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        prepare = ["data", "prepare", "fm", "--source", str(fashion_mnist), "--resolution", "8", "--out", str(out)]
        busy = subprocess.run(mlpgrid_command(*prepare), capture_output=True, text=True, timeout=120)
        assert busy.returncode == 1 and "Traceback" not in busy.stderr, busy.stderr
        assert f"another `mlpgrid data prepare` is writing it (pid {other.pid} on" in busy.stderr
    finally:
        other.kill()
        other.wait()
    done = subprocess.run(mlpgrid_command(*prepare), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test_images.npy", "test_labels.npy",
                                                     "train_images.npy", "train_labels.npy"]  # fmt: skip


def test_data_ls_lists_the_good_datasets_and_names_the_damaged(tmp_path, fashion_mnist):
    home = tmp_path / "home"
    env = {**os.environ, "MLPGRID_DATA": str(home)}
    for name in ("half", "gone", "good"):
        made = subprocess.run(mlpgrid_command("data", "prepare", name, "--source", str(fashion_mnist), "--resolution",
                                              "8"), env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert made.returncode == 0, made.stderr
    manifest = home / "half" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    (home / "gone" / "test_labels.npy").unlink()
    for verify in ([], ["--verify"]):
        listed = subprocess.run(mlpgrid_command("data", "ls", *verify), env=env, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
        assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["gone", "good"], listed.stdout
        assert f"{manifest}: unreadable manifest" in listed.stderr
        assert f"{home / 'gone'}: missing test_labels.npy" in listed.stderr
        assert "2 problems in prepared datasets" in listed.stderr
