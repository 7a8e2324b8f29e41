"""``mlpgrid data prepare``: a source dataset, once, at a fixed resolution, with a manifest.

Array sources (idx, CIFAR pickles, STL-10 binaries) are read whole and resized. Image-folder
trees are cut into shards of :data:`SHARD_SIZE` files that worker processes decode and resize
in parallel; each finished shard is a file under ``OUT/.partial/``, so an interrupted run
picks up where it stopped. Unreadable images are skipped and listed (file and reason) in the
result and the manifest; they never become blank images. The shards are then joined into the
layout of :mod:`mlpgrid.data.prepared` and the manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlpgrid import data
from mlpgrid.data import imagefolder, prepared
from mlpgrid.data.files import disk_full, sha256
from mlpgrid.data.subset import proportional_order
from mlpgrid.system import locks

LAYOUTS = ("idx", "cifar-10", "cifar-100", "stl-10", "image-folder")
FORMATS = ("npy", "beton")
SHARD_SIZE = 1024
_ARRAY_LAYOUTS = {"idx": "fashion-mnist", "cifar-10": "cifar-10", "cifar-100": "cifar-100", "stl-10": "stl-10"}


class PrepareError(ValueError):
    """A preparation that cannot go on; the message names the file or option."""


@dataclass(frozen=True)
class Skipped:
    file: str
    reason: str


@dataclass(frozen=True)
class Request:
    name: str
    source: Path
    out: Path
    layout: str
    resolution: int = 64
    channels: int = 3
    format: str = "npy"
    holdout: float = 0.0  # fraction of train held out as the test split, for sources without one
    seed: int = 0  # of the held-out split

    def settings(self) -> dict[str, Any]:
        """What the result depends on; a re-run with other settings must not reuse shards."""
        return {
            "name": self.name, "layout": self.layout, "source": str(self.source.resolve()),
            "resolution": self.resolution, "channels": self.channels, "format": self.format,
            "holdout": self.holdout, "seed": self.seed,
        }  # fmt: skip


def detect_layout(source: Path) -> str:
    """The layout of ``source`` from the files it holds."""
    checks = [
        ("cifar-10", ("data_batch_1", "test_batch", "batches.meta")),
        ("cifar-100", ("train", "test", "meta")),
        ("stl-10", ("train_X.bin", "train_y.bin")),
    ]
    if not source.is_dir():
        raise PrepareError(f"{source}: no such directory")
    for layout, names in checks:
        if all((source / n).is_file() for n in names):
            return layout
    if any(p.name.startswith("train-images-idx3-ubyte") for p in source.iterdir()):
        return "idx"
    if (source / "train").is_dir():
        return "image-folder"
    raise PrepareError(
        f"{source}: cannot tell its layout (none of CIFAR pickles, STL-10 binaries, MNIST-style idx files, or a "
        f"train/<class>/ image folder); give --layout, one of {', '.join(LAYOUTS)}"
    )


def prepare(
    request: Request,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    shard_size: int = SHARD_SIZE,
) -> dict:
    """Prepare ``request`` and return its manifest. ``progress(done, total)`` counts images.

    Re-running a finished request returns the existing manifest; re-running an interrupted one
    keeps its finished shards. One process prepares ``request.out`` at a time: another one
    meanwhile is refused, saying which. A full disk is a :class:`PrepareError` too, no temporary
    file left behind.
    """
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".preparing"
    with locks.claim(lock) as holder:
        if holder is not None:
            raise PrepareError(
                f"{out}: another `mlpgrid data prepare` is writing it ({holder}); run again once it ends"
            )
        try:
            return _prepare(request, workers, progress, shard_size)
        except OSError as e:
            if not disk_full(e, out):
                raise
            raise PrepareError(f"{out}: the disk is full ({e}); free space and run again: the finished shards "
                               f"in {out / '.partial'} are kept") from None  # fmt: skip
        finally:
            lock.unlink(missing_ok=True)  # while held: a later process creates and locks its own


def _prepare(request: Request, workers: int | None, progress: Callable[[int, int], None] | None,
             shard_size: int) -> dict:  # fmt: skip
    out = request.out
    if (out / prepared.MANIFEST).is_file():
        manifest = prepared.read_manifest(out)
        if manifest["settings"] != request.settings():
            raise PrepareError(
                f"{out}: already holds a dataset prepared with other settings; choose another --out or delete it"
            )
        return manifest
    if request.channels == 1 and request.format == "beton":
        raise PrepareError("--format beton stores RGB images; use --channels 3")
    if not 0 <= request.holdout < 1:
        raise PrepareError(f"--holdout must be in [0, 1), got {request.holdout}")
    if request.format == "beton":
        # FFCV is optional and brings torch: imported for .beton output alone, so the CLI, which
        # reads this module's choices, starts without them.
        from mlpgrid.data import beton

        beton.require()
    partial = out / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if request.layout == "image-folder":
        classes, splits, skipped = _prepare_folder(request, partial, workers, progress, shard_size)
    elif request.layout in _ARRAY_LAYOUTS:
        classes, splits, skipped = _prepare_arrays(request, partial, progress)
    else:
        raise PrepareError(f"unknown layout {request.layout!r}; one of {', '.join(LAYOUTS)}")

    if "test" in splits and request.holdout:
        raise PrepareError(f"{request.source}: has a test split already; --holdout is for sources without one")
    if request.holdout:
        _hold_out(partial, request.holdout, request.seed)
        splits = ["train", "test"]
    mean, std = data.channel_stats(np.load(partial / "train_images.npy", mmap_mode="r"))
    if request.format == "beton":
        for split in splits:
            beton.write(partial / f"{split}_images.npy", partial / f"{split}_labels.npy", partial / f"{split}.beton")
            (partial / f"{split}_images.npy").unlink()
    manifest = {
        "format_version": prepared.FORMAT_VERSION,
        "name": request.name,
        "settings": request.settings(),
        "classes": list(classes),
        "resolution": request.resolution,
        "channels": request.channels,
        "format": request.format,
        "mean": mean,
        "std": std,
        "splits": {split: _describe(partial, split, request.format) for split in splits},
        "skipped": [s.__dict__ for s in skipped],
        "seconds": round(time.time() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for split in splits:
        for name in manifest["splits"][split]["files"]:
            os.replace(partial / name, out / name)
    _atomic(out / prepared.MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    shutil.rmtree(partial)
    return manifest


def _describe(partial: Path, split: str, fmt: str) -> dict[str, Any]:
    labels = np.load(partial / f"{split}_labels.npy", mmap_mode="r")
    names = [f"{split}_labels.npy", f"{split}.beton" if fmt == "beton" else f"{split}_images.npy"]
    return {
        "count": len(labels),
        "files": {n: {"bytes": (partial / n).stat().st_size, "sha256": sha256(partial / n)} for n in names},
    }


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then put it in place: a killed run leaves
    no half-written file behind, a failed write (a full disk) no temporary one."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # np.save and np.savez keep their suffix
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save(path: Path, array: np.ndarray) -> None:
    _atomic(path, lambda tmp: np.save(tmp, array))


# --- array sources ----------------------------------------------------------------------------


def _prepare_arrays(
    request: Request, partial: Path, progress: Callable[[int, int], None] | None
) -> tuple[tuple[str, ...], list[str], list[Skipped]]:
    info = data.info(_ARRAY_LAYOUTS[request.layout])
    try:
        arrays = info.read(request.source)
    except (FileNotFoundError, ValueError) as e:
        raise PrepareError(str(e)) from None
    if request.channels == 1 and arrays.images("train").shape[1] == 3:
        raise PrepareError(f"{request.source}: holds colour images; --channels 1 is for grayscale sources")
    total = len(arrays.train_labels) + len(arrays.test_labels)
    done = 0
    for split, images, labels in (
        ("train", arrays.images("train"), arrays.train_labels),
        ("test", arrays.images("test"), arrays.test_labels),
    ):
        _save(partial / f"{split}_images.npy", data.resize(images, request.resolution, request.channels))
        _save(partial / f"{split}_labels.npy", labels)
        done += len(labels)
        if progress:
            progress(done, total)
    return arrays.classes, ["train", "test"], []


# --- image folders ----------------------------------------------------------------------------


def _prepare_folder(
    request: Request, partial: Path, workers: int | None, progress: Callable[[int, int], None] | None, shard_size: int
) -> tuple[tuple[str, ...], list[str], list[Skipped]]:
    try:
        classes, splits = imagefolder.list_images(request.source)
    except (FileNotFoundError, ValueError) as e:
        raise PrepareError(str(e)) from None
    plan = {
        "settings": request.settings(),
        "shard_size": shard_size,
        "files": {s: hashlib.sha256("\n".join(map(str, il.files)).encode()).hexdigest() for s, il in splits.items()},
    }
    plan_file = partial / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        raise PrepareError(
            f"{partial}: an interrupted preparation from another source, file list or settings; delete it to start over"
        )
    plan_file.write_text(json.dumps(plan))

    shards = [
        (split, i, images.files[start : start + shard_size], images.labels[start : start + shard_size])
        for split, images in splits.items()
        for i, start in enumerate(range(0, len(images.files), shard_size))
    ]
    total = sum(len(files) for _, _, files, _ in shards)
    pending = [s for s in shards if not _shard_path(partial, s[0], s[1]).is_file()]
    done = total - sum(len(files) for _, _, files, _ in pending)
    if progress:
        progress(done, total)
    workers = max(1, min(workers or os.cpu_count() or 1, len(pending) or 1))
    pool = ProcessPoolExecutor(workers)
    try:
        futures = {
            pool.submit(_prepare_shard, _shard_path(partial, split, i), files, labels, request): len(files)
            for split, i, files, labels in pending
        }
        for future in as_completed(futures):
            future.result()
            done += futures[future]
            if progress:
                progress(done, total)
    finally:  # on Ctrl-C, stop at the shards in flight instead of working through the queue
        pool.shutdown(cancel_futures=True)

    skipped = [Skipped(path, why) for images in splits.values() for path, why in images.passed_over]
    for split in splits:
        parts = sorted(partial.glob(f"shard-{split}-*.npz"))
        skipped += _join(parts, partial / f"{split}_images.npy", partial / f"{split}_labels.npy")
        for part in parts:
            part.unlink()
        if not np.load(partial / f"{split}_labels.npy", mmap_mode="r").size:
            raise PrepareError(f"{request.source}: no readable image in the {split} split")
    plan_file.unlink()
    return classes, list(splits), skipped


def _shard_path(partial: Path, split: str, index: int) -> Path:
    return partial / f"shard-{split}-{index:06d}.npz"


def _prepare_shard(path: Path, files: list[Path], labels: np.ndarray, request: Request) -> None:
    """Decode, resize and save one shard; unreadable files are recorded, not stored."""
    images, kept, skipped = [], [], []
    for file, label in zip(files, labels, strict=True):
        try:
            images.append(imagefolder.read_image(file, request.resolution, request.channels))
            kept.append(label)
        except ValueError as e:
            skipped.append({"file": str(file), "reason": str(e)})
    shape = (0, request.channels, request.resolution, request.resolution)
    stacked = np.stack(images) if images else np.empty(shape, np.uint8)
    kept_labels, skipped_json = np.asarray(kept, dtype=np.int64), np.asarray(json.dumps(skipped))
    _atomic(path, lambda tmp: np.savez(tmp, images=stacked, labels=kept_labels, skipped=skipped_json))


def _join(parts: list[Path], images_path: Path, labels_path: Path) -> list[Skipped]:
    """Concatenate shards into one memory-mappable array without holding them all in memory."""
    labels = [np.load(p)["labels"] for p in parts]
    first = np.load(parts[0])["images"]
    out = np.lib.format.open_memmap(images_path, "w+", np.uint8, (sum(map(len, labels)), *first.shape[1:]))
    skipped, at = [], 0
    for part, part_labels in zip(parts, labels, strict=True):
        with np.load(part) as shard:
            out[at : at + len(part_labels)] = shard["images"]
            skipped += [Skipped(**s) for s in json.loads(str(shard["skipped"]))]
        at += len(part_labels)
    out.flush()
    del out
    _save(labels_path, np.concatenate(labels))
    return skipped


# --- held-out split ------------------------------------------------------------


def _hold_out(partial: Path, fraction: float, seed: int) -> None:
    """Move a class-proportional ``fraction`` of train into a new test split."""
    images = np.load(partial / "train_images.npy", mmap_mode="r")
    labels = np.load(partial / "train_labels.npy")
    order = proportional_order(labels, seed)
    n_test = max(1, round(fraction * len(labels)))
    for split, idx in (("test", np.sort(order[:n_test])), ("train.new", np.sort(order[n_test:]))):
        out = np.lib.format.open_memmap(partial / f"{split}_images.npy", "w+", np.uint8, (len(idx), *images.shape[1:]))
        for start in range(0, len(idx), 4096):
            out[start : start + 4096] = images[idx[start : start + 4096]]
        out.flush()
        _save(partial / f"{split}_labels.npy", labels[idx])
    del images
    for kind in ("images", "labels"):
        os.replace(partial / f"train.new_{kind}.npy", partial / f"train_{kind}.npy")
