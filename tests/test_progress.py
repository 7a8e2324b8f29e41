import io

import pytest

from mlpgrid.execution.progress import Progress
from mlpgrid.grid import spec


class Terminal(io.StringIO):
    def isatty(self):
        return True


def two_trials(write_grid):
    return spec.load(write_grid("base: {model: B-1/Wi-16, examples: 1000}\ngrid:\n  epochs: [2, 4]\n")).trials


def metrics(epoch, **extra):
    return {"epoch": epoch, "train_loss": 1.0, "test_error": 0.5, "images_per_s": 1000.0, "epoch_seconds": 2.0, **extra}


def test_plain_lines_with_counts_when_not_a_terminal(write_grid):
    short, long = two_trials(write_grid)
    out = io.StringIO()
    progress = Progress([short, long], already_done=1, out=out)
    progress.start(short)
    progress.epoch(short, metrics(1, startup_seconds=3.0))
    progress.end(short, "finished")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[done 1/3 | running 1 | pending 1 |") and lines[0].endswith(
        f"start    B-1/Wi-16 N=1k T=2 [{short.id[:8]}]"
    )
    assert "test_error 0.5000" in lines[1] and "(started in 3.0 s)" in lines[1]
    assert lines[2].startswith("[done 2/3 | running 0 | pending 1") and "finished" in lines[2]
    assert "\r" not in out.getvalue()


def test_eta_is_startup_plus_compute_at_the_measured_rate(write_grid):
    short, long = two_trials(write_grid)
    progress = Progress([short, long], out=io.StringIO())
    assert progress.eta() is None, "nothing measured yet"
    progress.start(short)
    progress.epoch(short, metrics(1, startup_seconds=10.0))
    rate = (short.compute / 2) / 2.0  # half the trial's compute in 2 s
    left = short.compute / 2 + long.compute
    assert progress.eta() == pytest.approx(left / rate + 1 * 10.0)


def test_a_terminal_gets_a_status_line_redrawn_in_place(write_grid):
    short, _ = two_trials(write_grid)
    out = Terminal()
    progress = Progress([short], out=out)
    progress.start(short)
    progress.close()
    assert out.getvalue().startswith("\r\x1b[K") and out.getvalue().endswith("\r\x1b[K")


def test_events_cross_tune_as_dicts_and_come_back_whole():
    """What a worker reports through Tune comes back as the event it was, whatever Tune adds."""
    from mlpgrid.execution.events import EpochEnded, GroupEnded, TrialEnded, from_result

    tune_adds = {"trial_id": "tune_0001", "time_this_iter_s": 0.5, "training_iteration": 3, "done": False}
    epoch = EpochEnded(
        "3fa2c1d0e9b8",
        {
            "epoch": 2,
            "train_loss": 0.5,
            "test_error": 0.25,
            "resident_share": 1.0,
            "images_per_s": 10.0,
            "epoch_seconds": 1.0,
            "startup_seconds": 3.0,
        },
    )
    for event in (epoch, TrialEnded("3fa2c1d0e9b8", "diverged"), GroupEnded({"3fa2c1d0e9b8": "finished"})):
        assert from_result(event.to_result() | tune_adds) == event
    assert from_result(tune_adds) is None, "Tune's own results are none of ours"
