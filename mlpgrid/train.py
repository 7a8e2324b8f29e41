"""One trial, top to bottom: data, model, optimizer, the epoch loop, checkpoints.

``run_trial`` is the function every runner calls, in-process or inside a Ray worker. It
resumes from the newest checkpoint in its directory, so calling it again after a crash
continues the trial exactly where the checkpoint left it: same weights, optimizer state,
RNG state, and the same position in the same data order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlpgrid import data, models, plots
from mlpgrid.bench import matmul_peak_tflops
from mlpgrid.checkpoint import BackgroundSaver, CheckpointDir
from mlpgrid.data.beton import FfcvLoader
from mlpgrid.data.loader import Augmentation, DeviceLoader, StreamingLoader, derive_seed, make_loader
from mlpgrid.data.subset import proportional_subset, split_off
from mlpgrid.models import MLP
from mlpgrid.optim import CompiledLion, make_optimizer
from mlpgrid.spec import TrialConfig
from mlpgrid.stages import StageDir, run_stages
from mlpgrid.step import compile_for_training, evaluate, train_step

log = logging.getLogger(__name__)

EVAL_BATCH = 2048
# Per-epoch timings: they differ between runs of the same trial, unlike everything else.
TIMING_METRICS = ("images_per_s", "epoch_seconds", "tflops", "mfu", "compile_seconds")
# torch.compile takes tens of seconds for a model shape it has not seen (seconds once
# Inductor's on-disk cache holds it) and saves 10-20% of every step on a GPU: it pays from
# about this much training compute (hardware FLOPs; a minute or two of an H100).
COMPILE_PAYS_FLOPS = 2e16

# Separate seed streams, so adding randomness in one place never shifts another.
_INIT_STREAM, _DROPOUT_STREAM = 1, 2


class TrialDiverged(RuntimeError):
    """The training loss stopped being finite."""


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile_pays(cfg: TrialConfig, device: torch.device) -> bool:
    """Whether compiling the model is worth its time for this trial (never on the CPU)."""
    images = cfg.num_examples * cfg.epochs
    return device.type == "cuda" and models.hardware_training_flops(cfg.model_config(), images) >= COMPILE_PAYS_FLOPS


def lr_at(cfg: TrialConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warm-up, then decay."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


Loader = DeviceLoader | StreamingLoader | FfcvLoader


def default_data_budget(device: torch.device, gpu_share: float = 1.0) -> float:
    """Bytes of images a trial may keep on ``device``: 40% of its share of a GPU's memory, 8 GiB
    of host RAM on CPU."""
    if device.type == "cuda":
        return 0.4 * gpu_share * torch.cuda.get_device_properties(device).total_memory
    return 8 * 2**30


def make_loaders(
    arrays: data.ImageArrays, cfg: TrialConfig, device: torch.device, budget_bytes: float
) -> tuple[Loader, Loader]:
    """The trial's training loader (its class-proportional subset, augmented) and test loader."""
    pool = np.arange(len(arrays.train_labels))
    if cfg.probes_itself:  # the probe's examples stay unseen
        pool, _ = split_off(arrays.train_labels, cfg.probe_examples)
    subset = pool[proportional_subset(arrays.train_labels[pool], cfg.num_examples, cfg.seed)]
    common = dict(mean=arrays.mean, std=arrays.std, device=device, compile=device.type == "cuda")
    augmentation = Augmentation(flip=cfg.flip, crop_padding=cfg.crop_padding, mixup=cfg.mixup)
    if arrays.beton is not None:
        train = FfcvLoader(arrays.beton["train"], arrays.train_labels, cfg.batch_size, subset=subset, seed=cfg.seed,
                           augmentation=augmentation, **common)  # fmt: skip
        test = FfcvLoader(arrays.beton["test"], arrays.test_labels, EVAL_BATCH, shuffle=False, **common)
        return train, test
    train = make_loader(arrays.train_images, arrays.train_labels, subset, cfg.batch_size, budget_bytes=budget_bytes,
                        seed=cfg.seed, augmentation=augmentation, **common)  # fmt: skip
    test = make_loader(arrays.test_images, arrays.test_labels, None, EVAL_BATCH, budget_bytes=budget_bytes,
                       shuffle=False, **common)  # fmt: skip
    return train, test


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _differs(saved: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether a checkpoint's config is another trial's. A setting added since the checkpoint was
    written counts as its default, as in the trial id."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrialConfig)}

    def plain(v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    return any(plain(v) != plain(saved.get(k, defaults[k])) for k, v in config.items())


def run_trial(
    cfg: TrialConfig,
    checkpoints: CheckpointDir,
    *,
    data_roots: Mapping[str, str | Path] | None = None,
    checkpoint_every_steps: int = 0,
    data_budget_bytes: float | None = None,
    compile: bool | None = None,
    arrays: data.ImageArrays | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_stages: Callable[[dict[str, float]], None] | None = None,
    on_resume: Callable[[list[dict[str, Any]]], None] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` to the end (resuming from ``checkpoints``) and return its results.

    ``data_roots`` says where each dataset the trial uses lives (default: each one's own default).
    After pre-training, the stages ``cfg`` declares run (see :mod:`mlpgrid.stages`) and
    ``on_stages`` receives their metrics. The training set is kept on ``device`` when it fits in
    ``data_budget_bytes`` (default :func:`default_data_budget`), else streamed to it; both give
    the same batches. ``compile`` (default: :func:`compile_pays`) trains through
    ``torch.compile(model)``. ``arrays`` are the pre-training dataset's arrays when the caller
    has them already (shared by the trials of a node), else they are loaded.
    Checkpoints are written in the background (:class:`BackgroundSaver`): at each epoch end
    and every ``checkpoint_every_steps`` unless the previous one is still being written, and
    always after the last epoch. ``on_epoch`` is called with each finished epoch's metrics;
    ``on_resume`` with the metrics of the epochs a checkpoint already holds, when resuming.
    Raises :class:`TrialDiverged` when the training loss becomes NaN or infinite.
    """
    device = device or pick_device()
    config_dict = dataclasses.asdict(cfg)
    roots = dict(data_roots or {})
    for name, root in roots.items():
        data.register(name, root)
    budget = default_data_budget(device) if data_budget_bytes is None else data_budget_bytes
    root = roots.get(cfg.dataset)
    if arrays is None:
        arrays = data.load(cfg.dataset, None if root is None else str(root), cfg.resolution, cfg.channels)
    train, test = make_loaders(arrays, cfg, device, budget)
    # Kept for the stages that read the pre-training dataset again; otherwise let it go.
    reread = cfg.tta or cfg.dataset in (*cfg.probe_datasets, *cfg.finetune_datasets)
    loaded = {cfg.dataset: arrays} if reread else {}
    del arrays

    torch.manual_seed(derive_seed(cfg.seed, _INIT_STREAM))
    mc = cfg.model_config()
    model = MLP(mc).to(device)
    side = cfg.resolution or cfg.dataset_info.resolution
    shape = (mc.in_features // side**2, side, side)
    compiled, compile_seconds = None, None
    if compile_pays(cfg, device) if compile is None else compile:
        # Before the dropout stream is seeded: this pass draws dropout masks too.
        example = torch.zeros((cfg.batch_size, *shape), dtype=train.out_dtype, device=device)
        compiled, compile_seconds = compile_for_training(model, example)
    optimizer = make_optimizer(cfg, model.parameters(), device, compiled is not None)
    if isinstance(optimizer, CompiledLion):
        started = time.perf_counter()
        optimizer.compile_now()
        compile_seconds += time.perf_counter() - started
    flops_per_image = models.hardware_training_flops(mc, 1)
    peak = matmul_peak_tflops(device) if device.type == "cuda" else None
    torch.manual_seed(derive_seed(cfg.seed, _DROPOUT_STREAM))

    epoch, start_step, history, resumed_from = 0, 0, [], []
    loss_sum, seen = torch.zeros((), device=device), 0
    state = checkpoints.latest()
    for problem in checkpoints.problems:
        log.warning("%s; passed over for an earlier checkpoint", problem)
    if state is not None:
        if _differs(state["config"], config_dict):
            raise ValueError(f"{checkpoints.path}: checkpoint belongs to another trial config")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], device)
        epoch, start_step, history = state["epoch"], state["step"], state["history"]
        loss_sum, seen = state["loss_sum"].to(device), state["seen"]
        resumed_from = state["resumed_from"] + ([[epoch, start_step]] if epoch < cfg.epochs else [])
        if on_resume:
            on_resume(history)

    saver = BackgroundSaver(checkpoints)

    def save(epoch: int, step: int) -> None:
        saver.save(
            {
                "config": config_dict, "epoch": epoch, "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
                "history": history, "loss_sum": loss_sum.cpu(), "seen": seen, "resumed_from": resumed_from,
            },
            epoch, step, required=epoch == cfg.epochs,
        )  # fmt: skip

    steps = len(train)
    while epoch < cfg.epochs:
        model.train()
        started, images = time.perf_counter(), 0
        for step, batch in enumerate(train.epoch(epoch, start_step), start=start_step):
            lr = lr_at(cfg, epoch * steps + step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            n = len(batch.labels)
            net = compiled if compiled is not None and n == cfg.batch_size else model
            loss = train_step(net, optimizer, batch, cfg.label_smoothing, cfg.clip_grad)
            loss_sum += loss * n
            seen += n
            images += n
            if checkpoint_every_steps and (step + 1) % checkpoint_every_steps == 0 and step + 1 < steps:
                save(epoch, step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the loop only queues work; wait for it to be done
        train_seconds = time.perf_counter() - started

        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise TrialDiverged(f"training loss is {train_loss} in epoch {epoch + 1} (lr {cfg.lr})")
        test_loss, test_error = evaluate(model, test)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_error": test_error,
            "lr": lr,
            "images_per_s": images / train_seconds,
            "tflops": flops_per_image * images / train_seconds / 1e12,
            "epoch_seconds": time.perf_counter() - started,
        }
        if peak:
            metrics["mfu"] = metrics["tflops"] / peak
        if compile_seconds is not None:  # once per attempt, with its first epoch
            metrics["compile_seconds"], compile_seconds = compile_seconds, None
        history.append(metrics)
        epoch, start_step = epoch + 1, 0
        loss_sum, seen = torch.zeros((), device=device), 0
        save(epoch, 0)
        if on_epoch:
            on_epoch(metrics)
    saver.wait()  # the last checkpoint is on disk before the trial counts as trained

    stage_dir = StageDir(checkpoints.path.parent / "stages")
    stage_metrics = run_stages(model, cfg, roots, stage_dir, device, budget, on_stages, loaded)
    weight = model.embed.weight.detach().float().cpu().numpy()
    filters = plots.first_layer_filters(weight, shape[0], side, stage_dir.path / "first_layer.png")
    final = history[-1]
    return {
        "stages": stage_metrics,
        "first_layer": str(filters),
        "status": "finished",
        "seed": cfg.seed,
        "device": str(device),
        "epochs": len(history),
        "train_loss": final["train_loss"],
        "test_loss": final["test_loss"],
        "test_error": final["test_error"],
        "best_test_error": min(h["test_error"] for h in history),
        "resumed_from": resumed_from,
        "compiled": compiled is not None,
        "checkpoint_problems": checkpoints.problems,
        "history": history,
    }
