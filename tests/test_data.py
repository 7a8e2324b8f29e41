import numpy as np
import pytest
import torch

from conftest import write_idx
from mlpgrid import data
from mlpgrid.data.idx import read_idx
from mlpgrid.data.loader import Augmentation, DeviceLoader, channel_stats, crop_and_flip
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


def make_loader(n=103, batch=16, **aug):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % 10
    mean, std = channel_stats(images)
    return DeviceLoader(images, labels, batch, mean=mean, std=std, device=CPU, seed=7, augmentation=Augmentation(**aug))


def test_every_example_once_per_epoch_and_order_changes():
    loader = make_loader()
    assert len(loader) == 7
    labels0 = torch.cat([b.labels for b in loader.epoch(0)])
    assert len(labels0) == 103
    assert sorted(loader.order(0).tolist()) == list(range(103))
    assert not torch.equal(loader.order(0), loader.order(1))


@pytest.mark.parametrize("aug", [{}, {"flip": True, "crop_padding": 2, "mixup": 0.8}])
def test_restart_mid_epoch_gives_the_same_batches(aug):
    full = list(make_loader(**aug).epoch(3))
    resumed = list(make_loader(**aug).epoch(3, start_step=4))
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.lam == b.lam


def test_mixup_pairs_each_example_with_its_neighbour():
    batch = next(make_loader(mixup=0.8).epoch(0))
    assert 0 < batch.lam < 1
    assert torch.equal(batch.mixed_labels, batch.labels.roll(1))


def test_crop_and_flip():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).reshape(2, 1, 3, 3)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(crop_and_flip(x, 0, False, g), x)
    flipped = crop_and_flip(x, 0, True, torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    cropped = crop_and_flip(x, 1, False, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        windows = [padded[i, :, r : r + 3, c : c + 3] for r in range(3) for c in range(3)]
        assert any(torch.equal(cropped[i], w) for w in windows)
