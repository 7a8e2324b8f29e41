"""Data-parallel trials on the CPU: shards that make up the batch, two gloo workers that train
what one worker trains, and a resume mid-epoch that continues exactly. (Through Ray Train, with
a worker killed: tests/faults/test_data_parallel.py.)"""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import without_timing
from mlpgrid import data
from mlpgrid.data import Datasets
from mlpgrid.data.loader import Augmentation, DeviceLoader, Shard, StreamingLoader
from mlpgrid.grid.layout import TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.training.checkpoint import CheckpointDir
from mlpgrid.training.loop import Hooks, run_group, run_trial
from mlpgrid.training.parallel import Workers
from mlpgrid.training.setup import TrialOptions

CPU = torch.device("cpu")
# The recipe's randomness in every form (crops, flips, MixUp, label smoothing, clipping), and an
# epoch's last batch of 50 rows besides full ones of 100.
CFG = TrialConfig(model="B-1/Wi-32", examples=1050, epochs=2, batch_size=100, optimizer="adamw", lr=1e-3, flip=True,
                  crop_padding=2, mixup=0.2, label_smoothing=0.1, clip_grad=1.0)  # fmt: skip
OPTIONS = TrialOptions(checkpoint_every_steps=4)
# Two workers sum their gradients and losses in another order than one: float32 rounding, no more.
RTOL = 1e-5


def _loaders(tmp_path: Path, shard: Shard) -> tuple[DeviceLoader, StreamingLoader]:
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (203, 3, 8, 8), dtype=np.uint8), np.arange(203) % 10
    np.save(tmp_path / "images.npy", images)
    mean, std = data.channel_stats(images)
    kw = dict(mean=mean, std=std, device=CPU, seed=3, shard=shard,
              augmentation=Augmentation(flip=True, crop_padding=2, mixup=0.5))  # fmt: skip
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    return DeviceLoader(images, labels, 32, **kw), StreamingLoader(mapped, labels, 32, resident=60, **kw)


@pytest.mark.parametrize("workers", [2, 3, 40])
def test_the_workers_shards_make_up_each_batch(tmp_path, workers):
    """Rows, crops, flips and MixUp partners: the shards of a batch, side by side, are the batch
    (an epoch's last batch of 11 rows among 40 workers leaves most shards empty)."""
    whole, _ = _loaders(tmp_path, Shard())
    shards = [_loaders(tmp_path, Shard(rank, workers)) for rank in range(workers)]
    for kind in (0, 1):  # the device loader, the streaming loader
        per_worker = [list(loaders[kind].epoch(2, start_step=1)) for loaders in shards]
        for step, batch in enumerate(whole.epoch(2, start_step=1)):
            parts = [batches[step] for batches in per_worker]
            assert {p.whole for p in parts} == {len(batch.labels)}
            for field in ("images", "labels", "mixed_labels"):
                assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(batch, field)), field


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, count: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=count)
    torch.set_num_threads(1)
    seen: list[dict] = []
    ends: list = []
    try:
        run_group([CFG], [TrialLayout(Path(root))], OPTIONS, datasets=Datasets(), device=CPU, fuse=False,
                  hooks=[Hooks(epoch=seen.append)], on_end=lambda i, outcome: ends.append(outcome),
                  workers=Workers(rank, count))  # fmt: skip
    finally:
        dist.destroy_process_group()
    torch.save({"epochs": seen, "ends": [type(e).__name__ for e in ends]}, f"{out}.{rank}")


def _train_on_workers(count: int, root: Path) -> list[dict]:
    out = root.parent / f"{root.name}-record"
    mp.spawn(_worker, args=(count, _free_port(), str(root), str(out)), nprocs=count)
    records = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(count)]
    assert records[0]["ends"] == ["TrialResult"] and all(r["ends"] == [] for r in records[1:]), "the lead ends it"
    assert all(not r["epochs"] for r in records[1:]), "the lead alone hears epochs"
    return records[0]["epochs"]


def _final_weights(root: Path) -> dict:
    checkpoints = CheckpointDir(TrialLayout(root).checkpoints)
    return torch.load(checkpoints.file(CFG.epochs, 0), weights_only=True)["model"]


@pytest.fixture
def one_thread():
    """One torch thread here, as each worker has (CPU results depend on the thread count); the
    count this process had afterwards, for the tests that run in it next."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_workers_train_what_one_trains_and_resume_exactly_mid_epoch(tmp_path, fashion_mnist, monkeypatch,
                                                                         one_thread):  # fmt: skip
    monkeypatch.setenv("MLPGRID_FASHION_MNIST", str(fashion_mnist))
    alone = run_trial(CFG, TrialLayout(tmp_path / "alone"), OPTIONS)
    two = _train_on_workers(2, tmp_path / "two")
    assert [m["epoch"] for m in two] == [1, 2]
    for a, b in zip(without_timing(alone.history), without_timing(two), strict=True):
        for key in ("train_loss", "test_loss", "test_error", "lr"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), key
    # AdamW divides each gradient by its own running scale: a near-zero one's rounding moves its
    # weight by up to a step of the learning rate's order, 1e-3 x 1e-2 here.
    for name, weights in _final_weights(tmp_path / "alone").items():
        torch.testing.assert_close(_final_weights(tmp_path / "two")[name], weights, rtol=1e-3, atol=5e-5)

    # Resumed from the lead's checkpoint at step 8 of epoch 2 (the final one removed), the two
    # workers end with exactly the weights of their uninterrupted run.
    checkpoints = CheckpointDir(TrialLayout(tmp_path / "two").checkpoints)
    uninterrupted = _final_weights(tmp_path / "two")
    assert checkpoints.positions()[-2:] == [(1, 8), (2, 0)]
    checkpoints.file(2, 0).unlink()
    resumed = _train_on_workers(2, tmp_path / "two")
    assert [m["epoch"] for m in resumed] == [2], "the epoch under way, from its step 8"
    assert resumed[0]["train_loss"] == two[1]["train_loss"], "the epoch's loss counts the steps before the resume"
    for name, weights in _final_weights(tmp_path / "two").items():
        assert torch.equal(weights, uninterrupted[name]), name
