"""The names of what a trial measures, as MLflow records them.

Per epoch (``step`` = the epoch): :data:`EPOCH`, :data:`DATA` and on hardware that measures
them :data:`HARDWARE`. Once per attempt at a trial (``step`` = the attempt): :data:`ATTEMPT`. The
stages after pre-training log ``<stage>.<key>`` once (``test_error_tta`` for test-time
augmentation). Any error a trial reports can be the grid's ``metric``, the one ``frontier`` fits.
"""

from __future__ import annotations

from typing import Any

TEST_ERROR = "test_error"  # the final epoch's test error: the default metric of a grid
EPOCH = ("epoch", "train_loss", "test_loss", TEST_ERROR, "lr", "images_per_s", "epoch_seconds")
BEST_TEST_ERROR = "best_test_error"  # the lowest test error up to each epoch, logged with it
HARDWARE = ("tflops", "mfu", "memory_gb")  # MFU and the peak GPU memory held in the epoch on GPUs only
DATA = ("resident_share",)  # the part of the training images kept on the device (the rest streamed)
PER_EPOCH = EPOCH + HARDWARE + DATA
ATTEMPT = ("startup_seconds", "compile_seconds")
# What differs between two runs of the same trial; everything else is a function of its config.
TIMING = ("images_per_s", "epoch_seconds", "tflops", "mfu", "memory_gb", "compile_seconds")

TTA_STAGE = "tta"
TTA_ERROR = "test_error_tta"


def probe_stage(dataset: str) -> str:
    return f"{dataset}.linear_probe"


def finetune_stage(dataset: str) -> str:
    return f"{dataset}.finetune"


def stage_metrics(stage: str, result: dict[str, float]) -> dict[str, float]:
    """A finished stage's result as MLflow metrics."""
    if stage == TTA_STAGE:
        return {TTA_ERROR: result["error"]}
    return {f"{stage}.{key}": value for key, value in result.items()}


def errors_reported(cfg: Any) -> set[str]:
    """The errors a trial of config ``cfg`` (a :class:`mlpgrid.grid.spec.TrialConfig`) logs."""
    names = {TEST_ERROR} | ({TTA_ERROR} if cfg.tta else set())
    names |= {f"{probe_stage(d)}.error" for d in cfg.probe_datasets}
    return names | {f"{finetune_stage(d)}.error" for d in cfg.finetune_datasets}
