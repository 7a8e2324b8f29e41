"""A training step fed from a dataset larger than its data budget: fully resident, half resident
and fully streamed, side by side; and where the host stream stands against its limits.

    python benchmarks/residency.py --json residency.json          # on a GPU machine
    python benchmarks/residency.py --images 65536 --batch 4096    # a quick look

A prepared dataset of ``--images`` 64x64x3 uint8 images (2M by default: 25 GB) is written as
.npy to ``$TMPDIR`` and read back as a memory map, so the streamed images come from the page
cache. Pixel values do not change any cost measured here; the file repeats one random block.

1. Limits of the host part, each the best of ``--rounds`` over one batch of 16384 rows: a
   contiguous copy (host memory bandwidth), the random-row gather of the streaming loader
   (rows sorted, as it reads them, and unsorted) with 8 and with every core's threads, into
   pinned memory; the pinned host-to-device copy of one batch.
2. The streaming loader alone (nothing resident): the device reading host memory, and CPU
   threads gathering (8, and every core).
3. For each ``--model``: the trial's own step (the compiled model, mlpgrid's compiled Lion,
   label smoothing, MixUp, bf16) fed by the :class:`DeviceLoader` (resident), a
   :class:`StreamingLoader` with half the images on the device, and one with none (each with the
   device reading host memory, and with CPU threads gathering); against the same step on one
   batch already on the GPU. Rounds interleave them all, so that clocks and
   the page cache treat them alike; all run beside images filling the model's data budget:
   what :func:`mlpgrid.training.loop.training_bytes` measures for it leaves.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loader import batches, time_loader, time_steps  # noqa: E402  (benchmarks/loader.py)

from mlpgrid.data.loader import Augmentation, DeviceLoader, StreamingLoader, device_bytes, usable_cores  # noqa: E402
from mlpgrid.models import architecture, networks  # noqa: E402
from mlpgrid.training.hardware import default_data_budget  # noqa: E402
from mlpgrid.training.optim import CompiledLion  # noqa: E402
from mlpgrid.training.setup import training_bytes  # noqa: E402
from mlpgrid.training.step import compile_for_training, train_step  # noqa: E402

AUG = Augmentation(flip=True, crop_padding=4, mixup=0.8)
CLASSES = 10_450  # ImageNet-21k's, as in the paper's pre-training


def write_dataset(path: Path, n: int, side: int) -> np.ndarray:
    block = np.random.default_rng(0).integers(0, 256, (8192, 3, side, side), dtype=np.uint8)
    images = np.lib.format.open_memmap(path, "w+", np.uint8, (n, 3, side, side))
    for start in range(0, n, len(block)):
        images[start : start + len(block)] = block[: n - start]
    images.flush()
    return np.load(path, mmap_mode="r")


def best_seconds(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def in_parts(pool: ThreadPoolExecutor, threads: int, count: int, copy) -> None:
    """``copy(first, last)`` over ``threads`` consecutive parts of ``range(count)`` at once."""
    bounds = np.linspace(0, count, threads + 1).astype(int)
    list(pool.map(copy, bounds[:-1], bounds[1:]))


def host_limits(images: np.ndarray, batch: int, rounds: int, cuda: bool) -> dict:
    """Images/s of the host-side copies a streamed batch is made of."""
    rng = np.random.default_rng(1)
    rows = rng.choice(len(images), batch, replace=False)
    out = torch.empty((batch, *images.shape[1:]), dtype=torch.uint8, pin_memory=cuda)
    target = out.numpy()
    first = int(rng.integers(0, len(images) - batch))
    ordered = np.sort(rows)
    copies = {
        "contiguous copy": lambda a, b: np.copyto(target[a:b], images[first + a : first + b]),
        "gather, rows sorted": lambda a, b: np.take(images, ordered[a:b], axis=0, out=target[a:b]),
        "gather, rows unsorted": lambda a, b: np.take(images, rows[a:b], axis=0, out=target[a:b]),
    }
    results = {}
    for threads in sorted({8, usable_cores()}):
        with ThreadPoolExecutor(threads) as pool:
            for name, copy in copies.items():
                seconds = best_seconds(lambda c=copy, p=pool, t=threads: in_parts(p, t, batch, c), rounds)
                results[f"{name}, {threads} threads"] = batch / seconds
    if cuda:
        device_copy = torch.empty(out.shape, dtype=torch.uint8, device="cuda")

        def h2d():
            device_copy.copy_(out, non_blocking=True)
            torch.cuda.synchronize()

        h2d()
        results["pinned host-to-device copy"] = batch / best_seconds(h2d, rounds)
    return results


def continuing(loader, total: int):
    """``source(n)`` for :func:`loader.time_steps`: the next n of ``total`` batches of one stream of
    epochs, so that warming up and timing share one producer."""
    stream = batches(loader, total)
    return lambda n: itertools.islice(stream, n)


def make_step(name: str, side: int, batch: int, device: torch.device):
    """The trial's compiled model and optimizer, and one step of them on a batch."""
    torch.manual_seed(0)
    model = networks.build(architecture.config_for(name, 3 * side * side, CLASSES)).to(device)
    example = torch.zeros((batch, 3, side, side), dtype=torch.bfloat16, device=device)
    compiled, _ = compile_for_training(model, example)
    optimizer = CompiledLion(model.parameters(), lr=1e-5, weight_decay=1e-3)
    optimizer.compile_now()
    return lambda b: train_step(compiled, optimizer, b, 0.3, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2 * 2**20)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--model", action="append", help="repeatable; default B-6/Wi-256 and B-12/Wi-1024")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.model or ["B-6/Wi-256", "B-12/Wi-1024"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    side = args.resolution
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "cores": usable_cores(),
                     "images": args.images, "batch": args.batch}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        started = time.perf_counter()
        images = write_dataset(Path(tmp) / "train_images.npy", args.images, side)
        labels = np.random.default_rng(2).integers(0, CLASSES, args.images)
        seconds = time.perf_counter() - started
        print(f"dataset: {args.images:,} x 3x{side}x{side} ({images.nbytes / 1e9:.1f} GB) written in {seconds:.0f} s;"
              f" {usable_cores()} cores; {results['device']}", flush=True)  # fmt: skip
        results["host"] = host_limits(images, args.batch, args.rounds, cuda)
        for name, rate in results["host"].items():
            print(f"  {name:38} {rate:12,.0f} images/s  {rate * images[0].nbytes / 1e9:6.1f} GB/s", flush=True)

        common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device=device, seed=0, augmentation=AUG, compile=cuda)
        results["stream alone"] = {}
        alone = {f"CPU threads: {threads}": dict(threads=threads, host_view=False)
                 for threads in sorted({8, usable_cores()})}  # fmt: skip
        if cuda:
            alone["device reads host memory"] = {}
        for key, how in alone.items():
            loader = StreamingLoader(images, labels, args.batch, **how, **common)
            rate = args.batch / min(time_loader(loader, args.steps, 3, device) for _ in range(args.rounds))
            results["stream alone"][key] = rate
            print(f"  streaming loader alone, {key:25} {rate:12,.0f} images/s", flush=True)
            del loader
        if not cuda:
            args.json and args.json.write_text(json.dumps(results, indent=1))
            return

        started = time.perf_counter()
        made = {
            "resident": DeviceLoader(np.asarray(images), labels, args.batch, **common),
            "half resident": StreamingLoader(images, labels, args.batch, resident=args.images // 2, **common),
            "streamed": StreamingLoader(images, labels, args.batch, **common),
            "half resident, CPU threads": StreamingLoader(
                images, labels, args.batch, resident=args.images // 2, host_view=False, **common
            ),  # fmt: skip
            "streamed, CPU threads": StreamingLoader(images, labels, args.batch, host_view=False, **common),
        }
        print(f"loaders made in {time.perf_counter() - started:.0f} s", flush=True)
        first = {key: next(loader.epoch(3)).images for key, loader in made.items()}
        results["same batches"] = all(torch.equal(first["resident"], batch) for batch in first.values())
        print(f"every loader's first batch of an epoch equal to the resident one's: {results['same batches']}")
        del first
        results["models"] = {}
        for name in names:
            model_bytes = training_bytes(architecture.config_for(name, 3 * side * side, CLASSES),
                                         (args.batch, 3, side, side), lambda p: CompiledLion(p), device)  # fmt: skip
            budget = default_data_budget(device, 1.0, model_bytes)
            # The images on the device made up to the budget: the steps are timed beside a full one.
            held = sum(device_bytes(loader) for loader in made.values())
            filler = torch.empty(max(0, int(budget) - held), dtype=torch.uint8, device=device)
            step = make_step(name, side, args.batch, device)
            ready = next(made["resident"].epoch(0))
            rates: dict[str, float] = {}
            for _ in range(args.rounds):
                total = args.warmup + args.steps
                sources = {"batch on the GPU": lambda n, r=ready: itertools.repeat(r, n),
                           **{key: continuing(loader, total) for key, loader in made.items()}}  # fmt: skip
                for key, source in sources.items():
                    rate = args.batch / time_steps(step, source, args.steps, args.warmup, device)
                    rates[key] = max(rates.get(key, 0.0), rate)
            results["models"][name] = {"images_per_s": rates, "training_gb": model_bytes / 2**30,
                                       "data_budget_gb": budget / 2**30}  # fmt: skip
            print(f"{name} at batch {args.batch} ({CLASSES} classes): training takes {model_bytes / 2**30:.1f} GiB,"
                  f" the data budget beside it {budget / 2**30:.1f} GiB; peak memory of this run so far"
                  f" {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")  # fmt: skip
            for key, rate in rates.items():
                print(f"  {key:26} {rate:12,.0f} images/s  {rate / rates['resident']:6.1%} of resident", flush=True)
            del step, filler
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
