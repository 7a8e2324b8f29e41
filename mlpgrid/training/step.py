"""One optimizer step, one evaluation pass and the learning-rate decay: what pre-training and
fine-tuning share."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

EVAL_BATCH = 2048  # evaluation keeps no activations for a backward pass: larger batches fit


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on a GPU (fp32 master weights); full precision on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def cosine(progress: float) -> float:
    """The cosine decay's factor of the peak learning rate, ``progress`` from 0 (start) to 1 (end)."""
    return 0.5 * (1 + math.cos(math.pi * progress))


def compile_for_training(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """``torch.compile(model)`` for batches shaped like ``example``, compiled now; returns it
    and the seconds compiling took.

    Compiling here, on one forward and backward pass whose gradients are then dropped, keeps
    compile time out of the first epoch's speed. Shapes are static: a batch of another shape
    (an epoch's last, smaller one) should go through ``model`` itself rather than trigger a
    second compilation.
    """
    started = time.perf_counter()
    compiled = torch.compile(model, dynamic=False)
    with autocast(example.device):
        compiled(example).float().sum().backward()
    model.zero_grad(set_to_none=True)
    if example.device.type == "cuda":
        torch.cuda.synchronize(example.device)
    return compiled, time.perf_counter() - started  # type: ignore[return-value]  # a Module, as it wraps one


Loss = Callable[[torch.Tensor, Any, float], torch.Tensor]


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16 logits (autocast's) in fp32 for the loss; fp32 and fp64 as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def recipe_loss(logits: torch.Tensor, batch: Any, label_smoothing: float) -> torch.Tensor:
    """The recipe's loss: cross-entropy with label smoothing, MixUp-weighted over the batch's two
    labels when mixed, as ``F.cross_entropy`` computes it (one pass over the logits each)."""
    logits = _at_least_fp32(logits)
    loss = F.cross_entropy(logits, batch.labels, label_smoothing=label_smoothing)
    if batch.lam is not None:
        mixed = F.cross_entropy(logits, batch.mixed_labels, label_smoothing=label_smoothing)
        loss = batch.lam * loss + (1 - batch.lam) * mixed
    return loss


def soft_target_losses(logits: torch.Tensor, labels: torch.Tensor, mixed_labels: torch.Tensor,
                       lam: torch.Tensor | None, label_smoothing: float | torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Each example's loss of :func:`recipe_loss` as one expression over its logits (..., B, C):
    with label smoothing s, the cross-entropy of label y is ``logsumexp(z) - (1 - s) z_y - s
    mean(z)``, so MixUp's weighted pair of them needs one log-sum-exp, two gathers and a mean.
    Compiled, that is one pass that reads the logits in bf16: over 10,450 classes
    :func:`recipe_loss` writes them in fp32 and takes two log-softmaxes (and their gradients) of
    them. Leading dimensions are members of a fused stack (``label_smoothing`` then broadcasts,
    one per member); ``labels`` (B,) are every member's."""
    z = _at_least_fp32(logits)

    def picked(y: torch.Tensor) -> torch.Tensor:
        return z.gather(-1, y.expand(z.shape[:-1])[..., None]).squeeze(-1)

    target = picked(labels) if lam is None else lam * picked(labels) + (1 - lam) * picked(mixed_labels)
    return torch.logsumexp(z, -1) - (1 - label_smoothing) * target - label_smoothing * z.mean(-1)


def soft_target_loss(logits: torch.Tensor, labels: torch.Tensor, mixed_labels: torch.Tensor,
                     lam: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:  # fmt: skip
    """The batch's mean of :func:`soft_target_losses`: :func:`recipe_loss`, in one pass."""
    return soft_target_losses(logits, labels, mixed_labels, lam, label_smoothing).mean()


@functools.cache
def _compiled_soft_target_loss() -> Callable[..., torch.Tensor]:
    return torch.compile(soft_target_loss, dynamic=False)


def compiled_recipe_loss(logits: torch.Tensor, batch: Any, label_smoothing: float) -> torch.Tensor:
    """:func:`soft_target_loss` compiled: the loss of a compiled trial's full batches."""
    return _compiled_soft_target_loss()(logits, batch.labels, batch.mixed_labels, batch.lam, label_smoothing)


def compile_recipe_loss(
    batch_size: int, classes: int, mixed: bool, label_smoothing: float, device: torch.device
) -> float:
    """Compile :func:`compiled_recipe_loss` for full batches now, on zeros; the seconds it took."""
    started = time.perf_counter()
    logits = torch.zeros((batch_size, classes), dtype=torch.bfloat16, device=device, requires_grad=True)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    lam = torch.zeros((), device=device) if mixed else None
    _compiled_soft_target_loss()(logits, labels, labels, lam, label_smoothing).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any, label_smoothing: float,
               clip_grad: float, loss_fn: Loss = recipe_loss, loss_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """One optimizer step on ``batch`` (MixUp-weighted when mixed); returns the loss, on the
    device. The gradient is that of the loss times ``loss_scale`` (a data-parallel worker's:
    :meth:`mlpgrid.training.parallel.Workers.loss_scale`); a worker's empty shard gives none, as
    its part of the workers' average."""
    with autocast(batch.labels.device):
        logits = model(batch.images)
    loss = loss_fn(logits, batch, label_smoothing) if len(batch.labels) else logits.float().sum()
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any) -> tuple[float, float]:
    """(mean cross-entropy, top-1 error) over the loader's examples."""
    model.eval()
    loss_sum = torch.zeros((), device=loader.device)
    wrong = torch.zeros((), device=loader.device, dtype=torch.long)
    for batch in loader.epoch(0):
        with autocast(loader.device):
            logits = model(batch.images)
        loss_sum += F.cross_entropy(logits.float(), batch.labels, reduction="sum")
        wrong += (logits.argmax(1) != batch.labels).sum()
    n = loader.size
    return loss_sum.item() / n, wrong.item() / n
