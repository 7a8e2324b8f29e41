"""CIFAR-10, CIFAR-100 and STL-10 read from small files written in their real layouts."""

import pickle
import subprocess

import numpy as np
import pytest

from conftest import REPO, mlpgrid_command
from mlpgrid import data
from mlpgrid.data import cifar


def write_pickle(path, obj):
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_images(rng, n):
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar10(root, rng, per_batch=6, test=5):
    """The layout of cifar-10-batches-py: rows of 3072 bytes (R, G, B planes), byte-string keys."""
    root.mkdir(parents=True)
    batches = []
    for name in [*cifar.CIFAR10_TRAIN, "test_batch"]:
        n = test if name == "test_batch" else per_batch
        x, y = cifar_images(rng, n), rng.integers(0, 10, n).tolist()
        write_pickle(root / name, {b"batch_label": name.encode(), b"labels": y, b"data": x.reshape(n, -1),
                                   b"filenames": [b"x.png"] * n})  # fmt: skip
        batches.append((x, y))
    write_pickle(root / "batches.meta", {b"label_names": [n.encode() for n in data.CIFAR10_CLASSES]})
    return batches


def test_cifar10_layout_round_trips(tmp_path):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    loaded = data.load("cifar-10", str(tmp_path / "cifar-10-batches-py"))
    np.testing.assert_array_equal(loaded.train_images, np.concatenate([x for x, _ in batches[:5]]))
    np.testing.assert_array_equal(loaded.train_labels, np.concatenate([y for _, y in batches[:5]]))
    np.testing.assert_array_equal(loaded.test_images, batches[5][0])
    assert loaded.classes == data.CIFAR10_CLASSES and loaded.train_images.shape[1:] == (3, 32, 32)
    assert data.load("cifar-10", str(tmp_path / "cifar-10-batches-py"), resolution=64).train_images.shape[1:] == (
        3,
        64,
        64,
    )


def test_cifar100_uses_fine_labels(tmp_path):
    rng, root = np.random.default_rng(1), tmp_path / "cifar-100-python"
    root.mkdir()
    x, fine = cifar_images(rng, 8), rng.integers(0, 100, 8).tolist()
    for name in ("train", "test"):
        write_pickle(root / name, {b"data": x.reshape(8, -1), b"fine_labels": fine, b"coarse_labels": [0] * 8})
    write_pickle(root / "meta", {b"fine_label_names": [n.encode() for n in data.CIFAR100_CLASSES],
                                 b"coarse_label_names": [b"c"] * 20})  # fmt: skip
    loaded = data.load("cifar-100", str(root))
    np.testing.assert_array_equal(loaded.train_labels, fine)
    np.testing.assert_array_equal(loaded.test_images, x)
    assert loaded.classes[:3] == ("apple", "aquarium_fish", "baby")


def test_stl10_binary_is_column_major(tmp_path):
    rng, root = np.random.default_rng(2), tmp_path / "stl10_binary"
    root.mkdir()
    images = rng.integers(0, 256, (4, 3, 96, 96), dtype=np.uint8)
    labels = np.array([1, 10, 3, 5], dtype=np.uint8)
    for split in ("train", "test"):
        images.transpose(0, 1, 3, 2).tofile(root / f"{split}_X.bin")  # as MATLAB wrote them
        labels.tofile(root / f"{split}_y.bin")
    (root / "class_names.txt").write_text("\n".join(data.STL10_CLASSES) + "\n")
    loaded = data.load("stl-10", str(root))
    np.testing.assert_array_equal(loaded.train_images, images)
    np.testing.assert_array_equal(loaded.test_labels, labels.astype(np.int64) - 1)
    info = data.info("stl-10")
    assert info.train_count and info.train_count(info.locate(root)) == 4, "counted without reading the images"
    (root / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(ValueError, match="train_X.bin: 110592 bytes are not 3 images"):
        data.load("stl-10", str(root))


def test_broken_and_hostile_files_are_named(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar10(root, np.random.default_rng(3))
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR batch"):
        data.load("cifar-10", str(root))

    class Exploit:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(tmp_path / "pwned")],))

    write_pickle(root / "data_batch_3", {b"data": Exploit()})
    with pytest.raises(ValueError, match="not a CIFAR batch \\(refusing to load [a-z]+.call\\)"):
        data.load("cifar-10", str(root))
    assert not (tmp_path / "pwned").exists()

    (root / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py: missing test_batch"):
        data.info("cifar-10").locate(root)

    write_pickle(root / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]})
    (root / "data_batch_3").unlink()
    write_cifar10(tmp_path / "fresh", np.random.default_rng(4))
    (root / "data_batch_3").write_bytes((tmp_path / "fresh" / "data_batch_3").read_bytes())
    with pytest.raises(ValueError, match="test labels span 0..12; cifar-10 has 10 classes"):
        data.load("cifar-10", str(root))


def test_a_grid_trains_on_cifar10(tmp_path, write_grid):
    write_cifar10(tmp_path / "cifar", np.random.default_rng(5), per_batch=20, test=10)
    base = "base: {dataset: cifar-10, examples: 100, model: B-1/Wi-16, epochs: 1, batch_size: 25, resolution: 16}\n"
    grid = write_grid(f"data: {{cifar-10: {tmp_path / 'cifar'}}}\n" + base)
    result = subprocess.run(mlpgrid_command("run", str(grid), "--in-process", "--storage", str(tmp_path / "s")),
                            cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 trials: 1 finished" in result.stdout
