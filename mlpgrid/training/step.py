"""One optimizer step, one evaluation pass and the learning-rate decay: what pre-training and
fine-tuning share."""

from __future__ import annotations

import math
import time
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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any, label_smoothing: float,
               clip_grad: float) -> torch.Tensor:  # fmt: skip
    """One optimizer step on ``batch`` (MixUp-weighted when mixed); returns the loss, on the device."""
    with autocast(batch.labels.device):
        logits = model(batch.images).float()
    loss = F.cross_entropy(logits, batch.labels, label_smoothing=label_smoothing)
    if batch.lam is not None:
        mixed = F.cross_entropy(logits, batch.mixed_labels, label_smoothing=label_smoothing)
        loss = batch.lam * loss + (1 - batch.lam) * mixed
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
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
