"""Grid efficiency on a GPU: how much of a grid's wall time the GPU spends training.

    python benchmarks/grid_overhead.py                         # 24 trials, packing chosen by mlpgrid
    python benchmarks/grid_overhead.py --trials 8 --scale 0.3 --packing 1 --packing 0.5 --packing 0.25
    python benchmarks/grid_overhead.py --group auto --group off  # trial groups on and off, side by side
    python benchmarks/grid_overhead.py --scale 0.3 --ceiling --group none  # only the ceiling below
    python benchmarks/grid_overhead.py --sweep 40 --group auto --group off   # an lr sweep instead

The grid: B-6/Wi-256 ... B-12/Wi-1024 on a CIFAR-10-sized dataset (random pixels in CIFAR-10's
file layout, at 64x64) with the paper's recipe at batch 4096, each model at four epoch counts
chosen so its pure training time is about 10, 15, 20 and 40 s (times ``--scale``), from the
model's step rate measured here first. Each packing runs the whole grid through the real
``mlpgrid run`` (local Ray, one Ray worker per group of trials, MLflow on SQLite), from a fresh
storage directory, while ``nvidia-smi`` samples the GPU's utilisation every 200 ms.

Per packing (and grouping, ``--group``) it prints: wall time; the training work done per
second of it (the finished trials' compute C over the wall time); the GPU's mean utilisation
over it (NVML: the share of time a kernel was running); the share of wall time during which at
least one trial was training (from the trials' epoch timestamps in MLflow); per-trial GPU-idle
overhead = idle wall time / trials; the median start-up (runner launch to first step) and
compile seconds.

``--sweep T`` runs a 16-trial learning-rate sweep (factor 2 around the recipe's) of B-6/Wi-256 at batch 1024 for T
epochs on the same data instead: the trials of one shape and T that ``auto`` fuses into one
group on a GPU.

Each run also reports its seconds outside its trials: before the first trial's launch (Ray's
start, the driver) and after the last one's end. No grouping changes them.

``--ceiling`` also measures what no grouping or packing can beat: per model, the GPU's images/s
of its bare compiled step (``mps.py``: a batch already on the GPU, no loader, no start-up) with
eight of it fused in one process and with eight processes of it at once, time-sliced. At the
better of the two for each model, the grid's images take the ceiling's seconds; they over a
run's wall time are how near it came, and its wall time over them the most any other way of
running the grid could gain on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mps import run_together  # noqa: E402
from synthetic import write_cifar10  # noqa: E402
from trial_step import RECIPE, bare_step  # noqa: E402

from mlpgrid.grid.layout import StorageLayout  # noqa: E402
from mlpgrid.tracking import reader  # noqa: E402

MODELS = ("B-6/Wi-256", "B-6/Wi-512", "B-6/Wi-1024", "B-12/Wi-512", "B-12/Wi-768", "B-12/Wi-1024")
TARGET_SECONDS = (10, 15, 20, 40)
BATCH, TRAIN = 4096, 50_000


SWEEP_MODEL, SWEEP_BATCH, SWEEP_LRS = "B-6/Wi-256", 1024, [RECIPE["lr"] * 2.0**k for k in range(-8, 8)]


def sweep_file(path: Path, root: Path, epochs: int) -> list[dict]:
    """Write the lr-sweep grid (named after the file); returns its trials."""
    doc = {
        "name": path.stem,
        "data": {"cifar-10": str(root)},
        "base": {"dataset": "cifar-10", "resolution": 64, "examples": TRAIN, "batch_size": SWEEP_BATCH,
                 "model": SWEEP_MODEL, "epochs": epochs, **{k: v for k, v in RECIPE.items() if k != "lr"}},
        "grid": {"lr": SWEEP_LRS},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return [{"model": SWEEP_MODEL, "epochs": epochs, "lr": lr} for lr in SWEEP_LRS]


def grid_file(path: Path, root: Path, rates: dict[str, float], scale: float, trials: int) -> list[dict]:
    """Write the grid (named after the file) of the models in ``rates``; returns its trials with
    their estimated pure training seconds."""
    plan = [{"model": m, "epochs": max(1, round(t * scale * rates[m] / TRAIN))} for t in TARGET_SECONDS for m in rates][
        :trials
    ]
    for p in plan:
        p["estimated_s"] = p["epochs"] * TRAIN / rates[p["model"]]
    doc = {
        "name": path.stem,
        "data": {"cifar-10": str(root)},
        "base": {"dataset": "cifar-10", "resolution": 64, "examples": TRAIN, "batch_size": BATCH, **RECIPE},
        "zip": {"model": [p["model"] for p in plan], "epochs": [p["epochs"] for p in plan]},
    }
    path.write_text(yaml.safe_dump(doc))
    return plan


class GpuSampler:
    """``nvidia-smi`` utilisation samples of every GPU (time, GPU index, percent) in a background thread."""

    def __init__(self, period_ms: int = 200):
        query = "--query-gpu=index,utilization.gpu"
        cmd = ["nvidia-smi", query, "--format=csv,noheader,nounits", f"-lms={period_ms}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, int, float]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and all(f.isdigit() for f in fields):
                self.samples.append((time.time(), int(fields[0]), float(fields[1])))

    def busy(self, gpu: int, start: float, end: float) -> float:
        """The GPU's mean utilisation between ``start`` and ``end``, as a fraction."""
        util = [u for t, i, u in self.samples if i == gpu and start <= t <= end]
        return statistics.mean(util) / 100 if util else float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def training_intervals(storage: Path, grid_name: str) -> list[dict]:
    """Per trial: when its training ran (from its epoch timestamps), start-up and compile seconds."""
    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    experiment = client.get_experiment_by_name(grid_name)
    trials = []
    for run in client.search_runs([experiment.experiment_id], "tags.mlpgrid_role = 'trial'"):
        epochs = client.get_metric_history(run.info.run_id, "epoch_seconds")
        if not epochs:
            continue
        first, last = min(epochs, key=lambda m: m.step), max(epochs, key=lambda m: m.step)
        rates = [m.value for m in client.get_metric_history(run.info.run_id, "images_per_s") if m.step > 1]
        trials.append({
            "model": run.data.params.get("model"),
            "epochs": len(epochs),
            "start": first.timestamp / 1e3 - first.value,
            "end": last.timestamp / 1e3,
            "train_s": sum(m.value for m in epochs),
            "startup_s": run.data.metrics.get("startup_seconds"),
            "compile_s": run.data.metrics.get("compile_seconds", 0.0),
            "images_per_s": statistics.mean(rates) if rates else None,  # its epochs after the first
            "status": run.data.tags.get("status"),
            "train_loss": run.data.metrics.get("train_loss"),  # its last epoch's
            "trial_id": run.data.tags.get("trial_id"),
            "error": run.data.tags.get("error"),
            "compute": float(run.data.tags["compute"]),
        })  # fmt: skip
    return trials


def covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def run_grid(grid: Path, storage: Path, packing: str, timeout: float | None = None, gpus: int | None = None,
             group: str = "auto") -> dict:  # fmt: skip
    """Run the grid through ``mlpgrid run``; ``gpus``: make only the first this many GPUs visible."""
    command = [sys.executable, "-m", "mlpgrid", "run", str(grid), "--storage", str(storage), "--group", group]
    if packing != "auto":
        command += ["--gpus-per-trial", packing]
    visible = range(gpus if gpus is not None else torch.cuda.device_count())
    # nvidia-smi numbers GPUs in PCI order; so must CUDA, for its indexes to match. NVLink
    # multicast stays off: no trial needs it, and on a shared host it can disable the GPUs.
    no_multicast = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    env = {**no_multicast, **os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    # Each run compiles from nothing, as on a fresh machine: torch.compile's cache of an earlier
    # run here would make a later one's compiles seconds shorter (a 16-member stack: 2.7 s
    # against about 14).
    env["TORCHINDUCTOR_CACHE_DIR"] = str(storage / "compile-cache")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, visible))
    sampler = GpuSampler()
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # measure what finished; the rest counts as not finished
        proc.terminate()
        stdout, stderr = proc.communicate()
    ended = time.time()
    sampler.stop()
    if proc.returncode != 0:
        print(stdout[-3000:], stderr[-3000:], sep="\n")
    trials = training_intervals(storage, yaml.safe_load(grid.read_text())["name"])
    for t in trials:
        if t["error"]:
            print(f"  {t['model']} failed after {t['epochs']} epochs: {t['error'][-1500:]}")
    wall = ended - started
    launches = [t["start"] - t["startup_s"] for t in trials if t["startup_s"] is not None]
    outside = (min(launches) - started) + (ended - max(t["end"] for t in trials)) if launches else None
    per_gpu = [sampler.busy(i, started, ended) for i in visible]
    busy = statistics.mean(per_gpu)
    training = covered([(t["start"], t["end"]) for t in trials]) / wall
    rates = [t["images_per_s"] for t in trials if t["images_per_s"]]
    return {
        "packing": packing,
        "group": group,
        "work_per_s": sum(t["compute"] for t in trials if t["status"] == "finished") / wall,
        "gpus": len(visible),
        "gpu_util_each": per_gpu,
        "returncode": proc.returncode,
        "trials": len(trials),
        "finished": sum(t["status"] == "finished" for t in trials),
        "wall_s": wall,
        "outside_trials_s": outside,
        "train_s": sum(t["train_s"] for t in trials),
        "gpu_util": busy,
        "training_share": training,
        "idle_per_trial_s": wall * (1 - busy) / max(1, len(trials)),
        "startup_median_s": statistics.median(t["startup_s"] for t in trials) if trials else None,
        "compile_median_s": statistics.median(t["compile_s"] for t in trials) if trials else None,
        "trial_rate_median": statistics.median(rates) if rates else None,
        "per_trial": trials,
        # mlpgrid's notes on how it placed the trials ("[summary] Ray: ... trials at a time ...")
        "progress": [
            line.split("] ", 1)[-1]
            for line in stdout.splitlines()
            if "] Ray: " in line or "Ray packs" in line or " workers: " in line or "each alone" in line
        ],
    }


def best_rates(models: tuple[str, ...], members: int = 8, steps: int = 30, timeout: float = 300) -> dict[str, dict]:
    """Per model, the GPU's images/s at batch ``BATCH`` with ``members`` of it fused in one process
    and with as many processes of it at once, time-sliced, and the better of the two."""
    settings = argparse.Namespace(steps=steps, timeout=timeout)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            fused = run_together(m, BATCH, 1, members, settings, dict(os.environ), Path(tmp))
            sliced = run_together(m, BATCH, members, 1, settings, dict(os.environ), Path(tmp))
            rates[m] = {"fused": fused, "time_sliced": sliced, "best": max(fused, sliced)}
            print(f"  {m:>13}: {members} fused {fused:>12,.0f} img/s, {members} time-sliced {sliced:>12,.0f}")
    return rates


def prepare_grid(work: Path, name: str, models: tuple[str, ...], scale: float, trials: int) -> tuple[Path, list[dict]]:
    """Write the dataset and the grid file ``work/<name>.yaml`` (epochs from each model's bare
    eager step rate, measured here) and print the plan; returns the file and its trials."""
    root = write_cifar10(work / "cifar-10-batches-py", train=TRAIN)
    rates = {m: bare_step(m, BATCH, compiled=False, steps=10)["images_per_s"] for m in models}
    torch.cuda.empty_cache()
    path = work / f"{name}.yaml"
    plan = grid_file(path, root, rates, scale, trials)
    print(f"{torch.cuda.get_device_name()}; {len(plan)} trials at batch {BATCH}, estimated pure training "
          f"{min(p['estimated_s'] for p in plan):.0f}-{max(p['estimated_s'] for p in plan):.0f} s each, "
          f"{sum(p['estimated_s'] for p in plan):.0f} s in all")  # fmt: skip
    for m in models:
        print(f"  {m:>13}: bare eager step {rates[m]:>12,.0f} img/s; epochs "
              f"{[p['epochs'] for p in plan if p['model'] == m]}")  # fmt: skip
    return path, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packing", action="append", help="GPUs per trial (e.g. 1, 0.5, 0.25) or auto; repeatable")
    parser.add_argument(
        "--group", action="append", help="trial groups: auto, off, K (mlpgrid run --group) or none (no run); repeatable"
    )
    parser.add_argument("--trials", type=int, default=24, help="the first this many trials of the grid")
    parser.add_argument("--scale", type=float, default=1.0, help="training time targets times this")
    parser.add_argument("--timeout", type=float, help="stop a grid after this many seconds")
    parser.add_argument("--ceiling", action="store_true", help="also measure each model's best bare rate (slow)")
    parser.add_argument("--sweep", type=int, metavar="T", help="run the lr sweep of T epochs instead of the grid")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("grid_overhead.py measures GPU time; no CUDA device here")
    if args.sweep and args.ceiling:
        sys.exit("--ceiling is the 24-trial grid's; leave it out with --sweep")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.sweep:
            grid = work / "sweep.yaml"
            plan = sweep_file(grid, write_cifar10(work / "cifar-10-batches-py", train=TRAIN), args.sweep)
            print(f"{torch.cuda.get_device_name()}; {len(plan)} trials of {SWEEP_MODEL} at batch {SWEEP_BATCH}, "
                  f"T = {args.sweep}, lr {SWEEP_LRS[0]:g} to {SWEEP_LRS[-1]:g}")  # fmt: skip
        else:
            grid, plan = prepare_grid(work, "overhead", MODELS, args.scale, args.trials)
        ceiling = None
        if args.ceiling:
            print("ceiling: bare compiled steps on a batch already on the GPU, at batch", BATCH, flush=True)
            rates = best_rates(MODELS)
            ceiling = {"rates": rates, "seconds": sum(p["epochs"] * TRAIN / rates[p["model"]]["best"] for p in plan)}
        results = []
        for group in [g for g in args.group or ["auto"] if g != "none"]:
            for packing in args.packing or ["auto"]:
                result = run_grid(grid, work / f"storage-{packing}-{group}", packing, args.timeout, group=group)
                results.append(result)
                print(f"  packing {packing}, groups {group}: {result['finished']}/{len(plan)} finished in "
                      f"{result['wall_s']:.0f} s {result['progress']}", flush=True)  # fmt: skip

    print()
    print(f"{'packing':>8} {'groups':>6} {'trials':>6} {'wall s':>7} {'outside s':>9} {'TFLOP C/s':>9} {'train s':>8} "
          f"{'GPU util':>8} {'training':>8} {'idle/trial s':>12} {'start-up s':>10} {'compile s':>9} "
          f"{'trial img/s':>11}")  # fmt: skip
    for r in results:
        work = r["work_per_s"] / 1e12
        outside = r["outside_trials_s"] if r["outside_trials_s"] is not None else float("nan")
        print(f"{r['packing']:>8} {r['group']:>6} {r['finished']:>6} {r['wall_s']:>7.0f} {outside:>9.0f} {work:>9.2f} "
              f"{r['train_s']:>8.0f} {r['gpu_util']:>8.1%} {r['training_share']:>8.1%} {r['idle_per_trial_s']:>12.1f} "
              f"{r['startup_median_s']:>10.1f} {r['compile_median_s']:>9.1f} "
              f"{r['trial_rate_median'] or 0:>11,.0f}")  # fmt: skip
    if len(results) > 1:
        print(f"work per second against {results[-1]['packing']}/{results[-1]['group']}: "
              + ", ".join(f"{r['packing']}/{r['group']} {r['work_per_s'] / results[-1]['work_per_s']:.2f}x"
                          for r in results[:-1]))  # fmt: skip
    print(
        "(TFLOP C/s: the finished trials' compute C per second of wall; outside: before the first trial's launch "
        "and after the last one's end; train s: the trials' own training seconds, summed; start-up, compile and "
        "trial img/s (each trial's own, its first epoch left out): medians per trial)"
    )
    if ceiling:
        print(f"ceiling: the grid's images at each model's best bare rate take {ceiling['seconds']:.0f} s")
        for r in results:
            gain = r["wall_s"] / ceiling["seconds"]
            print(f"  {r['packing']}/{r['group']}: {1 / gain:.1%} of the ceiling's pace; "
                  f"no other way of running the grid gains more than {gain:.2f}x on it")  # fmt: skip
            if r["outside_trials_s"] is not None:
                bound = r["wall_s"] / (ceiling["seconds"] + r["outside_trials_s"])
                print(f"    nor more than {bound:.2f}x with its {r['outside_trials_s']:.0f} s outside its trials")
    if args.json:
        args.json.write_text(json.dumps({"plan": plan, "ceiling": ceiling, "results": results}, indent=2))


if __name__ == "__main__":
    main()
