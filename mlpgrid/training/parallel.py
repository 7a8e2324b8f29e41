"""Data-parallel trials: one trial trained by several workers, each on its shard of every batch.

Worker ``rank`` of ``count`` (one process per GPU, set up by Ray Train's ``TorchTrainer``:
:mod:`mlpgrid.execution.ray_tune`) reads its :class:`~mlpgrid.data.loader.Shard` of each batch
(the rows, crops, flips and MixUp partners the whole batch gives them) and steps the model
through ``DistributedDataParallel``. Each worker scales its shard's mean loss by its share of the
batch times ``count``, so the average of the workers' gradients that DDP takes is the whole
batch's mean gradient, and the epoch's loss is summed over the workers: the trial computes
what it computes on one worker, up to the order of floating-point sums. The lead (rank 0) does
what a trial alone does besides training — evaluation, checkpoints, stages, its MLflow run —
and every worker resumes from the lead's checkpoints. Dropout masks are drawn per worker, and
BatchNorm (``norm: batchnorm``, RepMLPNet) normalises each worker's shard by its own statistics
(DDP's default; the running statistics are the lead's): such a trial matches its one-worker self
in distribution only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlpgrid.data.loader import WHOLE, Shard


@dataclass(frozen=True)
class Workers:
    """This process's place among a trial's workers; ``Workers()`` is a trial alone."""

    rank: int = 0
    count: int = 1

    @property
    def lead(self) -> bool:
        """The worker that evaluates, checkpoints and records (every worker of a trial alone)."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.count) if self.count > 1 else WHOLE

    def wrap(self, network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What a step goes through: the network alone, or DDP over the workers' process group."""
        if self.count == 1:
            return network
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)

    def loss_scale(self, rows: int, batch_rows: int) -> float:
        """The factor of a shard's mean loss (``rows`` of a batch of ``batch_rows``) that makes
        DDP's average of the workers' gradients the whole batch's mean gradient."""
        return rows * self.count / batch_rows

    def add_up(self, sums: torch.Tensor, counts: list[int], *,
               on_lead: bool = False) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
        """The loss sums (one per member) and counts (of images) summed over the workers: every
        worker gets them, or with ``on_lead`` the lead alone, the others zeros (their sum over the
        workers is unchanged, and the lead holds it whole, as its checkpoint records it)."""
        if self.count == 1:
            return sums, counts
        packed = torch.cat([sums.double(), torch.tensor(counts, dtype=torch.float64, device=sums.device)])
        total = self._sum(packed)
        if on_lead and not self.lead:
            total.zero_()
        return total[: len(sums)].to(sums.dtype), [round(c) for c in total[len(sums) :].tolist()]

    def _sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
        return values

    def check_same(self, epoch: int, step: int, device: torch.device) -> None:
        """Raise unless every worker resumed at (``epoch``, ``step``): they read the same
        checkpoints, which a second writer could have changed between their reads."""
        if self.count == 1:
            return
        position = torch.tensor([epoch, step], dtype=torch.float64, device=device)
        if not torch.equal(self._sum(position), position * self.count):
            raise RuntimeError(f"the workers resumed at different positions (this one at epoch {epoch} step {step}): "
                               "were the trial's checkpoints changed meanwhile?")  # fmt: skip


ALONE = Workers()
