"""FFCV: a prepared dataset written as .beton files and read back through FFCV's Loader."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mlpgrid import data
from mlpgrid.data import prepare
from mlpgrid.data.loader import Augmentation
from mlpgrid.data.prepare import Request
from test_prepare import write_tree

try:
    from mlpgrid.data import beton

    beton.require()
except RuntimeError:
    if os.environ.get("MLPGRID_REQUIRE_FFCV"):
        raise
    pytest.skip("FFCV is not installed (CI installs it and sets MLPGRID_REQUIRE_FFCV)", allow_module_level=True)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def animals(tmp_path_factory):
    root = tmp_path_factory.mktemp("beton")
    source = write_tree(root / "tree", per_class=(30, 20, 25), val=4, corrupt=False)
    manifest = prepare.prepare(Request("animals-beton", source, root / "out", "image-folder", resolution=8,
                                       format="beton"))  # fmt: skip
    data.register("animals-beton", root / "out")
    return data.load("animals-beton"), manifest


def ffcv_loader(arrays, subset, **kw):
    return beton.FfcvLoader(arrays.beton["train"], arrays.train_labels, 16, subset=subset, mean=arrays.mean,
                            std=arrays.std, device=CPU, seed=5, workers=2, **kw)  # fmt: skip


def test_beton_round_trip_covers_the_subset_once_with_labels_matching_images(animals):
    arrays, manifest = animals
    assert arrays.train_images is None and manifest["format"] == "beton" and sorted(arrays.beton) == ["test", "train"]
    subset = np.arange(0, 75, 2)
    loader = ffcv_loader(arrays, subset)
    pixels, labels = [], []
    for batch in loader.epoch(0):
        raw = batch.images[:, 0, 0, 0] * loader.std[0, 0, 0, 0] + loader.mean[0, 0, 0, 0]  # undo normalisation
        pixels += raw.round().long().tolist()
        labels += batch.labels.tolist()
    assert len(labels) == len(subset) and len(loader) == 3
    assert sorted(labels) == sorted(arrays.train_labels[subset].tolist())
    assert all((p - 10) // 60 == y for p, y in zip(pixels, labels, strict=True)), "each label travels with its image"
    assert len(set(pixels)) == len(subset), "no example twice"


def test_beton_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch(animals):
    arrays, _ = animals
    aug = Augmentation(flip=True, crop_padding=2, mixup=0.5)
    first = [b.labels for b in ffcv_loader(arrays, None, augmentation=aug).epoch(1)]
    again = list(ffcv_loader(arrays, None, augmentation=aug).epoch(1))
    assert all(torch.equal(a, b.labels) for a, b in zip(first, again, strict=True))
    assert not torch.equal(torch.cat(first), torch.cat([b.labels for b in ffcv_loader(arrays, None).epoch(2)]))
    resumed = list(ffcv_loader(arrays, None, augmentation=aug).epoch(1, start_step=2))
    assert len(resumed) == len(again) - 2
    for a, b in zip(again[2:], resumed, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.lam, b.lam)
    reused = ffcv_loader(arrays, None, augmentation=aug)  # one FFCV Loader serves every epoch and resume
    list(reused.epoch(2, start_step=1))
    for a, b in zip(again[2:], reused.epoch(1, start_step=2), strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(again, reused.epoch(1), strict=True))


def test_missing_ffcv_is_named_with_how_to_install(tmp_path):
    """Run where `import ffcv` fails: the message says what to install, the npy format still works."""
    code = (
        "import sys; sys.modules['ffcv'] = None\n"
        "from pathlib import Path\n"
        "from mlpgrid.data import prepare\n"
        "from test_prepare import write_tree\n"
        f"src = write_tree(Path({str(tmp_path)!r}) / 'tree')\n"
        f"prepare.prepare(prepare.Request('n', src, Path({str(tmp_path)!r}) / 'npy', 'image-folder', resolution=8))\n"
        "try:\n"
        f"    prepare.prepare(prepare.Request('b', src, Path({str(tmp_path)!r}) / 'b', 'image-folder',"
        " format='beton'))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    tests = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "FFCV is not installed" in out.stdout and "libturbojpeg0-dev" in out.stdout
