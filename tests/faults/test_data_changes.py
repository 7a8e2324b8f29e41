"""Prepared data that does not verify, or that changed under trials that trained on it, is
refused before anything runs; a run records the checksum of the data it trains on."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlpgrid.cli import cli
from mlpgrid.data import prepare, prepared
from mlpgrid.data.prepare import Request
from mlpgrid.grid.layout import StorageLayout
from mlpgrid.tracking import reader
from test_prepare import write_tree


@pytest.fixture
def animals(tmp_path):
    """A prepared dataset and a one-trial grid on it that has run once."""
    root = tmp_path / "animals"
    prepare.prepare(Request("animals", write_tree(tmp_path / "tree", corrupt=False), root, "image-folder",
                            resolution=8), workers=1)  # fmt: skip
    grid = tmp_path / "animals.yaml"
    grid.write_text(
        f"name: animals\ndata: {{animals: {root}}}\n"
        "base: {dataset: animals, model: B-1/Wi-16, epochs: 1, batch_size: 4, examples: 8}\n"
    )
    storage = tmp_path / "storage"
    first = run(grid, storage)
    assert first.exit_code == 0, first.output
    return root, grid, storage


def run(grid, storage, *extra):
    return CliRunner().invoke(cli, ["run", str(grid), "--in-process", "--storage", str(storage), *extra])


def test_a_run_records_the_checksum_of_its_data(animals):
    root, grid, storage = animals
    uri = reader.tracking_uri(StorageLayout(storage))
    [trial] = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("animals").experiment_id], "tags.mlpgrid_role = 'trial'"
    )
    assert trial.data.tags["data.animals.sha256"] == prepared.checksum(prepared.read_manifest(root))
    assert list((storage / "data-checks").iterdir()), "the verified files are remembered in storage"


def test_altered_pixels_or_labels_are_refused_before_anything_runs(animals):
    root, grid, storage = animals
    labels = np.load(root / "train_labels.npy")
    np.save(root / "train_labels.npy", labels[::-1].copy())  # same size, other labels
    refused = run(grid, storage)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "dataset animals: its files do not match manifest.json" in refused.output
    assert f"{root / 'train_labels.npy'}: checksum differs from manifest.json" in refused.output


def test_a_manifest_that_contradicts_its_arrays_or_lacks_a_field_is_refused(animals):
    root, grid, storage = animals
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(manifest | {"resolution": 16}))
    refused = run(grid, storage)
    assert refused.exit_code == 1 and "train_images.npy: shape (18, 3, 8, 8), manifest.json says (18, 3, 16, 16)" in (
        refused.output
    )
    del manifest["name"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    refused = run(grid, storage)
    assert refused.exit_code == 1 and "damaged manifest (name: missing); re-prepare the dataset" in refused.output


def test_data_that_changed_under_ended_trials_is_refused_like_an_edited_grid(animals, tmp_path):
    root, grid, storage = animals
    old = prepared.checksum(prepared.read_manifest(root))
    other = write_tree(tmp_path / "other", per_class=(7, 5, 6), corrupt=False)
    (other / "train" / "cat" / "0.png").write_bytes((other / "train" / "dog" / "0.png").read_bytes())
    shutil.rmtree(root)  # prepared again, from other images
    prepare.prepare(Request("animals", other, root, "image-folder", resolution=8), workers=1)
    new = prepared.checksum(prepared.read_manifest(root))
    assert new != old
    refused = run(grid, storage)
    assert refused.exit_code == 1, refused.output
    assert "the data changed since 1 trials of animals trained on it" in refused.output
    assert f": animals {old[:12]} -> {new[:12]}" in refused.output
    allowed = run(grid, storage, "--allow-changes")
    assert allowed.exit_code == 0 and "Nothing to do" in allowed.output
