"""The device a trial trains on: which one, how much of it may hold data, and its bf16 matmul
rate, the yardstick of a trial's model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import math

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Of a trial's share of GPU memory, what neither its model nor its data may take: the CUDA
# context, cuBLAS and compiler workspaces, the streaming loader's batches in flight and the
# caching allocator's fragmentation. On the H200 (139 GiB) a budget of 90% less the measured
# model trained B-6/Wi-256 and B-12/Wi-1024 at batch 16384 with 2M images streaming beside it.
RESERVED_SHARE = 0.1


def default_data_budget(device: torch.device, gpu_share: float = 1.0, model_bytes: float = 0.0) -> float:
    """Bytes of images a trial may keep on ``device``: what its share of a GPU's memory spares
    beside ``model_bytes`` (what training its model takes, measured) and a reserve; 8 GiB of
    host RAM on CPU."""
    if device.type == "cuda":
        share = gpu_share * torch.cuda.get_device_properties(device).total_memory
        return max(0.0, (1 - RESERVED_SHARE) * share - model_bytes)
    return 8 * 2**30


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
