"""How trials run: every threshold that picks a way of running, and the rules that read them.

Whether a model, a fused stack or the loader's augmentation is compiled, whether trials group
and fuse, what share of a GPU a trial gets, which way streamed images reach the GPU, how much
of a GPU's memory may hold images, how many torch threads a worker runs, which trials train
on several GPUs. None of it changes a
trial's result: the rules choose how fast it gets there. Each constant cites the measurement
it rests on, here and nowhere else; the functions are pure (configs and numbers in, a decision
out), so ``tests/test_policy.py`` checks them as one table.

Imports no torch: the driver decides groups and shares before any worker starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mlpgrid.grid.spec import OPTIMIZER_STATE_SLOTS, TrialConfig
from mlpgrid.models import architecture

# --- compiling ----------------------------------------------------------------------------

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

# A fused group is launch-bound unless compiled (B-6/Wi-256 at batch 4096 on an H200: 4 members
# eager 0.77M img/s, 8 compiled 3.57M), and compiling takes some 20-40 s: it pays from about
# this much training (hardware FLOPs of all members), far sooner than for a trial alone.
FUSED_COMPILE_PAYS_FLOPS = 1e15


def training_flops(cfg: TrialConfig) -> float:
    """Hardware FLOPs of training ``cfg`` to its end."""
    return architecture.hardware_training_flops(cfg.model_config(), cfg.num_examples * cfg.epochs)


def compiles_model(cfg: TrialConfig, device_type: str, chosen: bool | None = None) -> bool:
    """Whether a trial compiles its model: ``chosen`` if given, else on a GPU from
    :data:`COMPILE_PAYS_FLOPS` of training (never on the CPU)."""
    if chosen is not None:
        return chosen
    return device_type == "cuda" and training_flops(cfg) >= COMPILE_PAYS_FLOPS


def compiles_augmentation(cfg: TrialConfig, device_type: str, chosen: bool | None = None) -> bool:
    """Whether a trial's loader compiles its augmentation: where its model compiles, or, unless
    ``chosen`` says otherwise, on a GPU from :data:`AUGMENT_COMPILE_PAYS_IMAGES` training images."""
    many_images = device_type == "cuda" and cfg.num_examples * cfg.epochs >= AUGMENT_COMPILE_PAYS_IMAGES
    return compiles_model(cfg, device_type, chosen) or (chosen is None and many_images)


def compiles_stack(cfgs: Sequence[TrialConfig], device_type: str, chosen: bool | None = None) -> bool:
    """Whether a fused group compiles its stack: ``chosen`` if given, else on a GPU from
    :data:`FUSED_COMPILE_PAYS_FLOPS` of training of all members."""
    if chosen is not None:
        return chosen
    return device_type == "cuda" and sum(training_flops(c) for c in cfgs) >= FUSED_COMPILE_PAYS_FLOPS


# --- groups -------------------------------------------------------------------------------

# Fusing K small models' steps into one batched step pays up to 16 members (B-6/Wi-256 at
# batch 4096 on an H200: 7.24M img/s with 16 members against 759k alone, 9.5x); larger groups
# add memory, not speed.
MAX_MEMBERS = 16

# Fusing pays while a member's step is small enough to leave the GPU waiting on kernel
# launches. The alternative is not one trial alone but eight trials alone sharing the GPU
# (time-sliced). Measured with benchmarks/mps.py on an H200 (bare compiled steps at batch 4096;
# hardware FLOPs of one member's step): 8 fused against 8 processes, 0.15 TFLOP (B-6/Wi-256)
# 1.53x, 2.8 TFLOP (B-12/Wi-1024) 1.00x. Against one alone (benchmarks/groups.py): 0.15 TFLOP
# 6.6x, 0.62 TFLOP 4.2x, 1.86 TFLOP 2.4x, 6.19 TFLOP 1.01x. Below 1 TFLOP the gain over
# time-slicing is, interpolated in log step size, above about 1.2x.
FUSE_BELOW_STEP_FLOPS = 1e12


def stacks(model: architecture.ModelConfig) -> bool:
    """Whether members of this shape can be stacked into one model: not with batch norm (a
    RepMLPNet's everywhere), whose running statistics are each member's own and have no place in
    the stack."""
    return getattr(model, "norm", None) != "batchnorm" and not isinstance(model, architecture.RepConfig)


def fuses(cfg: TrialConfig, device_type: str, chosen: bool | None = None) -> bool:
    """Whether a group of ``cfg``'s shape steps its members fused: never with batch norm (its
    statistics are per member), else ``chosen`` if given, else on a GPU where a member's step is
    under :data:`FUSE_BELOW_STEP_FLOPS`. On the CPU members go one after another by default,
    which gives each exactly the results it has alone."""
    if not stacks(cfg.model_config()):
        return False
    if chosen is not None:
        return chosen
    step_flops = architecture.hardware_training_flops(cfg.model_config(), cfg.batch_size)
    return device_type == "cuda" and step_flops < FUSE_BELOW_STEP_FLOPS


def group_pays_on_gpu(cfgs: Sequence[TrialConfig], fuse: bool | None = None) -> bool:
    """Whether trials of one group's shape gain from training together on a GPU: they fuse
    and, unless fusing was chosen, train long enough together for compiling the stack to pay.
    A group stepped one after another, or fused but too short to compile, finished later than
    its trials alone eight to a GPU (H200: the quick start 59 s against 48 s,
    benchmarks/quickstart.py; fused groups of 2 to 4 did 0.72x, benchmarks/grid_overhead.py)."""
    if len(cfgs) < 2 or not fuses(cfgs[0], "cuda", fuse):
        return False
    return fuse is True or compiles_stack(cfgs, "cuda")


# A member leaving a fused group recompiles the stack of those left: 7-23 s on an H200
# (benchmarks/grid_overhead.py). Measured on trials of seconds, that made groups across T on a
# GPU 0.85x as fast as every trial alone (two fused groups of four, the rest alone, eight at a
# time, --scale 0.3). A trial whose training takes at least LEAVE_PAYS_S even at the bf16 matmul
# limit (798 TFLOP/s measured on an H100, an upper bound of any step's rate) pays under 1% for
# the recompiles of four members leaving before it.
LEAVE_RECOMPILE_S = 25.0
MATMUL_LIMIT_FLOPS = 7.98e14
LEAVE_PAYS_S = 4 * LEAVE_RECOMPILE_S / 0.01


def shortest_training_s(cfg: TrialConfig) -> float:
    """A lower bound of the trial's training seconds on any GPU: its hardware FLOPs at the
    bf16 matmul limit."""
    return architecture.hardware_training_flops(cfg.model_config(), cfg.num_examples * cfg.epochs) / MATMUL_LIMIT_FLOPS


def groups_across_epochs(cfg: TrialConfig, device_type: str, automatic: bool) -> bool:
    """Whether the trial may share a group with members ending at another T. On a GPU an
    automatic group spans T only among trials long enough for the recompiles as members leave
    to cost under 1% (``LEAVE_PAYS_S``); the others group within their T. A chosen group size
    (``--group K``) and the CPU group across T."""
    return not (automatic and device_type == "cuda") or shortest_training_s(cfg) >= LEAVE_PAYS_S


# --- GPU shares ---------------------------------------------------------------------------

# A step of fewer hardware FLOPs than this (about 5 ms of an H100) leaves a GPU waiting for
# kernel launches, and idle through a trial's start-up: eight such trials share a GPU by
# default, larger ones two. On a grid of 32 such trials on an H100, eight to a GPU did 27% more
# training per second than four (two for its largest models) did (benchmarks/grid_scaling.py).
# A compiled step is not launch-bound whatever its size, and a compiling start-up takes the
# node's cores: eight compiled trials of the main job (batch 16384, 10,450 classes, B-6/Wi-256
# to B-12/Wi-512) starting together on an H100's 16 cores had not ended a first epoch after 60 s
# (benchmarks/main_job.py). Two at a time each model's trials did 90-103% of its bare step's work,
# but pairs started and ended together, their start-ups leaving the GPU idle. A compiled worker
# gets a third of a GPU, so that while two train the third starts up: three at a time their steps
# kept 99.3% of the bare steps' pace while they trained (H100, the six Table-3 models, main_job.py
# --sizes 1 --seconds 40 --lengths 0.8,1,1.2).
SMALL_STEP_FLOPS = 4e12
SMALL_SHARE, COMPILED_SHARE, LARGE_SHARE = 0.125, 1 / 3, 0.5


def compiles_worker(cfgs: Sequence[TrialConfig], fused: bool, chosen: bool | None = None) -> bool:
    """Whether a GPU worker training ``cfgs`` (a group's members, or one trial) compiles: its
    fused stack, else its members' models (see :func:`compiles_stack`, :func:`compiles_model`)."""
    if fused:
        return compiles_stack(cfgs, "cuda", chosen)
    return any(compiles_model(c, "cuda", chosen) for c in cfgs)


def gpu_share(step_flops: Sequence[float], compiled: bool = False) -> float:
    """The share of a GPU a worker training members whose steps take ``step_flops`` (hardware
    FLOPs each) gets by default: the shares they would have alone (a third compiled, else an
    eighth for a small step and half for a large one), at most a GPU. A group of four small trials on an eighth of a GPU
    would get a quarter of the GPU time they had alone, which fusing cannot make up (at most
    1.5x over time-slicing, above)."""
    if compiled:
        return min(1.0, COMPILED_SHARE * len(step_flops))
    return min(1.0, sum(SMALL_SHARE if f < SMALL_STEP_FLOPS else LARGE_SHARE for f in step_flops))


# --- data-parallel trials ---------------------------------------------------------------

# A grid cannot end before its longest trial. One whose compute, alone on one GPU, would outlast
# the rest of the grid spread over the other GPUs (compute x GPUs > the grid's compute) is its
# tail: it trains on several GPUs at once (Ray Train, DDP), as many as make its share of the GPUs
# its share of the compute, at most a node's eight. In scaling.yaml, B-12/Wi-1024 on all of
# ImageNet-21k for 800 epochs is 8.8 billion images, 4.8 h at the 512k images/s its trial
# reached on an H100 (benchmarks/main_job.py): a fifth of the grid's compute.
MAX_WORKERS = 8


def data_parallel_workers(compute: float, grid_compute: float, gpus: float) -> int:
    """Workers of a trial of ``compute`` in a grid of ``grid_compute`` on ``gpus`` GPUs: one
    unless it would be the grid's tail, then its share of the GPUs, at most :data:`MAX_WORKERS`."""
    if gpus < 2 or compute * gpus <= grid_compute:
        return 1
    return int(min(MAX_WORKERS, math.floor(gpus), math.ceil(compute * gpus / grid_compute)))


# --- checkpoints ---------------------------------------------------------------------------

# A checkpoint holds training up while its state is copied to host memory (the write to disk runs
# on a thread). Taken at every epoch end the write allowed, the main job's trials on a third of an
# H100 (batch 16384, 10,450 classes, 400k images: epochs of 0.5-2 s) paused 24 ms an epoch
# (B-6/Wi-256) to 151 ms (B-6/Wi-1024, 1.3 s epochs), and 5.9% of the trials' time went between
# epochs (benchmarks/main_job.py). A checkpoint that is not required waits until training since
# the last copy has taken that copy's time over this share: copies cost at most 1% of training.
CHECKPOINT_COPY_SHARE = 0.01


# --- memory and data ----------------------------------------------------------------------

# Of a trial's share of GPU memory, what neither its model nor its data may take: the CUDA
# context, cuBLAS and compiler workspaces, the streaming loader's batches in flight and the
# caching allocator's fragmentation. On the H200 (139 GiB) a budget of 90% less the measured
# model trained B-6/Wi-256 and B-12/Wi-1024 at batch 16384 with 2M images streaming beside it.
RESERVED_SHARE = 0.1
# Images a trial keeps in host memory on the CPU, where the "device" is the host.
CPU_DATA_BUDGET_BYTES = 8 * 2**30


def gpu_data_budget(gpu_bytes: float, share: float, training_bytes: float) -> float:
    """Bytes of images a worker may keep on a GPU of ``gpu_bytes``: what its ``share`` spares
    beside ``training_bytes`` (what training its models takes, measured) and the reserve."""
    return max(0.0, (1 - RESERVED_SHARE) * share * gpu_bytes - training_bytes)


# What a training process holds on its GPU besides what the caching allocator counts: the CUDA
# context, cuBLAS workspaces and the compiled kernels (about 0.5 GiB on an H100 with torch 2.11).
CUDA_CONTEXT_BYTES = 0.75 * 2**30
# Bytes a step keeps per element: each hidden element as a bf16 output and a bf16 saved input of
# the next op; each logit in bf16, in fp32 for the loss and as its fp32 gradient.
HIDDEN_BYTES, LOGIT_BYTES = 4, 10
# The estimate below against the measured peak of one step (training.setup.training_bytes) on the
# H200 machine, batch 16384, 10,450 classes: B-6/Wi-256 3.9 GiB estimated against 3.6 GiB measured,
# B-12/Wi-1024 14.6 against 9.7 (an estimate errs high: it decides what a trial may share).
ESTIMATE_SLACK = 1.25


def training_memory(cfg: TrialConfig) -> float:
    """Bytes training ``cfg`` holds on a GPU at its peak, estimated without one: weights, gradients
    and optimizer state in fp32, one step's activations and logits at its batch size, the input
    batch in bf16; times :data:`ESTIMATE_SLACK`."""
    model = cfg.model_config()
    weights = 4 * architecture.count_params(model) * (2 + OPTIMIZER_STATE_SLOTS[cfg.optimizer])
    example = HIDDEN_BYTES * architecture.hidden_elements(model) + LOGIT_BYTES * model.num_classes
    example += 2 * model.in_features
    return ESTIMATE_SLACK * (weights + cfg.batch_size * example)


def memory_share(training_bytes: float, gpu_bytes: float) -> float:
    """The share of a GPU of ``gpu_bytes`` a worker training ``training_bytes`` needs, with its
    CUDA context: in eighths of a GPU, at most one."""
    return min(1.0, math.ceil(8 * (training_bytes + CUDA_CONTEXT_BYTES) / gpu_bytes - 1e-9) / 8)


def memory_cap(share: float, gpu_bytes: float) -> float:
    """The fraction of its GPU's memory a worker on ``share`` of it may allocate: its share less
    its CUDA context, which the allocator does not count. Beyond it the worker runs out of memory
    itself instead of taking its neighbours'."""
    return max(0.0, min(1.0, share - CUDA_CONTEXT_BYTES / gpu_bytes))


# A trial that runs out of memory on its GPU is retried with its data budget (the images kept on
# the device) scaled by these in turn, the last streaming every image; only then does it fail.
OOM_DATA_BUDGET_SCALES = (0.5, 0.25, 0.0)


def data_budget_after_oom(scale: float) -> float | None:
    """The data budget's scale for the retry after an out-of-memory error at ``scale``; None
    when every image already streamed (the trial does not fit its share)."""
    smaller = [s for s in OOM_DATA_BUDGET_SCALES if s < scale]
    return smaller[0] if smaller else None


# Streamed images reach the step from CPU threads at ~0.86M/s (16 cores of the H200 machine) and
# at 2.9M/s when the GPU reads them from host memory itself, which costs the step SM time:
# B-6/Wi-256 (batch 16384) streamed at 1.54M/s reading host memory, 0.84M/s from threads;
# B-12/Wi-1024 at 95% of its resident rate reading host memory, 99% from threads. Threads keep
# up with a step of at least this many hardware FLOPs per image (400 TFLOP/s / 0.86M images/s).
THREADS_KEEP_UP_FLOPS = 4.5e8


def gpu_reads_stream(flops_per_image: float) -> bool:
    """Whether the GPU gathers streamed rows from host memory itself (else CPU threads do),
    for a step of ``flops_per_image`` hardware FLOPs per image (all members of a group)."""
    return flops_per_image < THREADS_KEEP_UP_FLOPS


# --- threads ------------------------------------------------------------------------------


def torch_threads(granted_cpus: float) -> int:
    """Torch threads of a worker granted ``granted_cpus`` cores: as many, at least one. CPU
    results depend on the thread count, so a trial is reproducible given its config and its
    ``--cpus-per-trial``."""
    return max(1, int(granted_cpus))
