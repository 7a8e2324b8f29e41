import importlib
import sys

import numpy as np
import pytest
import torch

from conftest import write_idx
from mlpgrid import data
from mlpgrid.data import loader as loader_module
from mlpgrid.data.idx import idx_length, read_idx
from mlpgrid.data.loader import Augmentation, DeviceLoader, StreamingLoader, augment, device_bytes, make_loader
from mlpgrid.data.subset import proportional_order, proportional_subset

CPU = torch.device("cpu")


def small_fashion_layout(root, n_train=50, n_test=20, compress=True):
    """A tiny dataset in Fashion-MNIST's on-disk layout, written here."""
    rng = np.random.default_rng(0)
    root.mkdir(exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(root / name, array, compress=compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress=compress)
    np.testing.assert_array_equal(read_idx(path), array)
    assert idx_length(path) == 2, "read from the header alone"


def test_idx_refuses_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        read_idx(bad)
    short = write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8))
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match="idx header promises"):
        read_idx(short)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_layout_loads_from_any_directory(tmp_path, compress):
    arrays = small_fashion_layout(tmp_path / "fm", compress=compress)
    loaded = data.load("fashion-mnist", str(tmp_path / "fm"))
    assert loaded.train_images.shape == (50, 1, 28, 28) and loaded.test_images.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(loaded.train_images[:, 0], arrays["train-images-idx3-ubyte"])
    assert loaded.train_labels.dtype == np.int64


def test_missing_file_is_named(tmp_path):
    small_fashion_layout(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        data.load("fashion-mnist", str(tmp_path / "fm"))


def test_resize_to_64_rgb(tmp_path):
    small_fashion_layout(tmp_path / "fm")
    loaded = data.load("fashion-mnist", str(tmp_path / "fm"), resolution=64, channels=3)
    assert loaded.train_images.shape == (50, 3, 64, 64) and loaded.train_images.dtype == np.uint8
    np.testing.assert_array_equal(loaded.train_images[:, 0], loaded.train_images[:, 2])


def test_area_downsampling_averages():
    images = np.zeros((1, 1, 4, 4), np.uint8)
    images[0, 0, :2, :2] = 200
    np.testing.assert_array_equal(data.resize(images, 2, 1)[0, 0], [[200, 0], [0, 0]])


def test_real_fashion_mnist(fashion_mnist):
    loaded = data.load("fashion-mnist", str(fashion_mnist))
    info = data.info("fashion-mnist")
    assert len(loaded.train_labels) == info.train_size and len(loaded.test_labels) == info.test_size
    assert np.bincount(loaded.train_labels).tolist() == [6000] * 10


def test_subsets_are_class_proportional_and_nested():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    order = proportional_order(labels, seed=5)
    for n in (10, 37, 100, 555, 1000):
        counts = np.bincount(labels[order[:n]], minlength=4)
        expected = n * np.array([0.4, 0.3, 0.2, 0.1])
        assert np.all(np.abs(counts - expected) <= 1), (n, counts)
    small, large = proportional_subset(labels, 100, 5), proportional_subset(labels, 500, 5)
    assert set(small) <= set(large)
    assert not np.array_equal(proportional_subset(labels, 100, 6), small), "another seed, another subset"
    assert sorted(order) == list(range(1000))


def small_images(n=103):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8), np.arange(n) % 10


def device_loader(n=103, batch=16, **aug):
    images, labels = small_images(n)
    mean, std = data.channel_stats(images)
    return DeviceLoader(images, labels, batch, mean=mean, std=std, device=CPU, seed=7, augmentation=Augmentation(**aug))


def test_channel_stats_match_a_direct_computation():
    images, _ = small_images()
    mean, std = data.channel_stats(images)
    x = torch.from_numpy(images).double() / 255
    np.testing.assert_allclose(mean, x.mean(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(dim=(0, 2, 3)).numpy(), rtol=1e-9)


def test_a_constant_channel_normalises_to_zero_not_nan():
    """A dataset whose channel never changes (std 0) made every trial's loss NaN ("diverged")."""
    images, labels = small_images()
    images[:, 1] = 77
    mean, std = data.channel_stats(images)
    assert std[1] < 1e-6, "zero but for rounding"
    loader = DeviceLoader(images, labels, 16, mean=mean, std=std, device=CPU, augmentation=Augmentation(mixup=0.5))
    batch = next(iter(loader.epoch(0)))
    assert torch.isfinite(batch.images).all() and torch.equal(batch.images[:, 1], torch.zeros_like(batch.images[:, 1]))


def test_every_example_once_per_epoch_and_order_changes():
    loader = device_loader()
    assert len(loader) == 7
    labels0 = torch.cat([b.labels for b in loader.epoch(0)])
    assert len(labels0) == 103
    assert sorted(loader.order(0).tolist()) == list(range(103))
    assert not torch.equal(loader.order(0), loader.order(1))


def same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.mixed_labels, y.mixed_labels) and (x.lam is None) == (y.lam is None)
        assert x.lam is None or torch.equal(x.lam, y.lam)


@pytest.mark.parametrize("aug", [{}, {"flip": True, "crop_padding": 2, "mixup": 0.8}])
def test_restart_mid_epoch_gives_the_same_batches(aug):
    full = list(device_loader(**aug).epoch(3))
    resumed = list(device_loader(**aug).epoch(3, start_step=4))
    assert len(resumed) == len(full) - 4
    same_batches(full[4:], resumed)


@pytest.mark.parametrize("resident", [0, 1, 75, 149, 150])
def test_streaming_from_a_memory_map_equals_the_device_loader(tmp_path, monkeypatch, resident):
    """Same subset, same order, same augmentation: the two loaders yield identical batches,
    resumed too, whatever part of the subset stays on the device."""
    monkeypatch.setattr(loader_module, "RESIDENT_COPY_BYTES", 1000)  # the resident part copied in several parts
    images, labels = small_images(200)
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    subset = np.random.default_rng(0).permutation(200)[:150]
    mean, std = data.channel_stats(images)
    kw = dict(mean=mean, std=std, device=CPU, seed=3, augmentation=Augmentation(flip=True, crop_padding=2, mixup=0.5))
    on_device = DeviceLoader(images[subset], labels[subset], 32, **kw)
    streamed = StreamingLoader(mapped, labels, 32, subset=subset, resident=resident, prefetch=2, **kw)
    assert streamed.resident_bytes == resident * 3 * 8 * 8
    for epoch in (0, 1):
        same_batches(on_device.epoch(epoch), streamed.epoch(epoch))
    same_batches(list(on_device.epoch(2))[3:], streamed.epoch(2, start_step=3))
    seen = torch.cat([b.labels for b in streamed.epoch(0)])
    assert sorted(seen.tolist()) == sorted(labels[subset].tolist())
    batches = streamed.epoch(0)
    next(batches)
    batches.close()  # a consumer that stops early leaves no producer thread behind


def test_make_loader_keeps_on_the_device_what_fits_the_budget():
    images, labels = small_images(100)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device=CPU)
    assert isinstance(make_loader(images, labels, np.arange(50), 10, budget_bytes=50 * 192, **kw), DeviceLoader)
    part = make_loader(images, labels, np.arange(50), 10, budget_bytes=50 * 192 - 1, **kw)
    assert isinstance(part, StreamingLoader) and part.resident == 49, "what fits stays, the rest streams"
    assert device_bytes(part) == 49 * 192
    none = make_loader(images, labels, np.arange(50), 10, budget_bytes=191, **kw)
    assert none.resident == 0 and sum(len(b.labels) for b in none.epoch(0)) == 50, "too small a budget streams all"


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 28, 28), (3, 5, 5), (2, 3, 3), (3, 64, 96)])
def test_the_devices_gather_copies_any_rows_of_any_width(monkeypatch, shape):
    """The Triton kernel a GPU gathers streamed rows with, run by Triton's interpreter: rows of
    int32, int16 and uint8 words, wider than one chunk, repeated, fewer than its programs, none."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is defined, on import
    monkeypatch.delitem(sys.modules, "mlpgrid.data.row_gather", raising=False)
    row_gather = importlib.import_module("mlpgrid.data.row_gather")
    monkeypatch.delitem(sys.modules, "mlpgrid.data.row_gather")  # no interpreted kernel left behind
    images = torch.randint(0, 256, (40, *shape), dtype=torch.uint8)
    for rows in ([], [7], [3, 3, 39, 0], list(range(40))[::-1] * 2):
        rows = torch.tensor(rows, dtype=torch.int64)
        gathered = row_gather.gather_rows(images, rows)
        assert gathered.shape == (len(rows), *shape) and torch.equal(gathered, images[rows])


def test_mixup_pairs_each_example_with_its_neighbour():
    batch = next(device_loader(mixup=0.8).epoch(0))
    assert 0 < batch.lam.item() < 1
    assert torch.equal(batch.mixed_labels, batch.labels.roll(1))


def test_augment_is_pad_crop_flip_normalise_mix():
    """The one-gather augmentation equals doing each step separately."""
    g = torch.Generator().manual_seed(0)
    source = torch.randint(0, 256, (10, 3, 5, 6), dtype=torch.uint8, generator=g)
    idx = torch.tensor([4, 1, 7, 7])
    dy, dx = torch.tensor([0, 2, 4, 1]), torch.tensor([4, 0, 3, 2])
    flipped = torch.tensor([False, True, True, False])
    mean, std = torch.tensor([10.0, 20, 30]).reshape(1, 3, 1, 1), torch.tensor([2.0, 3, 4]).reshape(1, 3, 1, 1)
    padded = torch.nn.functional.pad(source[idx], (2, 2, 2, 2)).float()
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 6] for i in range(4)])
    expected = torch.where(flipped[:, None, None, None], expected.flip(3), expected)
    expected = (expected - mean) / std
    plain = augment(source, idx, dy, dx, flipped, None, mean, std, 2, torch.float32)
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-6)
    lam = torch.tensor(0.3)
    mixed = augment(source, idx, dy, dx, flipped, lam, mean, std, 2, torch.float32)
    torch.testing.assert_close(mixed, 0.3 * expected + 0.7 * expected.roll(1, 0), rtol=0, atol=1e-5)
