"""Loaders: batches of (augmented, normalised) images on the training device.

Every loader hands the same kind of uint8 images to one augmentation function,
:func:`augment`, which gathers the batch, crops (from zero-padded images), flips, normalises
and mixes in one pass on the device; on CUDA it is compiled into a single fused kernel that
writes bf16. Where the uint8 images come from is what differs:

- :class:`DeviceLoader` keeps the (subset of the) dataset on the device: nothing moves per step.
- :class:`StreamingLoader` keeps what fits of the subset on the device and gathers the rest of
  each batch from host memory or a memory-mapped file in a background thread, copying it to
  the GPU on a side stream, overlapping the previous step.
- :class:`mlpgrid.data.beton.FfcvLoader` reads an FFCV ``.beton`` file with FFCV's pipeline.

All randomness of step ``s`` of epoch ``e`` comes from generators seeded by ``(seed, e)``
(the order, the MixUp weights) and ``(seed, e, s)`` (crops and flips), so a run that restarts
at any step sees exactly the batches an uninterrupted run would have seen. The device and the
streaming loader yield identical batches.

A worker of a data-parallel trial reads its :class:`Shard` of every batch: the same rows,
crops, flips and MixUp partners the whole batch gives them, gathered and augmented by that
worker alone.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from mlpgrid.data.host_view import device_view


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    crop_padding: int = 0  # random crops of the image padded by this many pixels; 0 = off
    mixup: float = 0.0  # Beta(alpha, alpha) mixing strength; 0 = off


@dataclass(frozen=True)
class Shard:
    """Worker ``rank`` of ``workers``'s part of every batch: rows ``bounds(b)`` of a batch of ``b``
    (parts differ by one row at most; a batch of fewer rows than workers leaves some empty)."""

    rank: int = 0
    workers: int = 1

    def bounds(self, b: int) -> tuple[int, int]:
        return b * self.rank // self.workers, b * (self.rank + 1) // self.workers

    def size(self, b: int) -> int:
        lo, hi = self.bounds(b)
        return hi - lo

    def rows(self, b: int, mixed: bool) -> torch.Tensor | None:
        """The batch positions this worker augments (None: all of them): its own, after the row
        before its first when mixed (MixUp mixes each example with the one before it)."""
        if self.workers == 1:
            return None
        lo, hi = self.bounds(b)
        own = torch.arange(lo, hi)
        return torch.cat([torch.tensor([(lo - 1) % b]), own]) if mixed else own


WHOLE = Shard()  # every row of every batch: one worker's


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, H, W), normalised; bf16 from a compiled CUDA loader, else float32
    labels: torch.Tensor  # int64 (B,)
    mixed_labels: torch.Tensor  # labels of the examples mixed in (== labels without MixUp)
    lam: torch.Tensor | None  # weight of ``labels`` in the loss (a 0-d device tensor); None without MixUp
    whole: int  # rows of the whole batch (more than these in a data-parallel worker's shard)


class Loader(Protocol):
    """What training reads batches from: every loader here, and FFCV's."""

    size: int  # examples
    batch_size: int
    device: torch.device
    out_dtype: torch.dtype  # of the images it hands out

    def __len__(self) -> int:
        """Steps per epoch."""
        ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from step ``start_step`` on: the same whenever asked."""
        ...


def augment(
    source: torch.Tensor,
    idx: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flipped: torch.Tensor,
    lam: torch.Tensor | None,
    mean: torch.Tensor,
    std: torch.Tensor,
    padding: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``source[idx]`` cropped, flipped, normalised and mixed, as one gather and one elementwise pass.

    ``dy``/``dx`` (B,) are crop offsets in ``0..2*padding`` into the zero-padded image and
    ``flipped`` (B,) mirrors the crop window; pixels falling in the padding read as 0 before
    normalisation. With ``lam``, example i becomes ``lam * x_i + (1 - lam) * x_{i-1}``: the batch
    order is random, so its roll by one is a random partner. ``mean``/``std`` are (1, C, 1, 1)
    on the 0..255 scale.
    """
    _, c, h, w = source.shape
    rows = torch.arange(h, device=source.device) + dy[:, None] - padding  # (B, H)
    cols = torch.arange(w, device=source.device) + dx[:, None] - padding  # (B, W)
    cols = torch.where(flipped[:, None], cols.flip(1), cols)
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    channel = torch.arange(c, device=source.device)[None, :, None, None]
    pixels = source[
        idx[:, None, None, None],
        channel,
        rows.clamp(0, h - 1)[:, None, :, None],
        cols.clamp(0, w - 1)[:, None, None, :],
    ]
    x = (torch.where(inside, pixels, 0).float() - mean) / std
    if lam is not None:
        x = lam * x + (1 - lam) * x.roll(1, dims=0)
    return x.to(out_dtype)


_compiled_augment: Callable[..., torch.Tensor] | None = None


def _fused_augment() -> Callable[..., torch.Tensor]:
    global _compiled_augment
    if _compiled_augment is None:
        _compiled_augment = torch.compile(augment, dynamic=False)
    return _compiled_augment


CONSTANT_STD = 1e-6  # a channel's std (0..1 scale) at or below which it is constant


class _Loader:
    """What all loaders share: the order, the random augmentation parameters, :func:`augment`."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        seed: int = 0,
        augmentation: Augmentation = Augmentation(),
        shuffle: bool = True,
        compile: bool = False,
        shard: Shard = WHOLE,
    ):
        self.size = size
        self.shard = shard
        self._shard_rows: dict[int, torch.Tensor | None] = {}  # by batch size: see shard_rows
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.aug = augmentation
        self.shuffle = shuffle
        shape = (1, -1, 1, 1)
        self.mean = (torch.tensor(mean) * 255).reshape(shape).to(device)
        # A constant channel carries nothing; divided by its std of 0 it made every loss NaN. Its
        # std comes out of channel_stats as rounding error (1e-8), far below any real channel's
        # (a pixel level is 0.004 of the 0..1 scale).
        self.std = (torch.tensor([s if s > CONSTANT_STD else 1.0 for s in std]) * 255).reshape(shape).to(device)
        fused = compile and device.type == "cuda"
        self._augment = _fused_augment() if fused else augment
        self.out_dtype = torch.bfloat16 if fused else torch.float32

    def __len__(self) -> int:
        """Steps per epoch: every example once, the last batch possibly smaller."""
        return -(-self.size // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """Positions 0..size-1 in the order epoch ``epoch`` visits them (on the CPU)."""
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g)

    def mixup_weights(self, epoch: int) -> torch.Tensor | None:
        """The MixUp weight of every step of the epoch, on the device: one copy per epoch, none per step."""
        if self.aug.mixup <= 0:
            return None
        a = self.aug.mixup
        lams = [np.random.default_rng(derive_seed(self.seed, epoch, s)).beta(a, a) for s in range(len(self))]
        return torch.tensor(lams, dtype=torch.float32).to(self.device)

    def shard_rows(self, b: int) -> torch.Tensor | None:
        """The positions of a batch of ``b`` this loader gathers, on its device (None: all; see
        :meth:`Shard.rows`): made once per batch size, not at every step."""
        if b not in self._shard_rows:
            rows = self.shard.rows(b, self.aug.mixup > 0)
            self._shard_rows[b] = None if rows is None else rows.to(self.device)
        return self._shard_rows[b]

    def batch(
        self,
        source: torch.Tensor,
        idx: torch.Tensor,
        labels: torch.Tensor,
        epoch: int,
        step: int,
        lams: torch.Tensor | None,
    ) -> Batch:
        """Augment ``source[idx]`` as (this loader's shard of) step ``step`` of ``epoch``:
        ``labels`` are the whole batch's, in batch order; ``idx`` the rows of :meth:`shard_rows`."""
        b = len(labels)
        zeros = torch.zeros(b, dtype=torch.long, device=self.device)
        dy = dx = zeros
        flipped = torch.zeros(b, dtype=torch.bool, device=self.device)
        if self.aug.flip or self.aug.crop_padding:
            g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, epoch, step))
            span = 2 * self.aug.crop_padding + 1
            if self.aug.crop_padding:
                dy = torch.randint(0, span, (b,), device=self.device, generator=g)
                dx = torch.randint(0, span, (b,), device=self.device, generator=g)
            if self.aug.flip:
                flipped = torch.rand(b, device=self.device, generator=g) < 0.5
        lam = None if lams is None else lams[step]
        rows = self.shard_rows(b)
        if rows is not None:  # the whole batch's draws, this shard's rows
            dy, dx, flipped = dy[rows], dx[rows], flipped[rows]
        x = self._augment(source, idx, dy, dx, flipped, lam, self.mean, self.std, self.aug.crop_padding, self.out_dtype)
        mixed_labels = labels if lam is None else labels.roll(1, dims=0)
        if rows is not None:
            lo, hi = self.shard.bounds(b)
            x = x[len(x) - (hi - lo) :]  # without the partner row gathered for the first example's MixUp
            labels, mixed_labels = labels[lo:hi], mixed_labels[lo:hi]
        return Batch(x, labels, mixed_labels, lam, b)


class DeviceLoader(_Loader):
    """The whole (subset of the) dataset on the device as uint8; a batch is one fused gather."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, **kwargs):
        super().__init__(len(labels), batch_size, **kwargs)
        self.images = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).to(self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from step ``start_step`` on."""
        order = self.order(epoch).to(self.device)
        lams = self.mixup_weights(epoch)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            rows = self.shard_rows(len(idx))
            yield self.batch(self.images, idx if rows is None else idx[rows], self.labels[idx], epoch, step, lams)


RESIDENT_COPY_BYTES = 1 << 30  # the resident images go to the device in parts of this size


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class StreamingLoader(_Loader):
    """Batches gathered on the host (RAM or a memory-mapped file) and sent to the device ahead of
    use, but for the first ``resident`` examples of the subset, which stay on the device.

    ``images`` may be a whole memory-mapped split; ``subset`` picks the examples of this trial.
    A background thread starts each batch's streamed examples on their way ahead of use, on a
    side CUDA stream: where ``images`` can be registered with CUDA (see
    :mod:`mlpgrid.data.host_view`) the device gathers them from host memory itself
    (:mod:`mlpgrid.data.row_gather`); otherwise
    ``threads`` CPU threads gather them, in sorted row order (sequential reads from the file),
    into pinned memory, which is then copied. On the device they join the batch's resident
    examples, and the batch is put in visiting order by the gather inside :func:`augment`: the
    order and the augmentation are those of the :class:`DeviceLoader`, whatever is resident.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, subset: np.ndarray | None = None,
                 resident: int = 0, prefetch: int = 3, threads: int | None = None, host_view: bool = True,
                 **kwargs):  # fmt: skip
        subset = np.arange(len(labels)) if subset is None else np.asarray(subset)
        super().__init__(len(subset), batch_size, **kwargs)
        self.images = images
        self.subset = subset
        self.labels = torch.from_numpy(np.ascontiguousarray(labels[subset])).to(self.device)
        self.resident = min(resident, len(subset))
        # Position p < resident holds row subset[p]; copied a part at a time, never all of it on the host.
        self.resident_images = torch.empty((self.resident, *images.shape[1:]), dtype=torch.uint8, device=self.device)
        step = max(1, RESIDENT_COPY_BYTES // max(1, int(np.prod(images.shape[1:]))))
        for start in range(0, self.resident, step):
            rows = subset[start : min(start + step, self.resident)]
            self.resident_images[start : start + len(rows)] = torch.from_numpy(np.take(images, rows, axis=0))
        self.prefetch = prefetch
        self.threads = threads or usable_cores()
        self.cuda = self.device.type == "cuda"
        streams = self.resident < len(subset)
        self.host_view = device_view(images, self.device) if self.cuda and streams and host_view else None

    @property
    def resident_bytes(self) -> int:
        return self.resident_images.numel()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = self.order(epoch)
        order_on_device = order.to(self.device)  # for the labels: no host-to-device copy per step
        lams = self.mixup_weights(epoch)
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(order, start_step, ready, stop), daemon=True)
        thread.start()
        try:
            for step in range(start_step, len(self)):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                source, where, kept, copied = item
                if copied is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(copied)
                    for tensor in (source, where, kept):
                        tensor.record_stream(current)
                if self.resident:
                    source = torch.cat([self.resident_images[kept], source])
                positions = order_on_device[step * self.batch_size : (step + 1) * self.batch_size]
                yield self.batch(source, where, self.labels[positions], epoch, step, lams)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(0.01)

    def _gather(self, rows: np.ndarray, out: np.ndarray, pool: ThreadPoolExecutor) -> None:
        """``out[:] = images[rows]``, in ``threads`` parts at once (numpy copies without holding the GIL)."""
        parts = [p for p in np.array_split(np.arange(len(rows)), self.threads) if len(p)]
        list(pool.map(lambda p: np.take(self.images, rows[p], axis=0, out=out[p[0] : p[-1] + 1]), parts))

    def _produce(self, order: torch.Tensor, start_step: int, ready: queue.Queue, stop: threading.Event) -> None:
        if self.host_view is not None:
            from mlpgrid.data.row_gather import gather_rows  # Triton: shipped with every CUDA build of torch
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        pool = ThreadPoolExecutor(self.threads)
        try:
            for step in range(start_step, len(self)):
                if stop.is_set():
                    return
                positions = order[step * self.batch_size : (step + 1) * self.batch_size].numpy()
                shard = self.shard.rows(len(positions), self.aug.mixup > 0)  # on the host, in this thread
                if shard is not None:
                    positions = positions[shard.numpy()]
                on_device = positions < self.resident
                rows = self.subset[positions[~on_device]]
                # The batch's source is its resident images (``kept``, in visiting order), then
                # ``gathered``, the streamed ones in ``streamed_order``; ``where``: visiting
                # position -> row of that source. Made here, so the step waits on no copy back.
                if self.host_view is None:
                    streamed_order = np.argsort(rows, kind="stable")
                    gathered = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8,
                                           pin_memory=self.cuda)  # fmt: skip
                    self._gather(rows[streamed_order], gathered.numpy(), pool)
                else:
                    streamed_order, gathered = np.arange(len(rows)), torch.from_numpy(rows)
                kept = positions[on_device]
                where = np.empty(len(positions), dtype=np.int64)
                where[on_device] = np.arange(len(kept))
                where[~on_device] = len(kept) + np.argsort(streamed_order)
                where_t, kept_t = torch.from_numpy(where), torch.from_numpy(kept)
                copied = None
                if self.cuda:
                    with torch.cuda.stream(stream):
                        where_t, kept_t, gathered = (t.pin_memory().to(self.device, non_blocking=True)
                                                     for t in (where_t, kept_t, gathered))  # fmt: skip
                        if self.host_view is not None:  # ``gathered`` holds the rows: read them from the host
                            gathered = gather_rows(self.host_view, gathered)
                        copied = torch.cuda.Event()
                        copied.record(stream)
                ready.put((gathered, where_t, kept_t, copied))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            ready.put(e)
        finally:
            pool.shutdown()


def make_loader(
    images: np.ndarray, labels: np.ndarray, subset: np.ndarray | None, batch_size: int, *, budget_bytes: float,
    host_view: bool = True, **kwargs,
) -> DeviceLoader | StreamingLoader:  # fmt: skip
    """A :class:`DeviceLoader` when the selected images fit in ``budget_bytes``, else a
    :class:`StreamingLoader` keeping as many of them on the device as do (``host_view``: see it)."""
    count = len(labels) if subset is None else len(subset)
    per_image = int(np.prod(images.shape[1:]))
    if count * per_image <= budget_bytes:
        chosen = images if subset is None else images[np.asarray(subset)]
        return DeviceLoader(chosen, labels if subset is None else labels[subset], batch_size, **kwargs)
    resident = int(max(budget_bytes, 0) // per_image)
    return StreamingLoader(images, labels, batch_size, subset=subset, resident=resident, host_view=host_view, **kwargs)


def device_bytes(loader: object) -> int:
    """Bytes of images ``loader`` keeps on its device."""
    if isinstance(loader, DeviceLoader):
        return loader.images.numel()
    return loader.resident_bytes if isinstance(loader, StreamingLoader) else 0


def resident_share(loader: object) -> float:
    """The part of ``loader``'s examples kept on its device (the rest is streamed)."""
    if isinstance(loader, DeviceLoader):
        return 1.0
    return loader.resident / loader.size if isinstance(loader, StreamingLoader) else 0.0
