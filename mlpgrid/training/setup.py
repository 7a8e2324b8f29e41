"""What training is made of, built from a trial's config: loaders, the data budget, the model.

The loop (:mod:`mlpgrid.training.loop`) calls these once per attempt: :func:`set_up_data` for
the batch stream its members share, :func:`make_model` for each member. Every choice of *how*
(compile or not, how much of the GPU holds images, which way streamed rows travel) comes from
:mod:`mlpgrid.policy`; everything here is seeded, so a trial set up twice is the same trial.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from mlpgrid import data, policy
from mlpgrid.data.beton import FfcvLoader
from mlpgrid.data.loader import WHOLE, Augmentation, Loader, Shard, derive_seed, device_bytes, make_loader
from mlpgrid.data.subset import proportional_subset, split_off
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.models import architecture, networks
from mlpgrid.training.hardware import default_data_budget, matmul_peak_tflops
from mlpgrid.training.optim import CompiledLion, make_optimizer
from mlpgrid.training.parallel import ALONE, Workers
from mlpgrid.training.step import EVAL_BATCH, autocast, compile_for_training, compile_recipe_loss

# Separate seed streams, so adding randomness in one place never shifts another.
_INIT_STREAM, _DROPOUT_STREAM = 1, 2


@dataclass(frozen=True)
class TrialOptions:
    """How a trial runs; none of it changes its result."""

    checkpoint_every_steps: int = 0  # besides the checkpoint at each epoch's end; 0 = none
    evaluate_every: int = 1  # epochs between evaluations on the test split; the last epoch always
    data_budget_bytes: float | None = None  # images kept on the device; None: default_data_budget
    gpu_share: float = 1.0  # of the GPU's memory the trial may take: the default data budget is what it spares
    data_budget_scale: float = 1.0  # the budget times this (smaller after the trial ran out of memory)
    compile: bool | None = None  # torch.compile the model and the augmentation; None: as mlpgrid.policy says


def image_shape(cfg: TrialConfig) -> tuple[int, int, int]:
    """(channels, side, side) of the trial's input images."""
    side = cfg.resolution or cfg.dataset_info.resolution
    return cfg.model_config().in_features // side**2, side, side


# --- the data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataParts:
    """The batch stream a group's members (or a trial alone) share, and what it runs on."""

    device: torch.device
    budget_bytes: float  # images the loaders may keep on the device
    train: Loader
    test: Loader
    image_shape: tuple[int, int, int]  # (channels, side, side)
    flops_per_image: float  # hardware FLOPs of training one member on one image
    peak_tflops: float | None  # the GPU's bf16 matmul rate, for MFU


def make_loaders(arrays: data.ImageArrays, cfg: TrialConfig, device: torch.device, budget_bytes: float,
                 members: int = 1, compile: bool = False, shard: Shard = WHOLE) -> tuple[Loader, Loader]:  # fmt: skip
    """The trial's training loader (its class-proportional subset, augmented; ``shard`` of each
    batch) and test loader; ``members`` trials share it (a group's step trains them all on each
    batch). ``compile`` fuses the augmentation into one kernel on a GPU."""
    pool = np.arange(len(arrays.train_labels))
    if cfg.probes_itself:  # the probe's examples stay unseen
        assert cfg.probe_examples is not None, "a probe of the pre-training data says how many examples it holds out"
        pool, _ = split_off(arrays.train_labels, cfg.probe_examples)
    subset = pool[proportional_subset(arrays.train_labels[pool], cfg.num_examples, cfg.seed)]
    common: dict[str, Any] = dict(mean=arrays.mean, std=arrays.std, device=device, compile=compile)
    augmentation = Augmentation(flip=cfg.flip, crop_padding=cfg.crop_padding, mixup=cfg.mixup)
    if arrays.beton is not None:
        train = FfcvLoader(arrays.beton["train"], arrays.train_labels, cfg.batch_size, subset=subset, seed=cfg.seed,
                           augmentation=augmentation, shard=shard, **common)  # fmt: skip
        test = FfcvLoader(arrays.beton["test"], arrays.test_labels, EVAL_BATCH, shuffle=False, **common)
        return train, test
    assert arrays.train_images is not None and arrays.test_images is not None, "arrays, not .beton files"
    flops_per_image = members * architecture.hardware_training_flops(cfg.model_config(), 1)
    train_loader = make_loader(arrays.train_images, arrays.train_labels, subset, cfg.batch_size,
                               budget_bytes=budget_bytes, seed=cfg.seed, augmentation=augmentation, shard=shard,
                               host_view=policy.gpu_reads_stream(flops_per_image), **common)  # fmt: skip
    # The test images get what the training images left of the budget.
    left = budget_bytes - device_bytes(train_loader)
    test_loader = make_loader(arrays.test_images, arrays.test_labels, None, EVAL_BATCH, budget_bytes=left,
                              shuffle=False, **common)  # fmt: skip
    return train_loader, test_loader


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
        return options.data_budget_scale * options.data_budget_bytes
    if device.type != "cuda":
        return options.data_budget_scale * default_data_budget(device)
    cfg = cfgs[0]
    member = training_bytes(cfg.model_config(), (cfg.batch_size, *image_shape(cfg)),
                            lambda params: make_optimizer(cfg, params, device, compiled=False), device)  # fmt: skip
    return options.data_budget_scale * default_data_budget(device, options.gpu_share, len(cfgs) * member)


def load_data(cfg: TrialConfig, datasets: data.Datasets, device: torch.device, budget: float,
              members: int = 1, compile: bool = False, shard: Shard = WHOLE) -> tuple[Loader, Loader]:  # fmt: skip
    """The trial's loaders (see :func:`make_loaders`) on its pre-training dataset."""
    # Kept for the stages that read the pre-training dataset again; otherwise let go once loaded.
    reread = bool(cfg.tta) or cfg.dataset in (*cfg.probe_datasets, *cfg.finetune_datasets)
    arrays = datasets.load(cfg.dataset, cfg.resolution, cfg.channels, keep=reread)
    return make_loaders(arrays, cfg, device, budget, members, compile, shard)


def set_up_data(cfgs: list[TrialConfig], options: TrialOptions, datasets: data.Datasets, device: torch.device,
                compile_augmentation: bool, shard: Shard = WHOLE) -> DataParts:  # fmt: skip
    """The batch stream of the trials ``cfgs`` (one, or a group's members: the first one's data
    settings are every member's) within their data budget; ``shard`` of every batch."""
    lead = cfgs[0]
    budget = data_budget(options, device, cfgs)
    train, test = load_data(lead, datasets, device, budget, len(cfgs), compile_augmentation, shard)
    return DataParts(
        device=device, budget_bytes=budget, train=train, test=test, image_shape=image_shape(lead),
        flops_per_image=architecture.hardware_training_flops(lead.model_config(), 1),
        peak_tflops=matmul_peak_tflops(device) if device.type == "cuda" else None,
    )  # fmt: skip


# --- the model ------------------------------------------------------------------------------


class Model(NamedTuple):
    """A member's network, what its steps go through (the network, or its DDP wrapper in a
    data-parallel trial), its compiled form of that (None when not compiled), its optimizer,
    and the seconds compiling took in this attempt (None when nothing was compiled)."""

    network: networks.Network
    stepped: torch.nn.Module
    compiled: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    compile_seconds: float | None


def make_model(cfg: TrialConfig, options: TrialOptions, device: torch.device, input_dtype: torch.dtype,
               workers: Workers = ALONE) -> Model:  # fmt: skip
    """The trial's model, seeded, compiled where :mod:`mlpgrid.policy` says, with its optimizer
    (``workers``: stepped by DDP over them). Seeds the dropout stream last."""
    torch.manual_seed(derive_seed(cfg.seed, _INIT_STREAM))
    model = networks.build(cfg.model_config()).to(device)
    stepped = workers.wrap(model, device)
    compiled, compile_seconds = None, None
    if policy.compiles_model(cfg, device.type, options.compile):
        # Before the dropout stream is seeded: this pass draws dropout masks too.
        rows = workers.shard.size(cfg.batch_size)
        example = torch.zeros((rows, *image_shape(cfg)), dtype=input_dtype, device=device)
        compiled, compile_seconds = compile_for_training(stepped, example)
        compile_seconds += compile_recipe_loss(rows, cfg.model_config().num_classes, cfg.mixup > 0,
                                               cfg.label_smoothing, device)  # fmt: skip
    optimizer = make_optimizer(cfg, model.parameters(), device, compiled is not None)
    if isinstance(optimizer, CompiledLion):
        started = time.perf_counter()
        optimizer.compile_now()
        compile_seconds = (compile_seconds or 0.0) + time.perf_counter() - started
    if device.type == "cuda":
        matmul_peak_tflops(device)  # measured once per process, drawing random matrices: before the seed
    torch.manual_seed(derive_seed(cfg.seed, _DROPOUT_STREAM))
    return Model(model, stepped, compiled, optimizer, compile_seconds)
