"""One trial fed from an FFCV ``.beton`` against the same trial fed from ``.npy``, in one run,
each beside its loader alone.

    python benchmarks/ffcv_trial.py --json ffcv_trial.json      # needs FFCV (mlpgrid[ffcv])

A CIFAR-10-layout source of random pixels (``--images`` training images) is prepared twice at
``--resolution``, as ``.npy`` and as ``.beton``; a trial of ``--model`` then trains on each with
the paper's augmentation (flips, crops, MixUp), with the data budget at 0 so that the ``.npy``
trial streams too. Printed per format: the trial's training images/s (its epochs after the
first), and the images/s of its training loader alone over one epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loader import time_loader  # noqa: E402  (benchmarks/loader.py)
from synthetic import write_cifar10  # noqa: E402

from mlpgrid import data  # noqa: E402
from mlpgrid.data.prepare import Request, prepare  # noqa: E402
from mlpgrid.grid.layout import TrialLayout  # noqa: E402
from mlpgrid.grid.spec import TrialConfig  # noqa: E402
from mlpgrid.training.loop import run_trial  # noqa: E402
from mlpgrid.training.setup import TrialOptions, load_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--model", default="B-6/Wi-256")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", **vars(args)}
    results.pop("json")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = write_cifar10(root / "source", train=args.images, test=2048)
        datasets = data.Datasets()
        for fmt in ("npy", "beton"):
            name = f"random-{fmt}"
            prepare(Request(name, source, root / name, "cifar-10", resolution=args.resolution, format=fmt))
            data.register(name, root / name)
            cfg = TrialConfig(model=args.model, dataset=name, epochs=args.epochs, batch_size=args.batch, flip=True,
                              crop_padding=4, mixup=0.8, label_smoothing=0.3)  # fmt: skip
            options = TrialOptions(data_budget_bytes=0.0)
            train, _ = load_data(cfg, datasets, device, 0.0)
            loader_rate = args.batch / time_loader(train, len(train), 2, device)
            del train
            layout = TrialLayout(root / f"trial-{fmt}")
            history = run_trial(cfg, layout, options, datasets=datasets, device=device).history
            trial_rate = sum(m["images_per_s"] for m in history[1:]) / max(1, len(history) - 1)
            results[fmt] = {"trial_images_per_s": trial_rate, "loader_alone_images_per_s": loader_rate,
                            "test_error": history[-1]["test_error"]}  # fmt: skip
            print(f"{fmt:5}: trial {trial_rate:10,.0f} images/s; its loader alone {loader_rate:10,.0f} images/s"
                  f" ({trial_rate / loader_rate:.0%})", flush=True)  # fmt: skip
    beton, npy = results["beton"], results["npy"]
    print(f"beton / npy: trial {beton['trial_images_per_s'] / npy['trial_images_per_s']:.2f}x,"
          f" loader alone {beton['loader_alone_images_per_s'] / npy['loader_alone_images_per_s']:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
