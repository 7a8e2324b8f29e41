"""One trial, top to bottom: set up, resume, train epoch after epoch, finish.

:func:`run_trial` is the function every runner calls, in-process or inside a Ray worker. It
composes four parts, each a function of its own:

1. :func:`set_up` builds the trial's components (loaders, model, its compiled form, optimizer)
   from the config, seeded so that they are the same every time;
2. :func:`resume` restores the newest checkpoint of the trial's directory into them, so
   calling ``run_trial`` again after a crash continues exactly where the checkpoint left off:
   same weights, optimizer state, RNG state, and the same position in the same data order;
3. :func:`train_epoch` trains one epoch (or the rest of one) and returns its metrics;
4. :func:`finish` runs the stages after pre-training and draws the first layer.

The result is a :class:`TrialResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mlpgrid import data
from mlpgrid.data.beton import FfcvLoader
from mlpgrid.data.loader import (
    Augmentation,
    DeviceLoader,
    StreamingLoader,
    derive_seed,
    device_bytes,
    make_loader,
    resident_share,
)
from mlpgrid.data.subset import proportional_subset, split_off
from mlpgrid.grid import spec
from mlpgrid.grid.layout import TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.models import architecture, networks
from mlpgrid.models.networks import Network
from mlpgrid.training import pictures
from mlpgrid.training.checkpoint import BackgroundSaver, CheckpointDir, hold_if_asked
from mlpgrid.training.hardware import default_data_budget, matmul_peak_tflops, pick_device
from mlpgrid.training.optim import CompiledLion, make_optimizer
from mlpgrid.training.stages import StageDir, run_stages
from mlpgrid.training.step import EVAL_BATCH, autocast, compile_for_training, cosine, evaluate, train_step

log = logging.getLogger(__name__)

# torch.compile takes tens of seconds for a model shape it has not seen (seconds once
# Inductor's on-disk cache holds it) and saves 10-20% of every step on a GPU: it pays from
# about this much training compute (hardware FLOPs; a minute or two of an H100).
COMPILE_PAYS_FLOPS = 2e16

# Compiling the loader's augmentation costs a fresh worker about 8 s and saves a few
# microseconds an image (H200 machine, benchmarks/trial_startup.py, 50k images of 64x64 at
# batch 4096, model not compiled: the first epoch 7.98 s compiled against 0.34 s eager; the
# second 0.13 s against 0.41 s for B-6/Wi-256 alone, 0.16 s against 0.29 s eight at once, and
# 0.28 s against 0.36 s for B-12/Wi-1024 eight at once; a quick-start B-2/Wi-64 trial at batch
# 256 took 20.0 s from launch to its end compiled, 9.5 s not). At about 2 us an image it pays
# from this many training images, whatever the model; quick-start trials see at most 480k.
AUGMENT_COMPILE_PAYS_IMAGES = 4e6

# Separate seed streams, so adding randomness in one place never shifts another.
_INIT_STREAM, _DROPOUT_STREAM = 1, 2

Loader = DeviceLoader | StreamingLoader | FfcvLoader


class TrialDiverged(RuntimeError):
    """The training loss stopped being finite."""


@dataclass(frozen=True)
class TrialOptions:
    """How a trial runs; none of it changes its result."""

    checkpoint_every_steps: int = 0  # besides the checkpoint at each epoch's end; 0 = none
    data_budget_bytes: float | None = None  # images kept on the device; None: default_data_budget
    gpu_share: float = 1.0  # of the GPU the trial has: the default data budget takes its part of it
    compile: bool | None = None  # torch.compile the model and the augmentation; None: each where it pays


@dataclass(frozen=True)
class Hooks:
    """What the caller of :func:`run_trial` hears while the trial runs."""

    resumed: Callable[[list[dict[str, Any]]], None] | None = None  # the epochs a checkpoint already holds
    epoch: Callable[[dict[str, Any]], None] | None = None  # each epoch's metrics as it ends
    stages: Callable[[dict[str, float]], None] | None = None  # the stages' metrics


@dataclass(frozen=True)
class TrialResult:
    status: str  # finished (a trial that diverges raises TrialDiverged instead)
    seed: int
    device: str
    epochs: int
    train_loss: float
    test_loss: float
    test_error: float
    best_test_error: float
    history: list[dict[str, Any]]  # every epoch's metrics
    resumed_from: list[list[int]]  # [epoch, step] of each resume that had training left
    compiled: bool
    checkpoint_problems: list[str]  # damaged checkpoints passed over, and why
    stages: dict[str, float]
    first_layer: str  # the picture of the first layer (a PNG)


def compile_pays(cfg: TrialConfig, device: torch.device) -> bool:
    """Whether compiling the model is worth its time for this trial (never on the CPU)."""
    images = cfg.num_examples * cfg.epochs
    return (
        device.type == "cuda" and architecture.hardware_training_flops(cfg.model_config(), images) >= COMPILE_PAYS_FLOPS
    )


def compiles(cfg: TrialConfig, options: TrialOptions, device: torch.device) -> bool:
    """Whether the trial compiles its model: as chosen, else where :func:`compile_pays`."""
    return compile_pays(cfg, device) if options.compile is None else options.compile


def compiles_augmentation(cfg: TrialConfig, options: TrialOptions, device: torch.device) -> bool:
    """Whether the trial's loader compiles its augmentation: as chosen, else where its model
    compiles or it trains on at least ``AUGMENT_COMPILE_PAYS_IMAGES`` images on a GPU."""
    many_images = device.type == "cuda" and cfg.num_examples * cfg.epochs >= AUGMENT_COMPILE_PAYS_IMAGES
    return compiles(cfg, options, device) or (options.compile is None and many_images)


def lr_at(cfg: TrialConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warm-up, then decay."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * cosine((step - warmup) / max(1, total - warmup))


# Streamed images reach the step from CPU threads at ~0.86M/s (16 cores of the H200 machine) and
# at 2.9M/s when the GPU reads them from host memory itself, which costs the step SM time:
# B-6/Wi-256 (batch 16384) streamed at 1.54M/s reading host memory, 0.84M/s from threads;
# B-12/Wi-1024 at 95% of its resident rate reading host memory, 99% from threads. Threads keep
# up with a step of at least this many hardware FLOPs per image (400 TFLOP/s / 0.86M images/s).
THREADS_KEEP_UP_FLOPS = 4.5e8


def make_loaders(arrays: data.ImageArrays, cfg: TrialConfig, device: torch.device, budget_bytes: float,
                 members: int = 1, compile: bool = False) -> tuple[Loader, Loader]:  # fmt: skip
    """The trial's training loader (its class-proportional subset, augmented) and test loader;
    ``members`` trials share it (a group's step trains them all on each batch). ``compile``
    fuses the augmentation into one kernel on a GPU."""
    pool = np.arange(len(arrays.train_labels))
    if cfg.probes_itself:  # the probe's examples stay unseen
        pool, _ = split_off(arrays.train_labels, cfg.probe_examples)
    subset = pool[proportional_subset(arrays.train_labels[pool], cfg.num_examples, cfg.seed)]
    common = dict(mean=arrays.mean, std=arrays.std, device=device, compile=compile)
    augmentation = Augmentation(flip=cfg.flip, crop_padding=cfg.crop_padding, mixup=cfg.mixup)
    if arrays.beton is not None:
        train = FfcvLoader(arrays.beton["train"], arrays.train_labels, cfg.batch_size, subset=subset, seed=cfg.seed,
                           augmentation=augmentation, **common)  # fmt: skip
        test = FfcvLoader(arrays.beton["test"], arrays.test_labels, EVAL_BATCH, shuffle=False, **common)
        return train, test
    step_flops = members * architecture.hardware_training_flops(cfg.model_config(), 1)
    train = make_loader(arrays.train_images, arrays.train_labels, subset, cfg.batch_size, budget_bytes=budget_bytes,
                        seed=cfg.seed, augmentation=augmentation, host_view=step_flops < THREADS_KEEP_UP_FLOPS,
                        **common)  # fmt: skip
    # The test images get what the training images left of the budget.
    test = make_loader(arrays.test_images, arrays.test_labels, None, EVAL_BATCH,
                       budget_bytes=budget_bytes - device_bytes(train), shuffle=False, **common)  # fmt: skip
    return train, test


# --- 1. set-up ----------------------------------------------------------------------------


@dataclass
class Components:
    """What training a trial is made of, built by :func:`set_up`."""

    device: torch.device
    budget_bytes: float  # images the loaders may keep on the device
    train: Loader
    test: Loader
    model: Network
    compiled: torch.nn.Module | None  # the model through torch.compile, for full batches
    optimizer: torch.optim.Optimizer
    image_shape: tuple[int, int, int]  # (channels, side, side)
    flops_per_image: float  # hardware FLOPs of training on one image
    peak_tflops: float | None  # the GPU's bf16 matmul rate, for MFU
    compile_seconds: float | None  # spent compiling in this attempt, until logged


def training_bytes(model_config: architecture.ModelConfig, batch_shape: tuple[int, ...],
                   optimizer_for: Callable[[Any], torch.optim.Optimizer], device: torch.device) -> int:  # fmt: skip
    """Device memory training a model takes, measured: the peak of one eager step of a scratch
    copy on a zero batch of ``batch_shape`` (weights, activations, gradients, the state of
    ``optimizer_for(parameters)``), plus three copies of the weights for compiling the optimizer
    on scratch tensors. Random streams are left as they were."""
    with torch.random.fork_rng(devices=[device]):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model = networks.build(model_config).to(device)
        optimizer = optimizer_for(model.parameters())
        images = torch.zeros(batch_shape, dtype=torch.bfloat16, device=device)
        with autocast(device):
            model(images).float().logsumexp(1).mean().backward()
        optimizer.step()
        peak = torch.cuda.max_memory_allocated(device) - before
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        del model, optimizer, images
        torch.cuda.empty_cache()
    return peak + 3 * weights


def data_budget(options: TrialOptions, device: torch.device, cfgs: list[TrialConfig]) -> float:
    """Bytes of images the loaders of the trials ``cfgs`` (one trial, or a group trained
    together) may keep on ``device``: the chosen budget, else what the GPU share spares beside
    their models' measured memory."""
    if options.data_budget_bytes is not None:
        return options.data_budget_bytes
    if device.type != "cuda":
        return default_data_budget(device)
    cfg = cfgs[0]
    member = training_bytes(cfg.model_config(), (cfg.batch_size, *image_shape(cfg)),
                            lambda params: make_optimizer(cfg, params, device, compiled=False), device)  # fmt: skip
    return default_data_budget(device, options.gpu_share, len(cfgs) * member)


def load_data(cfg: TrialConfig, datasets: data.Datasets, device: torch.device, budget: float,
              members: int = 1, compile: bool = False) -> tuple[Loader, Loader]:  # fmt: skip
    """The trial's loaders (see :func:`make_loaders`) on its pre-training dataset."""
    # Kept for the stages that read the pre-training dataset again; otherwise let go once loaded.
    reread = bool(cfg.tta) or cfg.dataset in (*cfg.probe_datasets, *cfg.finetune_datasets)
    arrays = datasets.load(cfg.dataset, cfg.resolution, cfg.channels, keep=reread)
    return make_loaders(arrays, cfg, device, budget, members, compile)


def image_shape(cfg: TrialConfig) -> tuple[int, int, int]:
    """(channels, side, side) of the trial's input images."""
    side = cfg.resolution or cfg.dataset_info.resolution
    return cfg.model_config().in_features // side**2, side, side


Model = tuple[Network, torch.nn.Module | None, torch.optim.Optimizer, float | None]


def make_model(cfg: TrialConfig, options: TrialOptions, device: torch.device, input_dtype: torch.dtype) -> Model:
    """The trial's model, seeded, its compiled form (None when not compiled), its optimizer, and
    the seconds compiling took (None when nothing was compiled). Seeds the dropout stream last."""
    torch.manual_seed(derive_seed(cfg.seed, _INIT_STREAM))
    model = networks.build(cfg.model_config()).to(device)
    compiled, compile_seconds = None, None
    if compiles(cfg, options, device):
        # Before the dropout stream is seeded: this pass draws dropout masks too.
        example = torch.zeros((cfg.batch_size, *image_shape(cfg)), dtype=input_dtype, device=device)
        compiled, compile_seconds = compile_for_training(model, example)
    optimizer = make_optimizer(cfg, model.parameters(), device, compiled is not None)
    if isinstance(optimizer, CompiledLion):
        started = time.perf_counter()
        optimizer.compile_now()
        compile_seconds += time.perf_counter() - started
    if device.type == "cuda":
        matmul_peak_tflops(device)  # measured once per process, drawing random matrices: before the seed
    torch.manual_seed(derive_seed(cfg.seed, _DROPOUT_STREAM))
    return model, compiled, optimizer, compile_seconds


def set_up(cfg: TrialConfig, options: TrialOptions, datasets: data.Datasets, device: torch.device) -> Components:
    budget = data_budget(options, device, [cfg])
    train, test = load_data(cfg, datasets, device, budget, compile=compiles_augmentation(cfg, options, device))
    model, compiled, optimizer, compile_seconds = make_model(cfg, options, device, train.out_dtype)
    return Components(
        device=device, budget_bytes=budget, train=train, test=test, model=model, compiled=compiled,
        optimizer=optimizer, image_shape=image_shape(cfg),
        flops_per_image=architecture.hardware_training_flops(cfg.model_config(), 1),
        peak_tflops=matmul_peak_tflops(device) if device.type == "cuda" else None, compile_seconds=compile_seconds,
    )  # fmt: skip


# --- 2. resume ----------------------------------------------------------------------------


@dataclass
class Position:
    """Where training stands: what a checkpoint holds besides the model and optimizer."""

    epoch: int = 0  # epochs done
    step: int = 0  # steps done of the epoch under way
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None  # of the epoch under way, on the device
    seen: int = 0  # images of the epoch under way
    resumed_from: list[list[int]] = field(default_factory=list)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _differs(saved: dict[str, Any], config: TrialConfig) -> bool:
    """Whether a checkpoint's config pre-trains another model than ``config``: a setting added
    since the checkpoint was written counts as its default, as in the trial id, and the stages
    after pre-training do not count (a trial may start from another's pre-trained model)."""
    known = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in spec.FIELDS}
    if len(known) < len(saved):
        return True  # a setting this version no longer has
    return spec.pretraining_id(TrialConfig(**known)) != spec.pretraining_id(config)


def resume(cfg: TrialConfig, parts: Components, checkpoints: CheckpointDir) -> Position:
    """The position of the newest good checkpoint, its state loaded into ``parts``; the start
    when there is none."""
    state = checkpoints.latest()
    for problem in checkpoints.problems:
        log.warning("%s; passed over for an earlier checkpoint", problem)
    if state is None:
        return Position(loss_sum=torch.zeros((), device=parts.device))
    if _differs(state["config"], cfg):
        raise ValueError(f"{checkpoints.path}: checkpoint belongs to another trial config")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], parts.device)
    epoch, step = state["epoch"], state["step"]
    return Position(
        epoch=epoch, step=step, history=state["history"], loss_sum=state["loss_sum"].to(parts.device),
        seen=state["seen"], resumed_from=state["resumed_from"] + ([[epoch, step]] if epoch < cfg.epochs else []),
    )  # fmt: skip


def checkpoint_state(cfg: TrialConfig, model: dict[str, Any], optimizer: dict[str, Any], position: Position,
                     device: torch.device) -> dict[str, Any]:  # fmt: skip
    """What a trial's checkpoint holds: its config, position, model and optimizer state, RNG state."""
    return {
        "config": dataclasses.asdict(cfg), "epoch": position.epoch, "step": position.step, "model": model,
        "optimizer": optimizer, "rng": _rng_state(device), "history": position.history,
        "loss_sum": position.loss_sum.cpu(), "seen": position.seen, "resumed_from": position.resumed_from,
    }  # fmt: skip


def save(cfg: TrialConfig, parts: Components, position: Position, saver: BackgroundSaver) -> None:
    """Checkpoint the trial at ``position`` (in the background; the last one always)."""
    state = checkpoint_state(cfg, parts.model.state_dict(), parts.optimizer.state_dict(), position, parts.device)
    saver.save(state, position.epoch, position.step, required=position.epoch == cfg.epochs)


# --- 3. one epoch -------------------------------------------------------------------------


def train_epoch(cfg: TrialConfig, parts: Components, position: Position, saver: BackgroundSaver,
                checkpoint_every_steps: int = 0) -> dict[str, Any]:  # fmt: skip
    """Train from ``position`` to the end of its epoch, checkpoint, and return the epoch's metrics
    (also appended to the position's history). Raises :class:`TrialDiverged` on a non-finite loss."""
    device, optimizer = parts.device, parts.optimizer
    parts.model.train()
    steps = len(parts.train)
    started, images = time.perf_counter(), 0
    for step, batch in enumerate(parts.train.epoch(position.epoch, position.step), start=position.step):
        lr = lr_at(cfg, position.epoch * steps + step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n = len(batch.labels)
        net = parts.compiled if parts.compiled is not None and n == cfg.batch_size else parts.model
        loss = train_step(net, optimizer, batch, cfg.label_smoothing, cfg.clip_grad)
        position.loss_sum += loss * n
        position.seen += n
        images += n
        if checkpoint_every_steps and (step + 1) % checkpoint_every_steps == 0 and step + 1 < steps:
            position.step = step + 1
            save(cfg, parts, position, saver)
            hold_if_asked(saver, position.epoch, position.step, [saver.checkpoints.path.parent])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the loop only queues work; wait for it to be done
    train_seconds = time.perf_counter() - started

    train_loss = position.loss_sum.item() / position.seen
    if not math.isfinite(train_loss):
        raise TrialDiverged(f"training loss is {train_loss} in epoch {position.epoch + 1} (lr {cfg.lr})")
    test_loss, test_error = evaluate(parts.model, parts.test)
    metrics = {
        "epoch": position.epoch + 1,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_error": test_error,
        "lr": lr,
        "images_per_s": images / train_seconds,
        "resident_share": resident_share(parts.train),
        "tflops": parts.flops_per_image * images / train_seconds / 1e12,
        "epoch_seconds": time.perf_counter() - started,
    }
    if parts.peak_tflops:
        metrics["mfu"] = metrics["tflops"] / parts.peak_tflops
    if parts.compile_seconds is not None:  # once per attempt, with its first epoch
        metrics["compile_seconds"], parts.compile_seconds = parts.compile_seconds, None
    position.history.append(metrics)
    position.epoch, position.step = position.epoch + 1, 0
    position.loss_sum, position.seen = torch.zeros((), device=device), 0
    save(cfg, parts, position, saver)
    return metrics


# --- 4. finish ----------------------------------------------------------------------------


def finish(cfg: TrialConfig, parts: Components, position: Position, layout: TrialLayout, datasets: data.Datasets,
           checkpoint_problems: list[str], hooks: Hooks) -> TrialResult:  # fmt: skip
    """The stages after pre-training, the first layer's picture, and the trial's result."""
    stage_dir = StageDir(layout.stages)
    stage_metrics = run_stages(parts.model, cfg, datasets, stage_dir, parts.device, parts.budget_bytes, hooks.stages)
    weight = parts.model.embed.weight.detach().float().cpu().numpy()
    channels, side, _ = parts.image_shape
    side = getattr(parts.model.cfg, "patch", side)  # a patch model's first layer sees one patch
    picture = pictures.first_layer(weight, channels, side, stage_dir.path / "first_layer.png")
    history = position.history
    final = history[-1]
    return TrialResult(
        status="finished", seed=cfg.seed, device=str(parts.device), epochs=len(history),
        train_loss=final["train_loss"], test_loss=final["test_loss"], test_error=final["test_error"],
        best_test_error=min(h["test_error"] for h in history), history=history, resumed_from=position.resumed_from,
        compiled=parts.compiled is not None, checkpoint_problems=checkpoint_problems, stages=stage_metrics,
        first_layer=str(picture),
    )  # fmt: skip


def run_trial(
    cfg: TrialConfig,
    layout: TrialLayout,
    options: TrialOptions = TrialOptions(),
    *,
    datasets: data.Datasets | None = None,
    hooks: Hooks = Hooks(),
    device: torch.device | None = None,
) -> TrialResult:
    """Train ``cfg`` to the end in the trial directory ``layout`` (resuming from its checkpoints),
    run the stages ``cfg`` declares (see :mod:`mlpgrid.training.stages`) and return the result.

    ``datasets`` says where each dataset lives and may already hold the pre-training arrays
    (default: every dataset from its default place). The training set is kept on ``device`` when
    it fits in the options' data budget, else streamed to it; both give the same batches.
    Checkpoints are written in the background (:class:`BackgroundSaver`): at each epoch end and
    every ``options.checkpoint_every_steps`` unless the previous one is still being written,
    and always after the last epoch. Raises :class:`TrialDiverged` when the training loss
    becomes NaN or infinite.
    """
    device = device or pick_device()
    datasets = datasets or data.Datasets()
    checkpoints = CheckpointDir(layout.checkpoints)
    parts = set_up(cfg, options, datasets, device)
    position = resume(cfg, parts, checkpoints)
    if position.history and hooks.resumed:
        hooks.resumed(position.history)
    saver = BackgroundSaver(checkpoints)
    while position.epoch < cfg.epochs:
        metrics = train_epoch(cfg, parts, position, saver, options.checkpoint_every_steps)
        if hooks.epoch:
            hooks.epoch(metrics)
    saver.wait()  # the last checkpoint is on disk before the trial counts as trained
    return finish(cfg, parts, position, layout, datasets, checkpoints.problems, hooks)
