"""What follows pre-training: linear probes, fine-tuning, and evaluation with test-time augmentation.

Each stage reads its downstream dataset at the pre-training resolution and channel count,
normalised by that dataset's own statistics. Its result is written to ``stages.json`` in the
trial's stage directory when it ends, so a resumed trial runs only the stages it has not
finished; fine-tuning also checkpoints every epoch. Probe features are computed once per
trained model and dataset and kept there too.

Compute C counts pre-training only (the paper's C); each stage records its own compute.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lion_pytorch import Lion

from mlpgrid import data
from mlpgrid.data.loader import Augmentation, derive_seed, device_bytes, make_loader
from mlpgrid.data.subset import proportional_order, split_off
from mlpgrid.grid import metrics
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.models import architecture, networks
from mlpgrid.training.checkpoint import CheckpointDir, load_tensors
from mlpgrid.training.step import EVAL_BATCH, autocast, cosine, evaluate, train_step

log = logging.getLogger(__name__)

PROBE_BATCH = 1024
FINETUNE_BATCH = 512
TTA_PADDING = 4  # crops for test-time augmentation when the trial itself used none
_PROBE_STREAM, _FINETUNE_STREAM, _TTA_STREAM = 11, 12, 13


class StageDir:
    """A trial's stage directory: finished stages' results, feature caches, fine-tuning checkpoints."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.file = path / "stages.json"

    def results(self) -> dict[str, dict[str, float]]:
        """The finished stages' results; none (so they run again) if the file is damaged."""
        if not self.file.is_file():
            return {}
        try:
            results = json.loads(self.file.read_bytes())
        except ValueError:  # not JSON (nor UTF-8): a damaged file
            results = None
        if not isinstance(results, dict) or not all(isinstance(r, dict) for r in results.values()):
            log.warning("%s: damaged; its stages run again", self.file)
            return {}
        return results

    def record(self, name: str, result: dict[str, float]) -> None:
        results = self.results() | {name: result}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, self.file)


def _stage_arrays(cfg: TrialConfig, datasets: data.Datasets, name: str) -> data.ImageArrays:
    """A dataset at the pre-training resolution and channels (each read once per trial)."""
    pretraining = cfg.dataset_info
    arrays = datasets.load(name, cfg.resolution or pretraining.resolution, cfg.channels or pretraining.channels)
    if arrays.beton is not None:
        raise ValueError(f"{name} is stored as FFCV files; probes, fine-tuning and TTA read arrays: prepare it "
                         "with --format npy")  # fmt: skip
    return arrays


@torch.no_grad()
def _features(model: networks.Network, images: np.ndarray, arrays: data.ImageArrays,
              device: torch.device) -> torch.Tensor:  # fmt: skip
    model.eval()
    loader = make_loader(images, np.zeros(len(images), np.int64), None, EVAL_BATCH, budget_bytes=float("inf"),
                         mean=arrays.mean, std=arrays.std, device=device, shuffle=False)  # fmt: skip
    parts = []
    for batch in loader.epoch(0):
        with autocast(device):
            parts.append(model.features(batch.images).float())
    return torch.cat(parts)


def probe_examples(cfg: TrialConfig, dataset: str, labels: np.ndarray) -> np.ndarray:
    """The probe's training examples: on the pre-training dataset, the held-out split pre-training
    never draws from; elsewhere a class-proportional ``probe_examples`` of them (or all)."""
    if dataset == cfg.dataset:
        assert cfg.probe_examples is not None, "a probe of the pre-training data says how many examples it holds out"
        return split_off(labels, cfg.probe_examples)[1]
    order = proportional_order(labels, derive_seed(cfg.seed, _PROBE_STREAM))
    return np.sort(order[: cfg.probe_examples or len(order)])


_FEATURE_KEYS = ("train_x", "train_y", "test_x", "test_y")


def _cached_features(cache: Path, device: torch.device) -> list[torch.Tensor] | None:
    """The probe's cached features, or None where there are none or they are damaged (then
    they are computed again and the cache replaced)."""
    if not cache.is_file():
        return None
    try:
        state = load_tensors(cache, device)
        if set(state) != set(_FEATURE_KEYS) or not all(isinstance(state[k], torch.Tensor) for k in _FEATURE_KEYS):
            raise ValueError(f"{cache}: not a feature cache (keys {sorted(state)})")
        tensors: list[torch.Tensor] = [state[k] for k in _FEATURE_KEYS]
        train_x, train_y, test_x, test_y = tensors
        if train_x.ndim != 2 or len(train_x) != len(train_y) or test_x.shape[1:] != train_x.shape[1:] or len(
                test_x) != len(test_y):  # fmt: skip
            raise ValueError(f"{cache}: features and labels do not match")
    except ValueError as e:
        log.warning("%s; computing the features again", e)
        return None
    return tensors


def linear_probe(model: networks.Network, cfg: TrialConfig, dataset: str, datasets: data.Datasets, stage_dir: StageDir,
                 device: torch.device) -> dict[str, float]:  # fmt: skip
    """Train a linear classifier (Lion, ``probe_lr``, ``probe_epochs``) on frozen features."""
    cache = stage_dir.path / f"features-{dataset}.pt"
    features = _cached_features(cache, device)
    if features is not None:
        train_x, train_y, test_x, test_y = features
    else:
        arrays = _stage_arrays(cfg, datasets, dataset)
        chosen = probe_examples(cfg, dataset, arrays.train_labels)
        train_x = _features(model, arrays.images("train")[chosen], arrays, device)
        test_x = _features(model, arrays.images("test"), arrays, device)
        train_y = torch.from_numpy(arrays.train_labels[chosen]).to(device)
        test_y = torch.from_numpy(arrays.test_labels).to(device)
        tmp = cache.with_suffix(".tmp")
        torch.save({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}, tmp)
        os.replace(tmp, cache)
    classes = data.info(dataset).num_classes
    torch.manual_seed(derive_seed(cfg.seed, _PROBE_STREAM))
    head = torch.nn.Linear(train_x.shape[1], classes).to(device)
    optimizer = Lion(head.parameters(), lr=cfg.probe_lr)
    n = len(train_y)
    for epoch in range(cfg.probe_epochs):
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, _PROBE_STREAM, epoch))
        for idx in torch.randperm(n, generator=g).to(device).split(PROBE_BATCH):
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = head(test_x)
        error = (logits.argmax(1) != test_y).float().mean().item()
        test_loss = F.cross_entropy(logits, test_y).item()
    body_flops = architecture.forward_flops(cfg.model_config()) - train_x.shape[1] * cfg.dataset_info.num_classes
    compute = body_flops * (n + len(test_y)) + 3.0 * train_x.shape[1] * classes * n * cfg.probe_epochs
    return {"error": error, "loss": test_loss, "examples": n, "compute": compute}


@torch.no_grad()
def evaluate_tta(model: torch.nn.Module, arrays: data.ImageArrays, cfg: TrialConfig, device: torch.device,
                 budget_bytes: float) -> float:  # fmt: skip
    """Top-1 error of the logits averaged over ``cfg.tta`` random crops (and flips) per test image."""
    model.eval()
    aug = Augmentation(flip=True, crop_padding=cfg.crop_padding or TTA_PADDING)
    total = torch.zeros((), device=device)
    for k in range(cfg.tta):
        loader = make_loader(arrays.images("test"), arrays.test_labels, None, EVAL_BATCH, budget_bytes=budget_bytes,
                             mean=arrays.mean, std=arrays.std, device=device, shuffle=False, augmentation=aug,
                             seed=derive_seed(cfg.seed, _TTA_STREAM, k))  # fmt: skip
        parts = []
        for batch in loader.epoch(0):
            with autocast(device):
                parts.append(model(batch.images).float())
        logits = torch.cat(parts)
        total = total + logits
    labels = torch.from_numpy(arrays.test_labels).to(device)
    return (total.argmax(1) != labels).float().mean().item()


def finetune(
    model: networks.Network,
    cfg: TrialConfig,
    dataset: str,
    datasets: data.Datasets,
    stage_dir: StageDir,
    device: torch.device,
    budget_bytes: float,
) -> dict[str, float]:
    """Fine-tune a copy of the model with a new head: SGD with momentum, ``finetune_lr_head`` for
    the head and ``finetune_lr_body`` for the rest, cosine decay, the trial's flips and crops."""
    arrays = _stage_arrays(cfg, datasets, dataset)
    target = data.info(dataset)
    torch.manual_seed(derive_seed(cfg.seed, _FINETUNE_STREAM))
    net = networks.build(dataclasses.replace(cfg.model_config(), num_classes=target.num_classes))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    net.load_state_dict(body, strict=False)
    net.to(device)
    head = list(net.head.parameters())
    rest = [p for name, p in net.named_parameters() if not name.startswith("head.")]
    groups = [{"params": rest, "lr": cfg.finetune_lr_body}, {"params": head, "lr": cfg.finetune_lr_head}]
    optimizer = torch.optim.SGD(groups, momentum=cfg.momentum)
    base = [g["lr"] for g in optimizer.param_groups]
    loader = make_loader(arrays.images("train"), arrays.train_labels, None, FINETUNE_BATCH, budget_bytes=budget_bytes,
                         mean=arrays.mean, std=arrays.std, device=device, seed=derive_seed(cfg.seed, _FINETUNE_STREAM),
                         augmentation=Augmentation(flip=cfg.flip, crop_padding=cfg.crop_padding))  # fmt: skip
    checkpoints = CheckpointDir(stage_dir.path / f"finetune-{dataset}")
    epoch = 0
    if (state := checkpoints.latest()) is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch = state["epoch"]
    total = cfg.finetune_epochs * len(loader)
    while epoch < cfg.finetune_epochs:
        net.train()
        for i, batch in enumerate(loader.epoch(epoch)):
            factor = cosine((epoch * len(loader) + i) / total)
            for group, lr in zip(optimizer.param_groups, base, strict=True):
                group["lr"] = lr * factor
            loss = train_step(net, optimizer, batch, cfg.label_smoothing, cfg.clip_grad)
        if not math.isfinite(loss.item()):
            raise ValueError(f"fine-tuning on {dataset} diverged in epoch {epoch + 1}: loss {loss.item()}")
        epoch += 1
        checkpoints.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}, epoch, 0)
    left = budget_bytes - device_bytes(loader)  # the test images get what the training images left
    if cfg.tta:
        error = evaluate_tta(net, arrays, cfg, device, left)
    else:
        test = make_loader(arrays.images("test"), arrays.test_labels, None, EVAL_BATCH, budget_bytes=left,
                           mean=arrays.mean, std=arrays.std, device=device, shuffle=False)  # fmt: skip
        error = evaluate(net, test)[1]
    flops = architecture.forward_flops(net.cfg)
    return {"error": error, "examples": len(arrays.train_labels),
            "compute": architecture.compute(flops, len(arrays.train_labels), cfg.finetune_epochs)}  # fmt: skip


def run_stages(
    model: networks.Network,
    cfg: TrialConfig,
    datasets: data.Datasets,
    stage_dir: StageDir,
    device: torch.device,
    budget_bytes: float,
    on_metrics: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Every stage ``cfg`` declares that ``stage_dir`` does not hold yet; returns all their metrics
    (``test_error_tta``, ``<dataset>.linear_probe.error``, ``<dataset>.finetune.error``, ...)."""
    plan: list[tuple[str, Callable[[], dict[str, float]]]] = []
    if cfg.tta:

        def tta() -> dict[str, float]:
            return {"error": evaluate_tta(model, _stage_arrays(cfg, datasets, cfg.dataset), cfg, device, budget_bytes)}

        plan.append((metrics.TTA_STAGE, tta))
    for ds in cfg.probe_datasets:
        probe = functools.partial(linear_probe, model, cfg, ds, datasets, stage_dir, device)
        plan.append((metrics.probe_stage(ds), probe))
    for ds in cfg.finetune_datasets:
        tune = functools.partial(finetune, model, cfg, ds, datasets, stage_dir, device, budget_bytes)
        plan.append((metrics.finetune_stage(ds), tune))
    for name, run in plan:
        if name not in stage_dir.results():
            stage_dir.record(name, run())
    logged: dict[str, float] = {}
    for name, result in stage_dir.results().items():
        logged |= metrics.stage_metrics(name, result)
    if on_metrics:
        on_metrics(logged)
    return logged
