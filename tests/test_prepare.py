"""`mlpgrid data prepare` / `data ls`: every source layout written here in its real form, read back."""

import json
import os
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, mlpgrid_command
from mlpgrid import data
from mlpgrid.data import prepare, prepared
from mlpgrid.data.prepare import PrepareError, Request
from test_data import small_fashion_layout
from test_sources import write_cifar10

CLASSES = ("cat", "dog", "emu")


def shade(label: int, i: int) -> int:
    """Every image is one flat colour that encodes its class and number, so resizing keeps it exact."""
    return 10 + 60 * label + i


def write_tree(root, per_class=(7, 5, 6), val=2, tiny_val=False, corrupt=True):
    """An image-folder tree: PNGs and JPEG-free flat images of varied sizes, some unreadable files."""
    for label, (name, n) in enumerate(zip(CLASSES, per_class, strict=True)):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(n):
            size = (48 + 9 * i, 40 + 7 * label)
            mode = "L" if (label, i) == (2, 0) else "RGB"
            Image.new(mode, size, shade(label, i) if mode == "L" else (shade(label, i),) * 3).save(folder / f"{i}.png")
    if val and tiny_val:  # TinyImageNet: val/images/*.JPEG and val/val_annotations.txt
        (root / "val" / "images").mkdir(parents=True)
        lines = []
        for label, name in enumerate(CLASSES):
            for i in range(val):
                Image.new("RGB", (64, 64), (shade(label, i),) * 3).save(root / "val" / "images" / f"v{label}{i}.png")
                lines.append(f"v{label}{i}.png\t{name}\t0\t0\t63\t63")
        (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    elif val:
        for label, name in enumerate(CLASSES):
            (root / "val" / name).mkdir(parents=True)
            for i in range(val):
                Image.new("RGB", (70, 50), (shade(label, i),) * 3).save(root / "val" / name / f"{i}.png")
    if corrupt:
        (root / "train" / "cat" / "not-an-image.jpg").write_bytes(b"hello")
        good = (root / "train" / "dog" / "0.png").read_bytes()
        (root / "train" / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def expected_shades(per_class):
    return sorted(shade(label, i) for label, n in enumerate(per_class) for i in range(n))


@pytest.mark.parametrize("tiny_val", [False, True])
def test_image_folder_round_trip_with_unreadable_files_reported(tmp_path, tiny_val):
    source = write_tree(tmp_path / "tree", tiny_val=tiny_val)
    out = tmp_path / "out"
    manifest = prepare.prepare(Request("tree", source, out, "image-folder", resolution=16), workers=2, shard_size=4)

    train_x, train_y = prepared.load_split(out, "train")
    test_x, test_y = prepared.load_split(out, "test")
    assert train_x.shape == (18, 3, 16, 16) and train_x.dtype == np.uint8 and test_x.shape == (6, 3, 16, 16)
    assert manifest["classes"] == list(CLASSES) and manifest["splits"]["train"]["count"] == 18
    for images, labels in ((train_x, train_y), (test_x, test_y)):
        flat = images.reshape(len(images), -1)
        assert (flat == flat[:, :1]).all(), "a flat image stays flat, grayscale becomes three equal channels"
        assert all(((v - 10) // 60) == y for v, y in zip(flat[:, 0], labels, strict=True)), "labels follow images"
    assert sorted(train_x[:, 0, 0, 0].tolist()) == expected_shades((7, 5, 6))
    skipped = {s["file"].split("/")[-1]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"not-an-image.jpg", "truncated.png"}
    assert "cannot identify image" in skipped["not-an-image.jpg"] and "truncated" in skipped["truncated.png"]
    np.testing.assert_allclose(manifest["mean"], data.channel_stats(np.asarray(train_x))[0])
    assert prepared.verify(out) == []
    assert not (out / ".partial").exists()

    record = tmp_path / "storage" / "check.json"
    assert prepared.verify(out, record) == [] and record.is_file()
    labels = out / "train_labels.npy"
    before = labels.stat()
    with labels.open("r+b") as f:  # rewritten in place: same size, same inode, modification time set back
        f.seek(-8, os.SEEK_END)
        f.write(bytes(8))
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert labels.stat().st_mtime_ns == before.st_mtime_ns and labels.stat().st_ino == before.st_ino
    assert prepared.verify(out, record) == [f"{labels}: checksum differs from manifest.json"]
    assert prepared.verify(out) == [f"{labels}: checksum differs from manifest.json"]


@pytest.mark.parametrize("layout", ["idx", "cifar-10"])
def test_array_sources_equal_loading_them_directly(tmp_path, layout):
    if layout == "idx":
        small_fashion_layout(tmp_path / "src")
        builtin = "fashion-mnist"
    else:
        write_cifar10(tmp_path / "src", np.random.default_rng(0))
        builtin = "cifar-10"
    assert prepare.detect_layout(tmp_path / "src") == layout
    manifest = prepare.prepare(Request("p", tmp_path / "src", tmp_path / "p", layout, resolution=20))
    direct = data.load(builtin, str(tmp_path / "src"), resolution=20, channels=3)
    data.register("p", tmp_path / "p")
    loaded = data.load("p")
    np.testing.assert_array_equal(loaded.train_images, direct.train_images)
    np.testing.assert_array_equal(loaded.test_labels, direct.test_labels)
    assert isinstance(loaded.train_images, np.memmap), "prepared images are mapped, not read into memory"
    assert loaded.mean == tuple(manifest["mean"]) and np.allclose(loaded.mean, direct.mean)
    assert data.info("p").resolution == 20 and data.info("p").train_size == len(direct.train_labels)


def test_interrupted_preparation_keeps_its_finished_shards(tmp_path):
    source = write_tree(tmp_path / "tree", per_class=(9, 9, 9), corrupt=False)
    request = Request("tree", source, tmp_path / "out", "image-folder", resolution=8)

    def interrupt(done, total):
        if done >= 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(request, workers=1, progress=interrupt, shard_size=3)
    finished = sorted((tmp_path / "out" / ".partial").glob("shard-*.npz"))
    assert 3 <= len(finished) < 11, "stopped part-way: 11 shards in all"

    calls = []
    prepare.prepare(request, workers=2, progress=lambda done, total: calls.append((done, total)), shard_size=3)
    assert calls[0] == (3 * len(finished), 33), "the finished shards were not decoded again"
    again = prepare.prepare(Request("tree", source, tmp_path / "fresh", "image-folder", resolution=8), shard_size=3)
    for split in ("train", "test"):
        for kind in ("images", "labels"):
            name = f"{split}_{kind}.npy"
            assert np.array_equal(np.load(tmp_path / "out" / name), np.load(tmp_path / "fresh" / name))
    assert again["splits"] == prepared.read_manifest(tmp_path / "out")["splits"]

    other = Request("tree", source, tmp_path / "out", "image-folder", resolution=16)
    with pytest.raises(PrepareError, match="already holds a dataset prepared with other settings"):
        prepare.prepare(other)


def test_held_out_split_for_a_source_without_one(tmp_path):
    source = write_tree(tmp_path / "tree", per_class=(20, 10, 30), val=0, corrupt=False)
    out = tmp_path / "out"
    prepare.prepare(Request("nosplit", source, tmp_path / "plain", "image-folder", resolution=8))
    with pytest.raises(ValueError, match="nosplit has no test split; prepare it with --holdout"):
        data.register("nosplit", tmp_path / "plain")

    manifest = prepare.prepare(Request("held", source, out, "image-folder", resolution=8, holdout=0.2, seed=1))
    train_x, train_y = prepared.load_split(out, "train")
    test_x, test_y = prepared.load_split(out, "test")
    assert np.bincount(test_y).tolist() == [4, 2, 6], "class-proportional"
    assert len(train_y) == 48 and manifest["splits"]["test"]["count"] == 12
    shades = sorted(train_x[:, 0, 0, 0].tolist() + test_x[:, 0, 0, 0].tolist())
    assert shades == expected_shades((20, 10, 30)), "every image in exactly one split"
    with pytest.raises(PrepareError, match="has a test split already"):
        prepare.prepare(Request("x", write_tree(tmp_path / "t2"), tmp_path / "x", "image-folder", holdout=0.1))


def test_cli_prepare_ls_and_a_trial_on_the_prepared_dataset(tmp_path, write_grid):
    source = write_tree(tmp_path / "tree")
    home = tmp_path / "prepared"
    env = {"MLPGRID_DATA": str(home), "PATH": "/usr/bin:/bin"}

    def cli(*args):
        return subprocess.run(mlpgrid_command(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    done = cli("data", "prepare", "animals", "--source", str(source), "--resolution", "12", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert f"{home / 'animals'}: animals, 3 classes, train 18, test 6 images at 12x12x3 (npy)" in done.stdout
    assert "skipped 2 unreadable images" in done.stdout and "not-an-image.jpg: UnidentifiedImageError" in done.stdout

    listed = cli("data", "ls", "--verify")
    assert listed.returncode == 0, listed.stderr
    assert "animals  12x12x3        3     18     6     npy" in listed.stdout and "checksums match" in listed.stdout
    assert json.loads(cli("data", "ls", "--json").stdout)[0]["name"] == "animals"

    missing = cli("data", "prepare", "x", "--source", str(tmp_path))
    assert missing.returncode == 1 and "cannot tell its layout" in missing.stderr and "Traceback" not in missing.stderr

    grid = write_grid(
        "base: {dataset: animals, model: B-1/Wi-16, epochs: 2, batch_size: 8, examples: 12, flip: true}\n"
    )
    run = cli("run", str(grid), "--in-process", "--storage", str(tmp_path / "s"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 trials: 1 finished" in run.stdout
    # Prepared elsewhere and named by the grid file alone: Ray's workers learn of it from the trials.
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(home / "animals", elsewhere)
    declared = write_grid(f"data: {{animals: {elsewhere}}}\n"
                          "base: {dataset: animals, model: B-1/Wi-16, epochs: 1, batch_size: 8, examples: 12}\n",
                          "declared.yaml")  # fmt: skip
    env["MLPGRID_DATA"] = str(tmp_path / "empty")
    on_ray = cli("run", str(declared), "--storage", str(tmp_path / "s2"))
    assert on_ray.returncode == 0, on_ray.stdout + on_ray.stderr
    assert "1 trials: 1 finished" in on_ray.stdout
    # The README's own flow from a folder of one's own: relative data home and tracking store. Ray
    # Tune runs each trial in a folder of its own, so the driver makes every path absolute.
    relative = subprocess.run(
        mlpgrid_command("run", str(grid), "--storage", "s3"), cwd=tmp_path, capture_output=True, text=True,
        env=env | {"MLPGRID_DATA": "prepared", "MLFLOW_TRACKING_URI": "sqlite:///mine.db"}, timeout=300,
    )  # fmt: skip
    assert relative.returncode == 0, relative.stdout + relative.stderr
    assert "1 trials: 1 finished" in relative.stdout and (tmp_path / "mine.db").is_file()
    env["MLPGRID_DATA"] = str(home)
    unknown = write_grid("base: {dataset: animalz, model: B-1/Wi-16, epochs: 1}\n", "bad.yaml")
    refused = cli("run", str(unknown), "--dry-run")
    assert refused.returncode == 1 and f"prepared in {home}: animals" in refused.stderr


def _bomb_png(path, width=20_000, height=10_000):
    """A PNG whose header claims 200 million pixels (Pillow refuses over 179M): a decompression bomb."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_skipped_and_a_looping_class_folder_refused(tmp_path):
    source = write_tree(tmp_path / "tree", corrupt=False)
    _bomb_png(source / "train" / "cat" / "bomb.png")
    (source / "train" / "dog" / "again").symlink_to(source / "train")  # a loop inside a class: not entered
    (source / "train" / "dog" / "loop.png").symlink_to(source / "train" / "dog" / "loop.png")  # links to itself
    manifest = prepare.prepare(Request("tree", source, tmp_path / "out", "image-folder", resolution=16), workers=1)
    assert [(s["file"].split("/")[-1], s["reason"].split(":")[0]) for s in manifest["skipped"]] == [
        ("again", "a link to a directory"), ("loop.png", "not a regular file (a broken link, or a link that loops)"),
        ("bomb.png", "DecompressionBombError")]  # fmt: skip
    assert manifest["splits"]["train"]["count"] == 18, "each image once"

    (source / "train" / "zebra").symlink_to(source / "train")  # a class folder that is the split itself
    with pytest.raises(ValueError, match="zebra: links to .*which holds the split itself"):
        prepare.prepare(Request("tree", source, tmp_path / "out2", "image-folder", resolution=16), workers=1)
