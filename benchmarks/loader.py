"""Loader throughput, and what the loader costs a training step.

    python benchmarks/loader.py                         # CPU: a smaller batch by default
    python benchmarks/loader.py --batch 16384 --json loader.json   # on a GPU

A prepared dataset of ``--images`` 64x64x3 uint8 images is written to a temporary directory as
.npy and (when FFCV is installed) .beton. The pixel values are random: no loader's cost
depends on them. Each loader then delivers ``--steps`` batches with the paper's augmentations
(flips, crops from 4-pixel padding, MixUp 0.8), timed after a warm-up epoch's first batches.

On CUDA it also times a full training step of ``--model`` (bf16 autocast, Lion, label
smoothing 0.3, MixUp loss) fed by each loader, against the same step on one batch prepared
beforehand and already on the GPU; the difference is what the loader costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlpgrid.data import beton  # noqa: E402
from mlpgrid.data.loader import Augmentation, Batch, DeviceLoader, StreamingLoader  # noqa: E402
from mlpgrid.models import architecture, networks  # noqa: E402

AUG = Augmentation(flip=True, crop_padding=4, mixup=0.8)


def write_dataset(root: Path, n: int, side: int, with_beton: bool) -> None:
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(root / "train_images.npy", "w+", np.uint8, (n, 3, side, side))
    for start in range(0, n, 8192):
        images[start : start + 8192] = rng.integers(0, 256, images[start : start + 8192].shape, dtype=np.uint8)
    images.flush()
    np.save(root / "train_labels.npy", rng.integers(0, 1000, n))
    if with_beton:
        beton.write(root / "train_images.npy", root / "train_labels.npy", root / "train.beton")


def loaders(root: Path, batch: int, device: torch.device, names: list[str]) -> dict:
    mapped = np.load(root / "train_images.npy", mmap_mode="r")
    labels = np.load(root / "train_labels.npy")
    common = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=device, seed=0, augmentation=AUG)
    makers = {
        "device (eager aug)": lambda: DeviceLoader(np.asarray(mapped), labels, batch, **common),
        "device (compiled aug)": lambda: DeviceLoader(np.asarray(mapped), labels, batch, compile=True, **common),
        "stream from RAM": lambda: StreamingLoader(np.array(mapped), labels, batch, compile=True, **common),
        "stream from memmap": lambda: StreamingLoader(mapped, labels, batch, compile=True, **common),
        "half resident, rest memmap": lambda: StreamingLoader(
            mapped, labels, batch, resident=len(labels) // 2, compile=True, **common
        ),
        "ffcv (.beton)": lambda: beton.FfcvLoader(root / "train.beton", labels, batch, compile=True, **common),
    }
    return {name: makers[name] for name in names}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(loader, steps: int):
    """``steps`` batches, cycling epochs as needed."""
    epoch, given = 0, 0
    while True:
        for batch in loader.epoch(epoch):
            yield batch
            given += 1
            if given == steps:
                return
        epoch += 1


def time_loader(loader, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per batch of the loader alone."""
    for _ in batches(loader, warmup):
        pass
    sync(device)
    started = time.perf_counter()
    for batch in batches(loader, steps):
        batch.images.sum()  # touch the output, as a model would
    sync(device)
    return (time.perf_counter() - started) / steps


def make_step(model_name: str, side: int, device: torch.device):
    from lion_pytorch import Lion

    torch.manual_seed(0)
    model = networks.MLP(architecture.config_for(model_name, 3 * side * side, 1000)).to(device)
    optimizer = Lion(model.parameters(), lr=1e-5, weight_decay=1e-3)

    def step(batch: Batch) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch.images).float()
        loss = batch.lam * F.cross_entropy(logits, batch.labels, label_smoothing=0.3)
        loss = loss + (1 - batch.lam) * F.cross_entropy(logits, batch.mixed_labels, label_smoothing=0.3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_steps(step, source, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per training step; ``source(n)`` yields n batches (a loader's, or one batch repeated)."""
    for batch in source(warmup):
        step(batch)
    sync(device)
    started = time.perf_counter()
    for batch in source(steps):
        step(batch)
    sync(device)
    return (time.perf_counter() - started) / steps


def profile(loader, steps: int) -> str:
    """The CUDA kernels of ``steps`` loader batches, by total time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in batches(loader, 2):
        pass
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches(loader, steps):
            batch.images.sum()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000, help="dataset size (CIFAR-sized by default)")
    parser.add_argument("--batch", type=int, default=16384 if cuda else 2048)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--model", default="B-12/Wi-1024")
    parser.add_argument("--no-step", action="store_true", help="only the loaders, no training step (CPU default)")
    parser.add_argument("--rounds", type=int, default=2, help="each timing is the best of this many")
    parser.add_argument("--profile", action="store_true", help="print the kernels of the compiled device loader")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    # Whole batches only, so that every step (with a loader or without) sees the same batch size.
    args.images = -(-args.images // args.batch) * args.batch

    try:
        beton.require()
        have_ffcv = True
    except RuntimeError as e:
        print(f"ffcv: skipped ({str(e)[:60]}...)")
        have_ffcv = False
    names = ["device (eager aug)", "stream from RAM", "stream from memmap", "half resident, rest memmap"]
    if cuda:
        names.insert(1, "device (compiled aug)")
    if have_ffcv:
        names.append("ffcv (.beton)")

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_dataset(root, args.images, args.resolution, have_ffcv)
        print(f"dataset: {args.images} x 3x{args.resolution}x{args.resolution} uint8 written in "
              f"{time.perf_counter() - started:.1f} s; batch {args.batch}; {torch.get_num_threads()} CPU threads; "
              f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")  # fmt: skip
        results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": args.batch,
                   "images": args.images, "resolution": args.resolution, "loaders": {}}  # fmt: skip
        made = {name: make() for name, make in loaders(root, args.batch, device, names).items()}
        for name, loader in made.items():
            seconds = min(time_loader(loader, args.steps, args.warmup, device) for _ in range(args.rounds))
            results["loaders"][name] = {"ms_per_batch": 1e3 * seconds, "images_per_s": args.batch / seconds}

        if cuda and not args.no_step:
            step = make_step(args.model, args.resolution, device)
            fixed = next(iter(made["device (compiled aug)"].epoch(0)))
            premade = []
            for _ in range(args.rounds):  # the step on a ready batch is timed in every round, beside the loaders
                premade.append(time_steps(step, lambda n: [fixed] * n, args.steps, args.warmup, device))
                for name, loader in made.items():
                    seconds = time_steps(step, lambda n, lo=loader: batches(lo, n), args.steps, args.warmup, device)
                    entry = results["loaders"][name]
                    entry["step_ms"] = min(entry.get("step_ms", 1e9), 1e3 * seconds)
            on_gpu = min(premade) * 1e3
            results["step"] = {
                "model": args.model,
                "premade_ms": on_gpu,
                "premade_ms_rounds": [1e3 * p for p in premade],
            }
            for entry in results["loaders"].values():
                entry["loader_share"] = 1 - on_gpu / entry["step_ms"]
            # The fused kernel writes bf16; how far is it from the eager float32 result?
            eager = next(iter(made["device (eager aug)"].epoch(0))).images
            results["compiled_vs_eager_max_abs_diff"] = (fixed.images.float() - eager).abs().max().item()

    print(f"{'loader':27} {'ms/batch':>9} {'images/s':>12}" + (f" {'step ms':>9} {'loader share':>13}" if
          "step" in results else ""))  # fmt: skip
    for name, r in results["loaders"].items():
        line = f"{name:27} {r['ms_per_batch']:9.2f} {r['images_per_s']:12,.0f}"
        if "step_ms" in r:
            line += f" {r['step_ms']:9.2f} {100 * r['loader_share']:12.1f}%"
        print(line)
    if "step" in results:
        print(
            f"{args.model} step on a batch already on the GPU: {results['step']['premade_ms']:.2f} ms; compiled vs "
            f"eager augmentation max |diff| {results['compiled_vs_eager_max_abs_diff']:.4f} (bf16 rounding)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.profile and cuda:
        print(profile(made["device (compiled aug)"], 8))


if __name__ == "__main__":
    main()
