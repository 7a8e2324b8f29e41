import io
import json
import math
import sys

import pytest

from conftest import REPO
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
    assert lines[0] == f"[0m00s] start    B-1/Wi-16 N=1k T=2 [{short.id[:8]}]", "no counts on every line"
    assert "test_error 0.5000" in lines[1] and "(started in 3.0 s)" in lines[1]
    assert lines[2].endswith(f"finished B-1/Wi-16 N=1k T=2 [{short.id[:8]}]")
    assert lines[3].startswith("[0m00s] done 2/3 | running 0 | pending 1"), "the counts as a trial ends"
    assert "\r" not in out.getvalue()


def test_eta_is_the_images_left_at_each_models_measured_pace(write_grid):
    short, long = two_trials(write_grid)
    other = spec.load(write_grid("base: {model: B-1/Wi-32, examples: 1000, epochs: 2}\n", "other.yaml")).trials[0]
    now = [0.0]
    progress = Progress([short, long, other], out=io.StringIO(), clock=lambda: now[0])
    progress.start(short)
    assert progress.eta() is None, "nothing measured yet"
    now[0] = 2.0
    progress.epoch(short, metrics(1))  # 1,000 images in 2 s from its start: 2 ms an image
    # short: 1,000 images left; long (its model): 4,000; other: 2,000 at a pace scaled from B-1/Wi-16's.
    scaled = 0.002 * math.sqrt(other.forward_flops / short.forward_flops)
    assert progress.eta() == pytest.approx(1000 * 0.002 + 4000 * 0.002 + 2000 * scaled)


def test_a_resumed_trial_counts_only_the_epochs_it_trains_now(write_grid):
    short, long = two_trials(write_grid)
    now = [0.0]
    progress = Progress([short, long], out=io.StringIO(), clock=lambda: now[0])
    progress.start(long)
    now[0] = 2.0
    progress.epoch(long, metrics(3))  # resumed after epoch 2: it trained 1,000 images in 2 s, not 3,000
    assert progress.eta() == pytest.approx((1000 + 2000) * 0.002)


def test_a_terminal_gets_a_status_line_redrawn_in_place(write_grid):
    short, _ = two_trials(write_grid)
    out = Terminal()
    progress = Progress([short], out=out)
    progress.start(short)
    progress.end(short, "failed")
    progress.close()
    assert out.getvalue().startswith("\r\x1b[K") and out.getvalue().endswith("\r\x1b[K")
    assert "\x1b[31mfailed  \x1b[0m" in out.getvalue(), "its end in colour"


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


def test_the_eta_of_a_recorded_run_is_right_within_2x_after_its_first_epochs():
    """The quick start run in one process (benchmarks/eta.py recorded each trial's start, epochs and
    end, 204 s on 2 cores), replayed: after the first three epochs, and until the last seconds the
    run spends closing, the ETA shown is within 2x of the time the run really had left."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from eta import replay

    record = json.loads((REPO / "tests" / "data" / "quickstart_run.json").read_text())
    shown = replay(spec.load(REPO / record["grid"]), record["events"])
    epochs = [i for i, event in enumerate(record["events"]) if event[1] == "epoch"]
    checked = [(eta, left) for eta, left in (s[1:] for s in shown[epochs[2] :]) if left >= 15]
    assert len(checked) > 50
    ratios = [eta / left for eta, left in checked]
    assert min(ratios) >= 0.5 and max(ratios) <= 2.0, (min(ratios), max(ratios))
