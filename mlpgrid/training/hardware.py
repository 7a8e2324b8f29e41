"""The device a trial trains on: which one, how much of it may hold data, and its bf16 matmul
rate, the yardstick of a trial's model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import math

import torch

from mlpgrid import policy


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_data_budget(device: torch.device, gpu_share: float = 1.0, model_bytes: float = 0.0) -> float:
    """Bytes of images a trial may keep on ``device``: on a GPU what its share of the GPU's
    memory spares beside ``model_bytes`` (:func:`mlpgrid.policy.gpu_data_budget`); on the CPU
    :data:`mlpgrid.policy.CPU_DATA_BUDGET_BYTES` of host RAM."""
    if device.type == "cuda":
        return policy.gpu_data_budget(torch.cuda.get_device_properties(device).total_memory, gpu_share, model_bytes)
    return policy.CPU_DATA_BUDGET_BYTES


@functools.cache
def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """The bf16 rate (TFLOP/s) of an ``n``-square matrix multiply on a CUDA ``device``.

    The fastest of ``repeats`` timed multiplies: a GPU shared with other trials still runs
    some of them alone, so the figure stays the hardware's, not what is left of it.
    """
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b  # warm-up: cuBLAS picks its kernel
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best / 1e12
