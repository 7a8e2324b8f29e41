"""A loader that keeps the (subset of the) dataset on the training device as uint8.

Every batch is cut, cropped, flipped, normalised and mixed with batched tensor ops on the
device. All randomness of step ``s`` of epoch ``e`` comes from generators seeded by
``(seed, e)`` (the order) and ``(seed, e, s)`` (the augmentation), so a run that restarts
at any step sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    crop_padding: int = 0  # random crops of the image padded by this many pixels; 0 = off
    mixup: float = 0.0  # Beta(alpha, alpha) mixing strength; 0 = off


@dataclass
class Batch:
    images: torch.Tensor  # float32 (B, C, H, W), normalised
    labels: torch.Tensor  # int64 (B,)
    mixed_labels: torch.Tensor  # labels of the examples mixed in (== labels without MixUp)
    lam: float  # weight of ``labels`` in the loss


class DeviceLoader:
    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        mean: torch.Tensor,
        std: torch.Tensor,
        device: torch.device,
        seed: int = 0,
        augmentation: Augmentation = Augmentation(),
        shuffle: bool = True,
    ):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.aug = augmentation
        self.shuffle = shuffle
        shape = (1, -1, 1, 1)
        self.mean = (mean * 255).reshape(shape).to(device)
        self.std = (std * 255).reshape(shape).to(device)

    def __len__(self) -> int:
        """Steps per epoch: every example once, the last batch possibly smaller."""
        return -(-len(self.labels) // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.labels), device=self.device)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(len(self.labels), generator=g).to(self.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from step ``start_step`` on."""
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self._batch(idx, epoch, step)

    def _batch(self, idx: torch.Tensor, epoch: int, step: int) -> Batch:
        x, y = self.images[idx], self.labels[idx]
        step_seed = derive_seed(self.seed, epoch, step)
        if self.aug.flip or self.aug.crop_padding:
            g = torch.Generator(device=self.device).manual_seed(step_seed)
            x = crop_and_flip(x, self.aug.crop_padding, self.aug.flip, g)
        x = (x.float() - self.mean) / self.std
        if self.aug.mixup <= 0:
            return Batch(x, y, y, 1.0)
        lam = float(np.random.default_rng(step_seed).beta(self.aug.mixup, self.aug.mixup))
        # The batch is already in random order, so its roll by one is a random partner.
        x = lam * x + (1 - lam) * x.roll(1, dims=0)
        return Batch(x, y, y.roll(1, dims=0), lam)


def crop_and_flip(x: torch.Tensor, padding: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Per-example random crops of the zero-padded images and random horizontal flips.

    One gather does both: the flip reverses the column indices of the crop window.
    """
    b, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
        rows = rows + torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=g)
        cols = cols + torch.randint(0, 2 * padding + 1, (b, 1), device=dev, generator=g)
    if flip:
        flipped = torch.rand(b, 1, device=dev, generator=g) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def channel_stats(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale."""
    x = torch.from_numpy(images).float().div_(255)
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
