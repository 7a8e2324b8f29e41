"""Where a trial's start-up goes in a fresh worker process, and what its first epochs cost.

    python benchmarks/trial_startup.py --json trial_startup.json
    python benchmarks/trial_startup.py --trial 0 --trial 15 --augment compiled eager
    python benchmarks/trial_startup.py --trial 15 --budget measured given
    python benchmarks/trial_startup.py --grid benchmarks/augment.yaml --trial 0 --trial 1 --augment compiled eager

Each measurement starts fresh Python processes (``--at-once`` of them together, as the first
wave of a grid starts its workers), each training one trial of ``--grid`` (by its index there)
the way a Ray worker does: imports, CUDA set-up, then :func:`mlpgrid.training.loop.run_trial`, with its
set-up's parts timed. Every process has a torch.compile cache of its own that starts empty, so
nothing is compiled from an earlier measurement. ``--augment`` compiles the loader's
augmentation or leaves it uncompiled whatever the trial would choose; ``--budget given`` skips
measuring the model's memory for the data budget. Datasets are read from where the grid's
``data:`` section says, else where mlpgrid finds them; where Fashion-MNIST or CIFAR-10 is not
installed, random pixels in its layout stand in. Prints per process the seconds from its launch
to imports done, CUDA ready, each part of the set-up, the first step and the end, and the first
two epochs' seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def child(grid_file: str, index: int, storage: Path, launched: float, augment: str, budget: str) -> dict:
    """Train trial ``index`` of the grid in this process; the seconds since ``launched``."""
    marks = {"interpreter": time.time() - launched}
    import torch

    from mlpgrid import data
    from mlpgrid.execution import runner  # noqa: F401  (a worker imports MLflow through it)
    from mlpgrid.grid import spec
    from mlpgrid.grid.layout import TrialLayout
    from mlpgrid.training import loop, setup

    if augment != "auto":  # the trial's augmentation compiled, or not, whatever the trial would choose
        chosen, forced = setup.load_data, augment == "compiled"
        setup.load_data = lambda *args, **kwargs: chosen(*args, **(kwargs | {"compile": forced}))

    marks["imports"] = time.time() - launched
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.zeros(1, device=device)
    marks["device ready"] = time.time() - launched
    # Where the loop finds each: set_up_data calls the first two in its module, the loop make_model in its own.
    for module, name in ((setup, "data_budget"), (setup, "load_data"), (loop, "make_model")):
        timed = getattr(module, name)

        def wrapper(*args, _timed=timed, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            result = _timed(*args, **kwargs)
            marks[_name] = time.time() - launched
            return result

        setattr(module, name, wrapper)
    epochs = []

    def on_epoch(metrics: dict) -> None:
        if not epochs:
            marks["first step"] = time.time() - launched - metrics["epoch_seconds"]
        epochs.append(metrics["epoch_seconds"])

    grid = spec.load(grid_file)
    trial = grid.trials[index]
    datasets = data.Datasets(grid.data_roots)  # the grid's data section; the other datasets where mlpgrid finds them
    options = setup.TrialOptions(data_budget_bytes=None if budget == "measured" else 2**30)
    loop.run_trial(trial.config, TrialLayout(storage), options, datasets=datasets,
                    hooks=loop.Hooks(epoch=on_epoch), device=device)  # fmt: skip
    marks["end"] = time.time() - launched
    return {"trial": trial.id, "model": trial.config.model, "marks": marks, "epoch_seconds": epochs}


def measure(grid_file: str, index: int, at_once: int, augment: str, budget: str, env: dict[str, str],
            work: Path) -> list[dict]:  # fmt: skip
    """``at_once`` fresh processes, launched together, each training trial ``index``."""
    procs = []
    for i in range(at_once):
        run_dir = work / f"run-{index}-{at_once}-{augment}-{budget}-{i}"
        run_dir.mkdir(parents=True)
        own_caches = {"TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor"), "TRITON_CACHE_DIR": str(run_dir / "triton")}
        command = [sys.executable, __file__, "--child", grid_file, str(index), str(run_dir / "trial"), str(time.time()),
                   augment, budget]  # fmt: skip
        procs.append(subprocess.Popen(command, env=env | own_caches, stdout=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"a trial process failed (exit {proc.returncode})")
        results.append(json.loads(out.splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default=str(REPO / "grids" / "quickstart.yaml"))
    parser.add_argument("--trial", type=int, action="append", help="index of a trial in the grid; default 0")
    parser.add_argument("--at-once", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--augment", nargs="+", choices=["auto", "compiled", "eager"], default=["auto"],
                        help="the augmentation as the trial chooses (auto), compiled, or not")  # fmt: skip
    parser.add_argument("--budget", nargs="+", choices=["measured", "given"], default=["measured"],
                        help="the data budget measured beside the model (as by default), or given (1 GiB)")  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        grid_file, index, storage, launched, augment, budget = args.child
        print(json.dumps(child(grid_file, int(index), Path(storage), float(launched), augment, budget)))
        return
    from synthetic import write_cifar10, write_fashion_mnist

    from mlpgrid.grid import spec

    env = dict(os.environ)
    results = []
    grid = spec.load(args.grid)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stand_ins = {"Fashion-MNIST": ("MLPGRID_FASHION_MNIST", "fashion-mnist", write_fashion_mnist),
                     "CIFAR-10": ("MLPGRID_CIFAR10", "cifar-10", write_cifar10)}  # fmt: skip
        indexes = args.trial or [0]
        used = {d for i in indexes for d in grid.trials[i].config.datasets}
        for name, (variable, dataset, write) in stand_ins.items():
            if dataset in used and not grid.data_root(dataset).is_dir():
                env[variable] = str(write(work / dataset))
                print(f"{name} not installed: random pixels in its layout", flush=True)
        for index in indexes:
            for at_once, augment, budget in itertools.product(args.at_once, args.augment, args.budget):
                runs = measure(args.grid, index, at_once, augment, budget, env, work)
                first = runs[0]
                print(f"trial {index} ({first['model']}), {at_once} at once, augmentation {augment}, budget {budget}; "
                      f"seconds from launch, median of {len(runs)}:", flush=True)  # fmt: skip
                for mark in first["marks"]:
                    print(f"  {mark:14} {statistics.median(r['marks'][mark] for r in runs):6.2f}")
                for e in range(min(2, len(first["epoch_seconds"]))):
                    print(f"  epoch {e + 1} took  {statistics.median(r['epoch_seconds'][e] for r in runs):6.2f}")
                results.append({"trial": index, "at_once": at_once, "augment": augment, "budget": budget, "runs": runs})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
