"""What makes trials fast on a GPU, checked on the CPU: the compiled model and Lion, the
background checkpoint writer, the default packing of trials on GPUs and their order."""

import threading

import pytest
import torch
from lion_pytorch import Lion

from mlpgrid import policy
from mlpgrid.data import Datasets
from mlpgrid.execution.groups import Group
from mlpgrid.execution.placement import PlacementError, gpu_shares, launch_order, place
from mlpgrid.grid import spec
from mlpgrid.grid.layout import TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.training import checkpoint
from mlpgrid.training.checkpoint import BackgroundSaver, CheckpointDir
from mlpgrid.training.loop import run_trial
from mlpgrid.training.optim import CompiledLion
from mlpgrid.training.setup import TrialOptions


def test_compiled_lion_is_lion_pytorch_step_for_step():
    torch.manual_seed(0)
    reference = [torch.randn(48, 24, requires_grad=True), torch.randn(24, requires_grad=True)]
    ours = [p.detach().clone().requires_grad_() for p in reference]
    a, b = Lion(reference, lr=1e-2, weight_decay=0.1), CompiledLion(ours, lr=1e-2, weight_decay=0.1)
    b.compile_now()
    assert all(torch.equal(p, q) for p, q in zip(reference, ours, strict=True)), "compiling changes nothing"
    for step in range(4):
        for p, q in zip(reference, ours, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for group in a.param_groups + b.param_groups:
            group["lr"] = 1e-2 / (step + 1)  # a new rate every step, as the schedule does
        a.step()
        b.step()
        assert all(torch.equal(p, q) for p, q in zip(reference, ours, strict=True)), step
    a.load_state_dict(b.state_dict())  # checkpoints move between the two
    assert torch.equal(a.state[reference[0]]["exp_avg"], b.state[ours[0]]["exp_avg"])


def test_compiled_trial_reports_compile_time_and_matches_eager(tmp_path, fashion_mnist):
    # 1050 examples at batch 100: the last batch of each epoch (50) goes through the eager model.
    cfg = TrialConfig(model="B-1/Wi-32", examples=1050, epochs=2, batch_size=100, optimizer="adamw", lr=1e-3)
    roots = {"fashion-mnist": fashion_mnist}
    datasets = Datasets(roots)
    compiled = run_trial(cfg, TrialLayout(tmp_path / "compiled"), TrialOptions(compile=True), datasets=datasets)
    eager = run_trial(cfg, TrialLayout(tmp_path / "eager"), TrialOptions(compile=False), datasets=datasets)
    assert compiled.compiled and not eager.compiled
    first, second = compiled.history
    assert first["compile_seconds"] > 0 and "compile_seconds" not in second
    assert "compile_seconds" not in eager.history[0] and first["tflops"] > 0
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-3)


def test_background_saver_skips_while_writing_and_waits_for_the_last(tmp_path):
    checkpoints = CheckpointDir(tmp_path)
    release = threading.Event()
    save = checkpoints.save
    checkpoints.save = lambda *args: (release.wait(10), save(*args))[1]  # a slow disk
    saver = BackgroundSaver(checkpoints)
    weights = torch.zeros(3)
    assert saver.save({"w": weights}, 1, 0)
    weights += 1  # training goes on changing the tensors
    assert not saver.save({"w": weights}, 2, 0), "skipped: the first is still being written"
    release.set()
    assert saver.save({"w": weights}, 3, 0, required=True)
    saver.wait()
    assert checkpoints.positions() == [(1, 0), (3, 0)]
    assert torch.equal(torch.load(checkpoints.file(1, 0))["w"], torch.zeros(3)), "a copy taken at save time"


def test_background_saver_skips_until_its_copies_cost_at_most_their_share(tmp_path, monkeypatch):
    now = [100.0]  # the clock the saver reads (time.monotonic), moved by the test and by copies
    copy = checkpoint._host_copy

    def slow_copy(state):  # a copy to host memory that takes half a second (it recurses into the dict)
        now[0] += 0.5 if isinstance(state, dict) else 0.0
        return copy(state)

    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(checkpoint, "_host_copy", slow_copy)
    monkeypatch.setattr(checkpoint.policy, "CHECKPOINT_COPY_SHARE", 0.01)
    checkpoints = CheckpointDir(tmp_path)
    saver = BackgroundSaver(checkpoints)
    assert saver.save({"w": torch.zeros(1)}, 1, 0), "the first is taken, copied by 100.5 s"
    saver.wait()
    now[0] = 150.4
    assert not saver.save({"w": torch.zeros(1)}, 2, 0), "under 50 s of training since a copy of 0.5 s"
    assert saver.save({"w": torch.zeros(1)}, 3, 0, required=True), "a required one is taken whenever"
    saver.wait()  # copied by 150.9 s
    now[0] = 201.0
    assert saver.save({"w": torch.zeros(1)}, 4, 0), "over 50 s after: due"
    saver.wait()
    assert checkpoints.positions() == [(3, 0), (4, 0)], "the newest two kept, 2 never written"


def test_background_saver_raises_a_failed_write(tmp_path):
    (tmp_path / "file").write_text("")
    saver = BackgroundSaver(CheckpointDir(tmp_path / "file" / "checkpoints"))  # cannot be a directory
    saver.save({"w": torch.zeros(1)}, 1, 0)
    with pytest.raises(OSError):
        saver.wait()


EIGHT_TRIALS = (
    "base: {dataset: fashion-mnist, batch_size: 8192, examples: 8192}\n"
    "grid:\n  model: [B-2/Wi-64, B-12/Wi-1024]\n  epochs: [1, 4, 2, 3]\n"
)


def gpu_share(group: Group) -> float:
    return policy.gpu_share([t.step_flops for t in group.trials])


def test_small_trials_share_a_gpu_more_and_shares_grow_until_the_trials_cover_every_gpu(write_grid):
    trials = [Group((t,)) for t in spec.load(write_grid(EIGHT_TRIALS)).trials]
    by_size = {t.id: gpu_share(t) for t in trials}
    assert {t.trials[0].config.model: gpu_share(t) for t in trials} == {"B-2/Wi-64": 0.125, "B-12/Wi-1024": 0.5}
    assert sorted(by_size.values()) == [0.125] * 4 + [0.5] * 4
    assert gpu_shares(trials, 1) == by_size  # 8 trials per GPU
    assert sorted(gpu_shares(trials, 2).values()) == [0.25] * 4 + [0.5] * 4  # 4 per GPU
    assert set(gpu_shares(trials, 3).values()) == {0.5}  # 2 per GPU
    assert set(gpu_shares(trials, 4).values()) == {0.5}
    assert set(gpu_shares(trials, 8).values()) == set(gpu_shares(trials, 16).values()) == {1.0}
    for gpus in (1, 2, 3, 4, 5, 8, 16):
        assert sum(gpu_shares(trials, gpus).values()) >= min(gpus, len(trials)) - 1e-9
    assert set(gpu_shares(trials, 8, chosen=0.25).values()) == {0.25}  # the user's choice stands
    small = [t.trials[0] for t in trials if t.trials[0].config.model == "B-2/Wi-64"]
    assert gpu_share(Group(tuple(small))) == 0.5, "a group takes the GPU time its members had alone"
    compiled = gpu_shares(trials, 1, compile=True)
    assert set(compiled.values()) == {1 / 3}, "compiled trials three to a GPU, however small their step"
    assert gpu_share(Group(tuple(t.trials[0] for t in trials))) == 1.0


def test_shares_cover_the_memory_a_trial_needs(write_grid):
    """Ray admits a worker to a GPU while its share is free: a share too small for a trial's
    memory would let it take its neighbours'. B-12/Wi-512 at batch 16384 over 10,450 classes
    steps in under 4 TFLOP (an eighth of a GPU by speed) but needs more than an eighth of 40 GB."""
    from mlpgrid.execution.placement import group_memory

    text = (
        "data: {big: {path: big, classes: 10450, train: 1000000, test: 10000, resolution: 64}}\n"
        "base: {dataset: big, model: B-12/Wi-512, batch_size: 16384, examples: 100000}\n"
        "grid: {epochs: [1, 2, 3, 4, 5, 6, 7, 8]}\n"
    )  # eight trials: an eighth of one GPU each by speed
    trials = [Group((t,)) for t in spec.load(write_grid(text)).trials]
    assert policy.gpu_share([trials[0].trials[0].step_flops]) == 0.125, "small by speed"
    assert set(gpu_shares(trials, 1).values()) == {0.125}, "GPU memory unknown: by speed"
    assert set(gpu_shares(trials, 1, gpu_bytes=80e9).values()) == {0.125}, "fits an eighth of 80 GB"
    assert set(gpu_shares(trials, 1, gpu_bytes=40e9).values()) == {0.25}, "not of 40 GB"
    assert policy.memory_cap(0.25, 40e9) * 40e9 >= group_memory(trials[0]), "its cap holds its estimate"


def test_the_grids_tail_trains_on_several_gpus_and_no_trial_asks_for_more_than_the_cluster(write_grid):
    """A trial whose compute on one GPU would outlast the rest of the grid on the others gets
    data-parallel workers (whole GPUs); asked for, every trial alone gets them; more than the
    cluster holds is refused before anything runs."""
    text = "base: {epochs: 10, examples: 60000}\ngrid: {model: [B-2/Wi-64, B-12/Wi-1024]}\n"
    small, large = [Group((t,)) for t in spec.load(write_grid(text)).trials]
    assert large.compute / (large.compute + small.compute) > 0.9
    on_8 = place([small, large], {"GPU": 8, "CPU": 64})
    assert on_8.ray_train == {large.id: 8} and on_8.workers[large.id] == {"GPU": 1.0, "CPU": 1.0}
    assert any(f"{large.id} trains on 8 data-parallel workers (Ray Train)" in note for note in on_8.notes)
    assert place([small, large], {"GPU": 1, "CPU": 16}).ray_train == {}, "one GPU: nothing to spread over"
    assert place([small, large], {"CPU": 4}).ray_train == {}, "no GPU: only when asked"
    asked = place([small, large, Group((small.trials[0], large.trials[0]))], {"CPU": 4}, workers=2, cpus_per_trial=2)
    assert asked.ray_train == {small.id: 2, large.id: 2}, "groups stay on one worker"
    assert asked.workers[small.id] == {"CPU": 2}
    every = place([small, large], {"GPU": 1, "CPU": 16}, ray_train=True)
    assert every.ray_train == {small.id: 1, large.id: 1}, "asked for, every trial through Ray Train, on its share"
    assert every.workers[small.id]["GPU"] < 1
    with pytest.raises(PlacementError, match=r"a trial on 3 data-parallel workers needs 6 CPU; the cluster has 4 CPU"):
        place([small], {"CPU": 4}, workers=3, cpus_per_trial=2)


def test_a_small_grid_gets_a_gpu_per_trial_from_ray(write_grid):
    """Ray places each trial's worker as Tune does (a placement group of its share): the
    eight trials of a grid on eight GPUs land on eight different GPUs."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    class Worker:
        def gpu(self) -> list:
            return ray.get_gpu_ids()

    shares = gpu_shares([Group((t,)) for t in spec.load(write_grid(EIGHT_TRIALS)).trials], 8)
    ray.init(address="local", num_cpus=1, num_gpus=8, include_dashboard=False, logging_level="ERROR")
    try:
        groups = [placement_group([{"GPU": share}]) for share in shares.values()]
        ray.get([g.ready() for g in groups], timeout=60)
        workers = [
            Worker.options(num_gpus=share, scheduling_strategy=PlacementGroupSchedulingStrategy(g)).remote()
            for share, g in zip(shares.values(), groups, strict=True)
        ]
        placed = ray.get([w.gpu.remote() for w in workers], timeout=60)
        for g in groups:
            remove_placement_group(g)
    finally:
        ray.shutdown()
    assert sorted(int(ids[0]) for ids in placed) == list(range(8))


def test_the_largest_trials_start_first(write_grid):
    trials = spec.load(write_grid(EIGHT_TRIALS)).trials
    order = launch_order(trials)
    assert [t.compute for t in order] == sorted((t.compute for t in trials), reverse=True)
    assert (order[0].config.model, order[0].config.epochs) == ("B-12/Wi-1024", 4)
    assert (order[-1].config.model, order[-1].config.epochs) == ("B-2/Wi-64", 1)
