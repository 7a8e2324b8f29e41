"""A grid file edited between a run and its resume in a way that would leave ended trials
behind is refused, naming what changed; adding trials is not."""

import subprocess

from conftest import REPO, mlpgrid_command

GRID = """
base: {model: B-1/Wi-16, examples: 500, batch_size: 50, epochs: 1, optimizer: adamw, lr: 1.0e-3}
grid:
  seed: [0, 1]
"""


def mlpgrid(*args):
    return subprocess.run(mlpgrid_command(*args), cwd=REPO, capture_output=True, text=True, timeout=300)


def test_an_edit_that_would_change_ended_trials_is_refused(tmp_path, write_grid, fashion_mnist):
    path, storage = write_grid(GRID), tmp_path / "store"
    first = mlpgrid("run", str(path), "--in-process", "--storage", str(storage))
    assert first.returncode == 0, first.stderr

    write_grid(GRID.replace("lr: 1.0e-3", "lr: 3.0e-4"))
    refused = mlpgrid("run", str(path), "--in-process", "--storage", str(storage))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "changed since its trials ran: 2 ended trials are no longer in it" in refused.stderr
    assert "lr 0.001 -> 0.0003" in refused.stderr and "trials:" not in refused.stdout, "nothing ran"

    write_grid(GRID.replace("seed: [0, 1]", "seed: [0, 1, 2]"))  # a trial added: nothing left behind
    added = mlpgrid("run", str(path), "--in-process", "--storage", str(storage), "--only", "seed=2")
    assert added.returncode == 0, added.stderr
    assert "1 trials: 1 finished" in added.stdout

    write_grid(GRID.replace("lr: 1.0e-3", "lr: 3.0e-4"))
    allowed = mlpgrid("run", str(path), "--in-process", "--storage", str(storage), "--allow-changes")
    assert allowed.returncode == 0, allowed.stderr


def test_another_file_running_into_the_same_grid_is_not_an_edit(tmp_path, write_grid, fashion_mnist):
    # As `frontier --propose` writes: another file under the grid's name, none of its trials.
    path, storage = write_grid("name: shared\n" + GRID), tmp_path / "store"
    assert mlpgrid("run", str(path), "--in-process", "--storage", str(storage)).returncode == 0
    proposal = write_grid("name: shared\n" + GRID.replace("seed: [0, 1]", "seed: [5]"), name="next.yaml")
    result = mlpgrid("run", str(proposal), "--in-process", "--storage", str(storage))
    assert result.returncode == 0, result.stderr
