"""FFCV ``.beton`` files: written from prepared arrays, read with FFCV's ``Loader``.

FFCV is optional (``pip install 'mlpgrid[ffcv]'``, which needs the system packages
pkg-config, libturbojpeg0-dev and libopencv-dev to build). Images are stored raw (uint8
H×W×3, no JPEG), so reading is a copy, not a decode. FFCV's quasi-random order is a
deterministic function of (seed, epoch), and a resumed epoch skips the positions already
trained on, so the resume guarantee of the other loaders holds here too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlpgrid.data.loader import Batch, _Loader

INSTALL = (
    "FFCV is not installed (or its libraries are missing): on Debian/Ubuntu run "
    "`apt-get install pkg-config libturbojpeg0-dev libopencv-dev` then `pip install 'mlpgrid[ffcv]'`. "
    "Datasets prepared with --format npy need no FFCV."
)


def require() -> None:
    """Raise a RuntimeError saying how to install FFCV when it cannot be imported."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
        import ffcv.loader  # noqa: F401
    except (ImportError, OSError) as e:
        raise RuntimeError(f"{INSTALL} ({type(e).__name__}: {e})") from None
    finally:
        torch.set_num_threads(threads)  # importing FFCV sets it to 1; a trial's thread count is its own


class _Arrays:
    """The indexed-dataset protocol FFCV's writer expects: ``(image HWC uint8, label)`` per index."""

    def __init__(self, images_path: Path, labels_path: Path):
        self.images_path, self.labels = images_path, np.load(labels_path)
        self.images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if self.images is None:  # opened lazily: FFCV's writer processes each open their own map
            self.images = np.load(self.images_path, mmap_mode="r")
        return np.ascontiguousarray(self.images[i].transpose(1, 2, 0)), int(self.labels[i])


def write(images_path: Path, labels_path: Path, out: Path, workers: int = -1) -> None:
    require()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    dataset = _Arrays(images_path, labels_path)
    side = np.load(images_path, mmap_mode="r").shape[-1]
    fields = {"image": RGBImageField(write_mode="raw", max_resolution=side), "label": IntField()}
    DatasetWriter(str(out), fields, num_workers=workers).from_indexed_dataset(dataset)


class _EpochOrder:
    """FFCV's traversal order as a pure function of (seed, epoch), minus the first ``skip`` positions.

    FFCV's quasi-random order shuffles its page table in place, so on a reused Loader an epoch's
    order would depend on the epochs drawn before it, and a resumed run would see another order.
    The table is put back as it was before every draw.
    """

    def __init__(self, order):
        self.order, self.skip = order, 0
        table = getattr(order, "page_to_samples_array", None)  # quasi-random order only
        self.pristine = None if table is None else table.copy()

    def sample_order(self, epoch: int):
        if self.pristine is not None:
            self.order.page_to_samples_array[:] = self.pristine
        return self.order.sample_order(epoch)[self.skip :]


class FfcvLoader(_Loader):
    """Batches read by FFCV from a ``.beton`` file, augmented on the device by :func:`augment`."""

    def __init__(self, path: Path, labels: np.ndarray, batch_size: int, *, subset: np.ndarray | None = None,
                 workers: int = -1, **kwargs):  # fmt: skip
        require()
        self.indices = np.arange(len(labels)) if subset is None else np.sort(np.asarray(subset))
        super().__init__(len(self.indices), batch_size, **kwargs)
        self.path = path
        self.workers = workers
        self._loader: Any = None  # built at the first epoch, reused after: FFCV compiles its pipeline once per Loader

    def _ffcv_loader(self, epoch: int, start_step: int) -> Any:
        if self._loader is None:
            self._loader = self._build()
        loader = self._loader
        loader.next_epoch = epoch
        loader.traversal_order.skip = start_step * self.batch_size
        return loader

    def _build(self):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        cuda = self.device.type == "cuda"
        loader = Loader(
            str(self.path),
            batch_size=self.batch_size,
            num_workers=self.workers,
            order=OrderOption.QUASI_RANDOM if self.shuffle else OrderOption.SEQUENTIAL,
            os_cache=not self.shuffle,  # quasi-random order reads whole pages of the file into its own cache
            seed=self.seed,
            indices=self.indices,
            drop_last=False,
            pipelines={
                "image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(self.device, non_blocking=cuda)],
                "label": [IntDecoder(), ToTensor(), Squeeze(), ToDevice(self.device, non_blocking=cuda)],
            },
        )  # fmt: skip
        loader.traversal_order = _EpochOrder(loader.traversal_order)
        return loader

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        lams = self.mixup_weights(epoch)
        for step, (images, labels) in enumerate(self._ffcv_loader(epoch, start_step), start=start_step):
            # FFCV reads the whole batch; a worker of a data-parallel trial augments its shard of it.
            rows = self.shard_rows(len(labels))
            where = torch.arange(len(labels), device=self.device) if rows is None else rows
            # (B, H, W, C) as FFCV stores images; a permuted view, read in place by the gather.
            yield self.batch(images.permute(0, 3, 1, 2), where, labels.long(), epoch, step, lams)
