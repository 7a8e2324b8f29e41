"""Damaged checkpoints and a full disk: detected, said so, nothing finished lost."""

import subprocess

import pytest
import torch

from conftest import without_timing
from mlpgrid.data import Datasets
from mlpgrid.grid.layout import TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.training.checkpoint import CheckpointDir, CheckpointError
from mlpgrid.training.loop import run_trial

CFG = TrialConfig(model="B-1/Wi-32", examples=1000, epochs=3, batch_size=100, optimizer="adamw", lr=1e-3)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, still a zip archive to a casual reader
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte])
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_one(tmp_path, fashion_mnist, damage):
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    reference = run_trial(CFG, TrialLayout(tmp_path / "reference"), datasets=datasets)
    layout = TrialLayout(tmp_path / "trial")
    checkpoints = CheckpointDir(layout.checkpoints)
    run_trial(CFG, layout, datasets=datasets)
    *_, earlier, last = checkpoints.positions()  # an earlier epoch end: (2, 0), or (1, 0) if 2's was skipped
    assert last == (3, 0)
    damage(checkpoints.file(*last))

    resumed = run_trial(CFG, layout, datasets=datasets)
    (problem,) = resumed.checkpoint_problems
    assert str(checkpoints.file(*last)) in problem and ("SHA-256" in problem or "unreadable" in problem)
    assert resumed.resumed_from == [list(earlier)], "continued from the last good checkpoint"
    ended_as_unbroken = without_timing(resumed.history) == without_timing(reference.history)
    assert ended_as_unbroken, "and ended where an unbroken run ends"
    assert checkpoints.latest()["epoch"] == 3 and checkpoints.problems == []


def test_a_full_disk_fails_the_trial_clearly_and_keeps_earlier_checkpoints(tmp_path, fashion_mnist):
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    probe = CheckpointDir(TrialLayout(tmp_path / "probe").checkpoints)
    run_trial(TrialConfig(**{**CFG.__dict__, "epochs": 2}), TrialLayout(tmp_path / "probe"), datasets=datasets)
    size = probe.file(1, 0).stat().st_size  # with optimizer state (the final one, (2, 0), has none)
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for two checkpoints and their checksums, not for a third being written.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 2.6) // 4096 * 4096}", "tmpfs",
                              str(disk)], capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        layout = TrialLayout(disk / "trial")
        checkpoints = CheckpointDir(layout.checkpoints)
        with pytest.raises(CheckpointError, match="no space left on the device. Earlier checkpoints .* are intact"):
            run_trial(TrialConfig(**{**CFG.__dict__, "epochs": 6}), layout, datasets=datasets)
        kept = checkpoints.positions()
        assert kept, "the checkpoints written before the disk filled are still there"
        assert all(checkpoints._load(*p)["epoch"] == p[0] for p in kept)
        assert not list(checkpoints.path.glob("*.tmp")), "no half-written file left behind"
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # the failed write's traceback may hold a file


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    checkpoints = CheckpointDir(tmp_path)
    checkpoints.save({"epoch": 1, "w": torch.ones(2)}, 1, 0)
    checkpoints.file(1, 0).with_suffix(".sha256").unlink()  # written before checksums were kept
    assert checkpoints.latest()["epoch"] == 1 and checkpoints.problems == []


def test_a_finished_trial_keeps_only_its_final_weights(tmp_path, fashion_mnist):
    """The loop writes a trial's last checkpoint without optimizer state (nothing is left to
    train); once the trial is recorded finished, every earlier checkpoint goes."""
    layout = TrialLayout(tmp_path / "trial")
    result = run_trial(TrialConfig(**{**CFG.__dict__, "epochs": 2}), layout,
                       datasets=Datasets({"fashion-mnist": fashion_mnist}))  # fmt: skip
    checkpoints = CheckpointDir(layout.checkpoints)
    assert checkpoints.positions() == [(1, 0), (2, 0)]
    assert checkpoints._load(1, 0)["optimizer"] is not None, "a checkpoint with epochs left can train on"
    weights = checkpoints._load(2, 0)

    checkpoints.keep_final()
    assert checkpoints.positions() == [(2, 0)] and checkpoints.problems == []
    final = checkpoints.latest()
    assert final["optimizer"] is None and final["epoch"] == 2 and result.epochs == 2
    assert all(torch.equal(final["model"][k], v) for k, v in weights["model"].items())
    checkpoints.keep_final()  # again, as a re-run that finds it finished: nothing changes
    assert checkpoints.positions() == [(2, 0)] and checkpoints.latest()["optimizer"] is None


def test_a_weights_only_checkpoint_with_epochs_left_is_refused(tmp_path, fashion_mnist):
    """A finished trial's final weights copied into a longer trial's folder: it cannot train on
    from them (no optimizer state), and says so rather than start the optimizer afresh."""
    datasets = Datasets({"fashion-mnist": fashion_mnist})
    layout = TrialLayout(tmp_path / "trial")
    run_trial(TrialConfig(**{**CFG.__dict__, "epochs": 1}), layout, datasets=datasets)
    checkpoints = CheckpointDir(layout.checkpoints)
    state = checkpoints.latest()
    checkpoints.file(1, 0).with_suffix(".sha256").unlink()
    torch.save({**state, "config": {**state["config"], "epochs": 3}, "optimizer": None}, checkpoints.file(1, 0))
    with pytest.raises(ValueError, match="weights only .* at epoch 1 of 3; move it away"):
        run_trial(CFG, layout, datasets=datasets)
