"""The paper's Table 7 on the current device: parameters, latency at batch 1, throughput at the
best batch size, FLOPs per forward."""

from __future__ import annotations

import statistics
import time

import torch

from mlpgrid.models import architecture, networks
from mlpgrid.training.step import autocast


def _seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass of ``x``."""
    times = []
    with torch.no_grad(), autocast(x.device):
        for _ in range(3):  # warm-up: kernels chosen, memory allocated
            model(x)
        for _ in range(repeats):
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            started = time.perf_counter()
            model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def efficiency(name: str, resolution: int, channels: int, classes: int, device: torch.device,
               batch_sizes: tuple[int, ...], repeats: int = 20) -> list[dict[str, float | str]]:  # fmt: skip
    """Inference figures of one model (bf16 autocast on a GPU, float32 on the CPU); of a
    RepMLPNet also its merged form's (the pure MLP it is evaluated and deployed as)."""
    cfg = architecture.config_for(name, channels * resolution * resolution, classes, image=(channels, resolution))
    model = networks.build(cfg).to(device).eval()
    forms = [(cfg.name, model)]
    if isinstance(model, networks.RepMLPNet):
        forms.append((f"{cfg.name} merged", networks.inject_locality(model)))
    shape = (channels, resolution, resolution)
    return [_figures(label, form, shape, device, batch_sizes, repeats) for label, form in forms]


def _figures(label: str, model: networks.Network, shape: tuple[int, int, int], device: torch.device,
             batch_sizes: tuple[int, ...], repeats: int) -> dict[str, float | str]:  # fmt: skip
    cfg = model.cfg
    latency = _seconds(model, torch.randn(1, *shape, device=device), repeats)
    rates = {b: b / _seconds(model, torch.randn(b, *shape, device=device), repeats) for b in batch_sizes}
    best = max(rates, key=lambda b: rates[b])
    return {
        "model": label,
        "params": architecture.count_params(cfg),
        "forward_flops": architecture.forward_flops(cfg),
        "latency_ms": 1e3 * latency,
        "images_per_s": rates[best],
        "best_batch": best,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
