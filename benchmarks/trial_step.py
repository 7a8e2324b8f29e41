"""Trial speed on a GPU: a bare training step against mlpgrid's full trial step.

    python benchmarks/trial_step.py                                  # default models and batches
    python benchmarks/trial_step.py --config B-12/Wi-1024:16384 --json trial_step.json

For each model and batch size:

- bare step: the model on one random bf16 batch already on the GPU, bf16 autocast, fused
  AdamW, plain cross-entropy; eager and ``torch.compile``'d. The hardware's pace for the model.
- trial step: :func:`mlpgrid.training.loop.run_trial` itself on a CIFAR-10-sized dataset (random
  pixels in CIFAR-10's file layout, 32x32 resized to 64x64, kept on the GPU) with the paper's
  recipe: flips, 4-pixel crops, MixUp 0.8, Lion, label smoothing 0.3, warm-up and cosine
  decay. Its images/s are the ones it logs per epoch (training only, the first epoch left out:
  it includes Lion's kernel tuning); eager and compiled.

The trial/bare ratio compares compiled with compiled. Then the optimizer update alone for the
largest model: lion-pytorch's Lion one tensor at a time, in its foreach form (eager trials on
CUDA), in its Triton form, mlpgrid's compiled Lion (compiled trials) and fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import write_cifar10  # noqa: E402

from mlpgrid import data  # noqa: E402
from mlpgrid.grid.layout import TrialLayout  # noqa: E402
from mlpgrid.grid.spec import TrialConfig  # noqa: E402
from mlpgrid.models import architecture, networks
from mlpgrid.training.hardware import matmul_peak_tflops  # noqa: E402
from mlpgrid.training.loop import run_trial  # noqa: E402
from mlpgrid.training.setup import TrialOptions  # noqa: E402
from mlpgrid.training.step import autocast  # noqa: E402

SIDE, CLASSES = 64, 10
RECIPE = dict(optimizer="lion", lr=1e-4, weight_decay=1e-4, label_smoothing=0.3, flip=True, crop_padding=4,
              mixup=0.8, warmup_epochs=1, schedule="cosine")  # fmt: skip


def sync() -> None:
    torch.cuda.synchronize()


def make_bare_step(name: str, batch: int, compiled: bool, classes: int = CLASSES) -> Callable[[], None]:
    """One training step of the model on a random bf16 batch already on the GPU."""
    cfg = architecture.config_for(name, 3 * SIDE * SIDE, classes)
    model = networks.MLP(cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, SIDE, SIDE, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, classes, (batch,), device="cuda")
    net = torch.compile(model, dynamic=False) if compiled else model

    def step() -> None:
        with autocast(x.device):
            loss = F.cross_entropy(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bare_step(name: str, batch: int, compiled: bool, steps: int, classes: int = CLASSES) -> dict[str, float]:
    """Images/s of the model's step on a batch already on the GPU, and seconds until it first ran."""
    step = make_bare_step(name, batch, compiled, classes)
    started = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return {"images_per_s": batch * steps / (time.perf_counter() - started), "first_seconds": first}


def trial_step(name: str, batch: int, compiled: bool, epochs: int, arrays: data.ImageArrays, root: Path,
               work: Path) -> dict[str, float]:  # fmt: skip
    """Images/s and TFLOP/s that ``run_trial`` logs, epochs after the first; its compile seconds."""
    cfg = TrialConfig(model=name, dataset="cifar-10", resolution=SIDE, examples=len(arrays.train_labels),
                      epochs=epochs, batch_size=batch, **RECIPE)  # fmt: skip
    datasets = data.Datasets({"cifar-10": root})
    datasets.keep(cfg.dataset, cfg.resolution, cfg.channels, arrays)
    layout = TrialLayout(Path(tempfile.mkdtemp(dir=work)))
    result = run_trial(cfg, layout, TrialOptions(compile=compiled), datasets=datasets)
    later = result.history[1:]
    return {
        "images_per_s": statistics.mean(m["images_per_s"] for m in later),
        "tflops": statistics.mean(m["tflops"] for m in later),
        "mfu": statistics.mean(m["mfu"] for m in later),
        "compile_seconds": result.history[0].get("compile_seconds", 0.0),
    }


def optimizer_update(name: str, steps: int) -> dict[str, float]:
    """Milliseconds of one optimizer update of the model's parameters, per implementation."""
    from lion_pytorch import Lion
    from lion_pytorch.foreach import Lion as ForeachLion

    from mlpgrid.training.optim import CompiledLion

    cfg = architecture.config_for(name, 3 * SIDE * SIDE, CLASSES)
    params = [p.detach().requires_grad_() for p in networks.MLP(cfg).cuda().parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    makers = {
        "lion, per tensor": lambda: Lion(params, lr=1e-4, weight_decay=1e-4),
        "lion, foreach": lambda: ForeachLion(params, lr=1e-4, weight_decay=1e-4),
        "lion, triton": lambda: Lion(params, lr=1e-4, weight_decay=1e-4, use_triton=True),
        "lion, compiled": lambda: CompiledLion(params, lr=1e-4, weight_decay=1e-4),
        "adamw, fused": lambda: torch.optim.AdamW(params, lr=1e-4, fused=True),
    }
    result = {}
    for label, make in makers.items():
        optimizer = make()
        for _ in range(3):
            optimizer.step()
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        sync()
        result[label] = 1e3 * (time.perf_counter() - started) / steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", metavar="MODEL:BATCH",
                        help="model and batch size; repeatable (default: B-12/Wi-1024 at 16384 and 4096, "
                             "B-6/Wi-512 at 4096)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=30, help="timed bare steps")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each trial (the first is not counted)")
    parser.add_argument("--train", type=int, default=50_000, help="training images of the synthetic dataset")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("trial_step.py measures GPU speed; no CUDA device here")
    configs = [c.rsplit(":", 1) for c in args.config or ["B-12/Wi-1024:16384", "B-12/Wi-1024:4096", "B-6/Wi-512:4096"]]
    peak = matmul_peak_tflops(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak:.0f} TFLOP/s (measured), torch {torch.__version__}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = write_cifar10(work / "cifar-10-batches-py", train=args.train)
        arrays = data.load("cifar-10", str(root), SIDE, 3)
        for name, batch in configs:
            batch = int(batch)
            row = {"model": name, "batch": batch}
            for compiled in (False, True):
                mode = "compiled" if compiled else "eager"
                row[f"bare_{mode}"] = bare_step(name, batch, compiled, args.steps)
                row[f"trial_{mode}"] = trial_step(name, batch, compiled, args.epochs, arrays, root, work)
            row["trial_vs_bare"] = row["trial_compiled"]["images_per_s"] / row["bare_compiled"]["images_per_s"]
            rows.append(row)
            print(f"  done {name} @ {batch}", flush=True)
        updates = optimizer_update(max(configs, key=lambda c: architecture.count_params(
            architecture.config_for(c[0], 3 * SIDE * SIDE, CLASSES)))[0], args.steps)  # fmt: skip

    print()
    print(f"{'model':>13} {'batch':>6} | {'bare eager':>11} {'bare comp.':>11} | {'trial eager':>11} "
          f"{'trial comp.':>11} {'TFLOP/s':>8} {'MFU':>6} | {'trial/bare':>10} {'compile s':>9}")  # fmt: skip
    for r in rows:
        tc = r["trial_compiled"]
        print(f"{r['model']:>13} {r['batch']:>6} | {r['bare_eager']['images_per_s']:>11,.0f} "
              f"{r['bare_compiled']['images_per_s']:>11,.0f} | {r['trial_eager']['images_per_s']:>11,.0f} "
              f"{tc['images_per_s']:>11,.0f} {tc['tflops']:>8.1f} {tc['mfu']:>6.1%} | {r['trial_vs_bare']:>10.1%} "
              f"{tc['compile_seconds']:>9.1f}")  # fmt: skip
    print("(images/s; trial/bare = compiled trial step over compiled bare step)")
    print()
    for label, ms in updates.items():
        print(f"optimizer update {label:>22}: {ms:6.2f} ms")
    if args.json:
        report = {"device": torch.cuda.get_device_name(), "peak_tflops": peak, "rows": rows, "optimizer_ms": updates}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
