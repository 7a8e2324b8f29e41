"""Grid throughput against the number of GPUs: the same grid with 1, 2, 4 and 8 GPUs visible.

    python benchmarks/grid_scaling.py                       # 1, 2, 4, 8 GPUs, as many as there are
    python benchmarks/grid_scaling.py --gpus 1 --gpus 2 --scale 0.3 --timeout 480
    python benchmarks/grid_scaling.py --gpus 1 --packing 0.125    # eight trials on each GPU

The grid: 32 trials, B-6, B-8, B-10 and B-12 at widths 512 and 1024 on a CIFAR-10-sized dataset
(random pixels in CIFAR-10's file layout, at 64x64), the paper's recipe at batch 4096, each
model at four epoch counts that give about 10, 15, 20 and 40 s of pure training on one GPU
(times ``--scale``), from the model's step rate measured here first (grid_overhead.py's grid
builder). For each GPU count the whole grid runs through the real ``mlpgrid run`` from a fresh
storage directory, with only the first that many GPUs visible (``CUDA_VISIBLE_DEVICES``) to the
local Ray instance it starts, while ``nvidia-smi`` samples every GPU's utilisation every 200 ms.

Per GPU count it prints: wall time, trials finished, each GPU's busy fraction (mean NVML
utilisation over the grid's wall time), the speed-up over one GPU (wall time on 1 GPU / wall
time) and the efficiency (speed-up / GPUs; linear scaling is 1.0). A speed-up is given only
where both runs finished every trial.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grid_overhead import prepare_grid, run_grid  # noqa: E402

MODELS = tuple(f"B-{depth}/Wi-{width}" for depth in (6, 8, 10, 12) for width in (512, 1024))
TRIALS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, action="append", help="GPUs visible to the grid; repeatable")
    parser.add_argument("--packing", default="auto", help="GPUs per trial (e.g. 0.5, 0.125); auto: mlpgrid's choice")
    parser.add_argument("--scale", type=float, default=1.0, help="training time targets times this")
    parser.add_argument("--timeout", type=float, help="stop a grid after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    available = torch.cuda.device_count()
    if available == 0:
        sys.exit("grid_scaling.py measures GPU time; no CUDA device here")
    wanted = args.gpus or [1, 2, 4, 8]
    counts = [n for n in wanted if n <= available]
    if missing := sorted(set(wanted) - set(counts)):
        print(f"this machine has {available} GPU(s): not measured with {missing}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        grid, plan = prepare_grid(work, "scaling", MODELS, args.scale, TRIALS)
        results = []
        for n in counts:
            result = run_grid(grid, work / f"storage-{n}", args.packing, args.timeout, gpus=n)
            results.append(result)
            print(f"  {n} GPU(s): {result['finished']}/{len(plan)} finished in {result['wall_s']:.0f} s "
                  f"{result['progress']}", flush=True)  # fmt: skip

    one = next((r for r in results if r["gpus"] == 1 and r["finished"] == len(plan)), None)
    print()
    print(f"{'GPUs':>4} {'finished':>8} {'wall s':>7} {'busy, mean':>10} {'speed-up':>8} {'efficiency':>10}  "
          "busy per GPU")  # fmt: skip
    for r in results:
        if one and r["finished"] == len(plan):
            r["speedup"] = one["wall_s"] / r["wall_s"]
            r["efficiency"] = r["speedup"] / r["gpus"]
            scaling = f"{r['speedup']:>8.2f} {r['efficiency']:>10.1%}"
        else:
            scaling = f"{'n/a':>8} {'n/a':>10}"
        each = " ".join(f"{u:.0%}" for u in r["gpu_util_each"])
        print(f"{r['gpus']:>4} {r['finished']:>8} {r['wall_s']:>7.0f} {r['gpu_util']:>10.1%} {scaling}  {each}")
    print("(busy: mean NVML utilisation over the grid's wall time; speed-up: wall time on 1 GPU / wall time)")
    if args.json:
        args.json.write_text(json.dumps({"plan": plan, "results": results}, indent=2))


if __name__ == "__main__":
    main()
