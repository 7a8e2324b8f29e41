"""Every decision of :mod:`mlpgrid.policy`, as one table: the inputs, the call, the answer."""

import dataclasses

import pytest

from conftest import REPO
from mlpgrid import policy
from mlpgrid.grid import spec
from mlpgrid.grid.spec import TrialConfig

QUICK = [t.config for t in spec.load(REPO / "grids" / "quickstart.yaml").trials]
# The largest trial of the paper's scaling grid: B-12/Wi-1024 on all of ImageNet-21k for 800 epochs.
LONG = max(spec.load(REPO / "grids" / "scaling.yaml").trials, key=lambda t: t.compute).config
# A small model for many epochs: too little compute to compile the model, images enough for the augmentation.
MANY = dataclasses.replace(QUICK[0], examples=50_000, epochs=100)
SMALL_STEP = TrialConfig(model="B-6/Wi-256", batch_size=4096, examples=1_000_000, epochs=40)  # 0.15 TFLOP a step
LARGE_STEP = dataclasses.replace(SMALL_STEP, model="B-12/Wi-1024")  # 2.8 TFLOP a step
BATCHNORM = dataclasses.replace(SMALL_STEP, norm="batchnorm")
REPMLPNET = dataclasses.replace(SMALL_STEP, model="RepMLPNet-T/4", resolution=32)  # BatchNorm throughout
SHORT = dataclasses.replace(SMALL_STEP, examples=1000, epochs=1)
HOURS = dataclasses.replace(SMALL_STEP, epochs=400_000)  # 3 h at the bf16 matmul limit
GiB = 2**30
# The recipe's shape: batch 16384, 10,450 classes at 64x64x3, Lion (training.setup.training_bytes
# measured one step's peak on the H200 machine: 3.6 GiB for B-6/Wi-256, 9.7 GiB for B-12/Wi-1024).
PAPER = {t.config.model: t.config for t in spec.load(REPO / "grids" / "scaling.yaml").trials}

DECISIONS = [
    # (what, call, answer)
    (
        "quick-start trials compile no model on a GPU",
        lambda: any(policy.compiles_model(c, "cuda") for c in QUICK),
        False,
    ),
    ("the longest scaling trial compiles on a GPU", lambda: policy.compiles_model(LONG, "cuda"), True),
    ("nothing compiles on the CPU", lambda: policy.compiles_model(LONG, "cpu"), False),
    ("compile: true compiles a short trial", lambda: policy.compiles_model(QUICK[0], "cuda", True), True),
    ("compile: false keeps a long one eager", lambda: policy.compiles_model(LONG, "cuda", False), False),
    (
        "quick-start augmentation stays eager",
        lambda: any(policy.compiles_augmentation(c, "cuda") for c in QUICK),
        False,
    ),
    ("augmentation compiles with the model", lambda: policy.compiles_augmentation(LONG, "cuda"), True),
    ("augmentation compiles for many images", lambda: policy.compiles_augmentation(MANY, "cuda"), True),
    ("... where the model does not", lambda: policy.compiles_model(MANY, "cuda"), False),
    ("no augmentation compiles on the CPU", lambda: policy.compiles_augmentation(MANY, "cpu"), False),
    ("compile: false keeps the augmentation eager", lambda: policy.compiles_augmentation(MANY, "cuda", False), False),
    ("compile: true compiles it", lambda: policy.compiles_augmentation(QUICK[0], "cuda", True), True),
    ("a long fused group compiles its stack", lambda: policy.compiles_stack([SMALL_STEP] * 4, "cuda"), True),
    ("a short one does not", lambda: policy.compiles_stack([SHORT] * 4, "cuda"), False),
    ("no stack compiles on the CPU", lambda: policy.compiles_stack([SMALL_STEP] * 4, "cpu"), False),
    ("small steps fuse on a GPU", lambda: policy.fuses(SMALL_STEP, "cuda"), True),
    ("large steps do not", lambda: policy.fuses(LARGE_STEP, "cuda"), False),
    ("the CPU steps members one after another", lambda: policy.fuses(SMALL_STEP, "cpu"), False),
    ("fuse: true fuses large steps", lambda: policy.fuses(LARGE_STEP, "cuda", True), True),
    ("batch norm never fuses", lambda: policy.fuses(BATCHNORM, "cuda", True), False),
    ("nor does a RepMLPNet: its members step one after another", lambda: policy.fuses(REPMLPNET, "cuda", True), False),
    (
        "batch norm does not stack: its statistics are each member's",
        lambda: policy.stacks(BATCHNORM.model_config()),
        False,
    ),
    ("layer norm stacks", lambda: policy.stacks(SMALL_STEP.model_config()), True),
    ("a long group of small steps pays on a GPU", lambda: policy.group_pays_on_gpu([SMALL_STEP] * 4), True),
    ("a short one does not", lambda: policy.group_pays_on_gpu([SHORT] * 4), False),
    ("... unless fusing was chosen", lambda: policy.group_pays_on_gpu([SHORT] * 4, True), True),
    ("one member is no group", lambda: policy.group_pays_on_gpu([SMALL_STEP]), False),
    ("large steps do not group on a GPU", lambda: policy.group_pays_on_gpu([LARGE_STEP] * 4), False),
    (
        "automatic GPU groups of trials of minutes stay within one T",
        lambda: policy.groups_across_epochs(SMALL_STEP, "cuda", automatic=True),
        False,
    ),
    (
        "those of trials of hours even at the matmul limit span T",
        lambda: policy.groups_across_epochs(HOURS, "cuda", automatic=True),
        True,
    ),
    ("--group K groups across T", lambda: policy.groups_across_epochs(SMALL_STEP, "cuda", automatic=False), True),
    ("CPU groups span T", lambda: policy.groups_across_epochs(SMALL_STEP, "cpu", automatic=True), True),
    ("a small step gets an eighth of a GPU", lambda: policy.gpu_share([0.15e12]), 0.125),
    ("a large step half", lambda: policy.gpu_share([2.8e12 * 2]), 0.5),
    (
        "a compiled step a third: not launch-bound, and two train while one starts up",
        lambda: policy.gpu_share([0.15e12], compiled=True),
        1 / 3,
    ),
    ("four small members half: what they had alone", lambda: policy.gpu_share([0.15e12] * 4), 0.5),
    ("a group never more than a GPU", lambda: policy.gpu_share([0.15e12] * 4 + [5e12] * 4), 1.0),
    ("an 80 GB GPU leaves 90% less training", lambda: policy.gpu_data_budget(80 * GiB, 1.0, 8 * GiB), 64 * GiB),
    ("an eighth of it", lambda: policy.gpu_data_budget(80 * GiB, 0.125, 1 * GiB), 8 * GiB),
    ("never below nothing", lambda: policy.gpu_data_budget(80 * GiB, 0.125, 20 * GiB), 0.0),
    ("B-6/Wi-256 streams through the GPU's reads", lambda: policy.gpu_reads_stream(1.0e8), True),
    ("B-12/Wi-1024 through CPU threads", lambda: policy.gpu_reads_stream(7.5e8), False),
    (
        "B-6/Wi-256's estimate is at least its measured peak",
        lambda: 3.6 * GiB <= policy.training_memory(PAPER["B-6/Wi-256"]) <= 5 * GiB,
        True,
    ),
    ("B-12/Wi-1024's too", lambda: 9.7 * GiB <= policy.training_memory(PAPER["B-12/Wi-1024"]) <= 16 * GiB, True),
    (
        "Adam keeps more state than Lion",
        lambda: (
            policy.training_memory(dataclasses.replace(PAPER["B-12/Wi-1024"], optimizer="adamw"))
            > policy.training_memory(PAPER["B-12/Wi-1024"])
        ),
        True,
    ),
    ("a small model's memory fits an eighth of an 80 GB GPU", lambda: policy.memory_share(4 * GiB, 80e9), 0.125),
    ("B-12/Wi-1024's needs a quarter", lambda: policy.memory_share(14.6 * GiB, 80e9), 0.25),
    ("a model larger than the GPU gets all of it", lambda: policy.memory_share(100 * GiB, 80e9), 1.0),
    (
        "a worker may allocate its share less its context",
        lambda: policy.memory_cap(0.125, 80e9),
        0.125 - 0.75 * GiB / 80e9,
    ),
    ("out of memory: half the data budget", lambda: policy.data_budget_after_oom(1.0), 0.5),
    ("then a quarter", lambda: policy.data_budget_after_oom(0.5), 0.25),
    ("then every image streamed", lambda: policy.data_budget_after_oom(0.25), 0.0),
    ("then it fails: it does not fit its share", lambda: policy.data_budget_after_oom(0.0), None),
    ("a tenth of a grid's compute on 8 GPUs: one GPU", lambda: policy.data_parallel_workers(1, 10, 8), 1),
    ("one of a fifth would be the tail: its share of the GPUs", lambda: policy.data_parallel_workers(2, 10, 8), 2),
    ("one of half: four", lambda: policy.data_parallel_workers(5, 10, 8), 4),
    ("at most a node's eight", lambda: policy.data_parallel_workers(9, 10, 16), 8),
    ("on one GPU, one", lambda: policy.data_parallel_workers(9, 10, 1), 1),
    ("a worker gets a thread per core granted", lambda: policy.torch_threads(4.0), 4),
    ("... and at least one", lambda: policy.torch_threads(0.5), 1),
]


@pytest.mark.parametrize("what,call,answer", DECISIONS, ids=[row[0] for row in DECISIONS])
def test_the_policy_decides(what, call, answer):
    assert call() == pytest.approx(answer) if isinstance(answer, float) else call() == answer
