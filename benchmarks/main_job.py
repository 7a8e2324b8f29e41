"""The main job: a grid of grids/scaling.yaml's shape through the real ``mlpgrid run``, beside each
model's bare step, and what it projects for the whole of scaling.yaml.

    python benchmarks/main_job.py                           # 400k images, six models, two N each
    python benchmarks/main_job.py --images 1200000 --seconds 60 --json main_job.json
    python benchmarks/main_job.py --breakdown B-6/Wi-256 --breakdown B-12/Wi-1024

1. A prepared dataset of the paper's shape in mlpgrid's own format (random pixels: speed does
   not depend on them): ``--images`` training images of 64x64x3 over 10,450 classes, a test
   split of ``--test``, its manifest with checksums, checked by ``mlpgrid.data.prepared.verify``.
2. Each model's **bare step**: compiled, on a batch already on the GPU, bf16 autocast, fused
   AdamW, plain cross-entropy, at batch 16384 over 10,450 classes. With ``--breakdown``, also
   the recipe's step on a batch already on the GPU (compiled Lion, label smoothing 0.3, MixUp)
   with the loss as ``F.cross_entropy`` twice and as the compiled one-pass loss trials use.
3. The grid: every model at each N of ``--sizes`` (``--images`` and a quarter of it) with the appendix-A.4
   recipe (Lion 1e-5, wd 1e-3, label smoothing 0.3, flips, crops, MixUp 0.8, batch 16384), each
   trial's T chosen for about ``--seconds`` of bare compute, compiled (as the long trials it stands
   for are). It runs through ``mlpgrid run`` with default settings otherwise (local Ray, shares
   chosen by mlpgrid, MLflow on SQLite) while ``nvidia-smi`` samples the GPU.

It prints, side by side from that one run: each model's bare and trial images/s, and its "GPU
pace" (trials share the GPU, so a trial's own rate is a slice of it: the pace sums the epochs'
rates of the trials stepping while only that model's did, against its bare rate) and its pause
between epochs; the wall time against the trials' bare seconds summed; the steps' pace (the
same sum at every moment any trial stepped, evaluations and start-ups left out), the
GPU's busy share and its work while any trial ran (training and evaluation in bare steps);
start-up, compile, evaluation and between-epoch (checkpoint, logging) shares of the trials' time;
failures; each trial's peak GPU memory against its share; and a projection of scaling.yaml's
150 trials on one GPU and on eight, from the steps' pace and the run's cost per trial beyond its
steps. The JSON keeps every trial's epochs (end, seconds, rate), so that these can be read again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grid_overhead import GpuSampler  # noqa: E402
from trial_step import bare_step  # noqa: E402

from mlpgrid.data import prepared  # noqa: E402
from mlpgrid.data.files import sha256  # noqa: E402
from mlpgrid.data.loader import Batch  # noqa: E402
from mlpgrid.grid import spec  # noqa: E402
from mlpgrid.grid.layout import StorageLayout  # noqa: E402
from mlpgrid.models import architecture, networks  # noqa: E402
from mlpgrid.tracking import reader  # noqa: E402
from mlpgrid.training.optim import CompiledLion  # noqa: E402
from mlpgrid.training.step import autocast, compiled_recipe_loss, recipe_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = ("B-6/Wi-256", "B-12/Wi-256", "B-6/Wi-512", "B-12/Wi-512", "B-6/Wi-1024", "B-12/Wi-1024")
SIDE, CLASSES, BATCH = 64, 10_450, 16_384
RECIPE = dict(batch_size=BATCH, optimizer="lion", lr=1e-5, weight_decay=1e-3, label_smoothing=0.3, flip=True,
              crop_padding=4, mixup=0.8, warmup_epochs=1)  # fmt: skip
IN21K_TEST = 522_500  # the test split scaling.yaml's trials evaluate (every run.evaluate_every epochs)


def write_dataset(root: Path, train: int, test: int, seed: int = 0) -> Path:
    """A prepared dataset of random uint8 images (mlpgrid's format: .npy files and a manifest)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    splits = {}
    for split, count in (("train", train), ("test", test)):
        images = np.lib.format.open_memmap(root / f"{split}_images.npy", "w+", np.uint8, (count, 3, SIDE, SIDE))
        for start in range(0, count, 16384):
            images[start : start + 16384] = rng.integers(0, 256, images[start : start + 16384].shape, np.uint8)
        images.flush()
        del images
        np.save(root / f"{split}_labels.npy", rng.integers(0, CLASSES, count, dtype=np.int64))
        names = [f"{split}_labels.npy", f"{split}_images.npy"]
        files = {n: {"bytes": (root / n).stat().st_size, "sha256": sha256(root / n)} for n in names}
        splits[split] = {"count": count, "files": files}
    manifest = {
        "format_version": prepared.FORMAT_VERSION, "name": "synthetic-21k", "format": "npy", "resolution": SIDE,
        "channels": 3, "classes": [f"class-{i}" for i in range(CLASSES)], "mean": [0.5] * 3, "std": [0.2887] * 3,
        "splits": splits, "skipped": [], "settings": {"random": True, "seed": seed},
    }  # fmt: skip
    (root / prepared.MANIFEST).write_text(json.dumps(manifest))
    problems = prepared.verify(root)
    assert not problems, problems
    return root


def recipe_step(name: str, loss_fn, steps: int) -> float:  # noqa: ANN001
    """Images/s of the recipe's step on a batch already on the GPU: the compiled model, compiled
    Lion, label smoothing 0.3 and MixUp through ``loss_fn`` (augmentation and loader left out)."""
    cfg = architecture.config_for(name, 3 * SIDE * SIDE, CLASSES)
    model = networks.build(cfg).cuda()
    net = torch.compile(model, dynamic=False)
    optimizer = CompiledLion(model.parameters(), lr=1e-5, weight_decay=1e-3)
    x = torch.randn(BATCH, 3, SIDE, SIDE, device="cuda", dtype=torch.bfloat16)
    y, y2 = (torch.randint(0, CLASSES, (BATCH,), device="cuda") for _ in range(2))
    batch = Batch(x, y, y2, torch.tensor(0.7, device="cuda"), len(y))

    def step() -> None:
        with autocast(x.device):
            loss = loss_fn(net(batch.images), batch, 0.3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return BATCH * steps / (time.perf_counter() - started)


def grid_file(path: Path, dataset: Path, images: int, test: int, bare: dict[str, float], seconds: float,
              sizes: list[float], lengths: list[float]) -> dict:  # fmt: skip
    """The grid: each model at N = each of ``sizes`` times images, T for about ``seconds`` of bare
    compute times each of ``lengths`` in turn."""
    trials = []
    for model in bare:
        for n in (round(images * size) for size in sizes):
            length = seconds * lengths[len(trials) % len(lengths)]
            trials.append({"model": model, "examples": n, "epochs": max(2, round(length * bare[model] / n))})
    grid = {
        "name": "main-job",
        "data": {
            "synthetic-21k": {
                "path": str(dataset),
                "classes": CLASSES,
                "train": images,
                "test": test,
                "resolution": SIDE,
            }
        },  # fmt: skip
        # Compiled, as scaling.yaml's trials of this model and more compute are by default: these
        # stand for them at a fraction of their length; evaluated as often as they are. Everything
        # else is mlpgrid's default.
        "run": {"compile": True, "evaluate_every": spec.load(REPO / "grids" / "scaling.yaml").run.evaluate_every},
        "base": {"dataset": "synthetic-21k", **RECIPE},
        "zip": {k: [t[k] for t in trials] for k in ("model", "examples", "epochs")},
    }
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return {"trials": trials}


def per_trial(storage: Path) -> list[dict]:
    """Each trial's record from MLflow: its rates, timings, memory, status."""
    client = MlflowClient(reader.tracking_uri(StorageLayout(storage)))
    experiment = client.get_experiment_by_name("main-job")
    rows = []
    for run in client.search_runs([experiment.experiment_id], "tags.mlpgrid_role = 'trial'"):

        def history(key: str, run_id: str = run.info.run_id) -> list:
            return sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)

        epochs, rates, memory = history("epoch_seconds"), history("images_per_s"), history("memory_gb")
        rate_of = {m.step: m.value for m in rates}
        evaluations = len(history("test_error"))
        n = int(run.data.params["examples"])
        later = [m.value for m in rates[1:]] or [m.value for m in rates]
        train_s = sum(n / m.value for m in rates)
        start = epochs[0].timestamp / 1e3 - epochs[0].value if epochs else None
        rows.append({
            "model": run.data.params["model"], "examples": n, "epochs": int(run.data.params["epochs"]),
            "epochs_done": len(rates), "evaluations": evaluations,
            "status": run.data.tags.get("status"), "error": (run.data.tags.get("error") or "")[-800:],
            "images_per_s": statistics.median(later) if later else None,
            "startup_s": run.data.metrics.get("startup_seconds"), "compile_s": run.data.metrics.get("compile_seconds"),
            "train_s": train_s, "eval_s": sum(m.value for m in epochs) - train_s,
            "span_s": (epochs[-1].timestamp / 1e3 - start) if epochs else 0.0,
            "epoch_s": sum(m.value for m in epochs), "start": start,
            "end": (run.info.end_time or 0) / 1e3, "memory_gb": max((m.value for m in memory), default=None),
            "gpu_share": run.data.tags.get("gpu_share"),
            # each epoch: when it was recorded (its end), its seconds with evaluation, its images/s training
            "timeline": [(m.timestamp / 1e3, m.value, rate_of[m.step]) for m in epochs if m.step in rate_of],
        })  # fmt: skip
    return rows


def stepping(trial: dict) -> list[tuple[float, float, float]]:
    """The seconds a trial's steps ran, epoch by epoch, as (start, end, images/s): each epoch from
    its recorded end, length and rate, its evaluation after its steps (the compile comes before
    the first epoch, in the start-up)."""
    spans = []
    for end, seconds, rate in trial["timeline"]:
        start = end - seconds
        spans.append((start, min(end, start + trial["examples"] / rate), rate))
    return spans


def load_while_training(trials: list[dict], bare: dict[str, float], model: str | None = None) -> tuple[float, float]:
    """The GPU's work while any trial's steps ran, in bare steps: at each moment the sum over the
    trials stepping then of their epoch's rate against their model's bare rate, averaged over
    those moments; and the seconds averaged over. Two trials time-sliced on one GPU, each at half
    the bare rate, make 1.0: the steps are as fast as bare, and what a trial alone loses is the
    sharing. With ``model``, only the moments when that model's trials alone stepped: its recipe
    step's pace in the trials, against its bare step."""
    spans = [(start, end, rate / bare[t["model"]], t["model"]) for t in trials for start, end, rate in stepping(t)]
    if not spans:
        return float("nan"), 0.0
    step = 0.1
    origin = min(s[0] for s in spans)
    moments = int((max(s[1] for s in spans) - origin) / step) + 1
    load, stepping_now, others = np.zeros(moments), np.zeros(moments, int), np.zeros(moments, int)
    for start, end, share, name in spans:
        first, last = int((start - origin) / step), int((end - origin) / step)
        load[first:last] += share
        stepping_now[first:last] += 1
        if model is not None and name != model:
            others[first:last] += 1
    counted = (stepping_now > 0) & (others == 0)
    return (float(load[counted].mean()) if counted.any() else float("nan")), float(counted.sum() * step)


def idle_seconds(trials: list[dict], wall: float) -> float:
    """The run's seconds in which no trial trained or evaluated: its wall time less the union of the
    trials' spans (first epoch's start to last epoch's end)."""
    spans = sorted((t["start"], t["start"] + t["span_s"]) for t in trials if t["start"] is not None)
    covered, reach = 0.0, float("-inf")
    for start, end in spans:
        covered += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return max(0.0, wall - covered)


def stop_as_a_user(proc: subprocess.Popen) -> None:
    """Ctrl-C to an ``mlpgrid run`` past its time, as a user would stop it: it settles and stops its
    Ray; 60 s later it is killed with its process group (it leads one: ``start_new_session``)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_grid(grid: Path, storage: Path, timeout: float) -> dict:
    """``mlpgrid run`` of the grid with default settings, the GPU sampled meanwhile."""
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    sampler = GpuSampler()
    started = time.time()
    with open(grid.with_suffix(".out"), "w+") as out, open(grid.with_suffix(".err"), "w+") as err:
        command = [sys.executable, "-m", "mlpgrid", "run", str(grid), "--storage", str(storage)]
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=REPO, start_new_session=True)
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:  # what ran is still read out
            wall = time.time() - started
            stop_as_a_user(proc)
            returncode = None
        else:
            wall = time.time() - started
        sampler.stop()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    notes = [line.split("] ", 1)[-1] for line in stdout.splitlines() if "Ray: " in line or "workers" in line
             or "each alone" in line]  # fmt: skip
    errors = sorted((storage / "ray").rglob("error.txt"))
    if errors:  # a worker's traceback: Ray keeps it beside the Tune trial
        print(f"{len(errors)} Tune trials raised; the first:\n{errors[0].read_text()[-4000:]}", flush=True)
    return {"returncode": returncode, "timed_out": returncode is None, "wall_s": wall,
            "gpu_busy": sampler.busy(0, started, started + wall), "notes": notes,
            "stderr": stderr[-3000:] if returncode else "", "stdout": stdout[-3000:] if returncode else ""}  # fmt: skip


def evaluations(epochs: int, every: int) -> int:
    """How many times a trial of ``epochs`` is evaluated: every ``every``-th epoch and the last."""
    return epochs // every + (epochs % every > 0)


def bare_work_s(trials: list[dict], bare: dict[str, float]) -> float:
    """The trials' training and evaluation in bare steps: each one's training images at its
    model's bare rate and its test images at three times it (a forward pass is a third of a
    step's work)."""
    return sum((t["examples"] * t["epochs_done"] + t["test_images"] / 3) / bare[t["model"]] for t in trials)


def work_while_busy(trials: list[dict], bare: dict[str, float], busy_s: float) -> float:
    """The GPU's work while any trial trained, evaluated or paused between epochs: the trials'
    :func:`bare_work_s` over ``busy_s``, the run's seconds less those in which no trial did any
    of these. What evaluation, the pauses between epochs and sharing the GPU cost is what it
    falls short of 1."""
    return bare_work_s(trials, bare) / max(1e-9, busy_s)


def per_trial_costs(trials: list[dict], bare: dict[str, float], wall_s: float, step_pace: float) -> float:
    """Seconds the run took per trial beyond its work at the steps' pace: its wall time less the
    trials' :func:`bare_work_s` at ``step_pace``, over its trials. What Ray's start, the trials'
    start-ups and compiles, their pauses between epochs and the moments too few trials stepped
    to fill the GPU cost, as a cost of each trial (these come with a trial, not with its
    compute)."""
    return max(0.0, wall_s - bare_work_s(trials, bare) / step_pace) / max(1, len(trials))


def projection(bare: dict[str, float], step_pace: float, per_trial_s: float, work_pace: float,
               idle_per_trial_s: float) -> dict:  # fmt: skip
    """scaling.yaml's 150 trials (each model's N and T, evaluated on IN-21k's test split as its
    run.evaluate_every says) from the measured rates and per-trial costs. On one GPU: their
    training and evaluation in bare steps at the steps' pace the main job's trials kept, and
    each trial's cost beyond its steps as in this run (:func:`per_trial_costs`). On eight: the
    same spread over them, or the longest trial alone on its GPU, whichever is longer. Beside it,
    the grid at this run's pace while busy over all its compute, plus its idle seconds per trial:
    as if every trial were as short as this run's, its costs growing with its compute."""
    grid = spec.load(REPO / "grids" / "scaling.yaml")
    every = grid.run.evaluate_every
    train_s, evaluate_s, trial_s = 0.0, 0.0, []
    for t in grid.trials:
        c = t.config
        train = c.num_examples * c.epochs / bare[c.model]
        evaluate = evaluations(c.epochs, every) * IN21K_TEST / (3 * bare[c.model])
        train_s, evaluate_s = train_s + train, evaluate_s + evaluate
        trial_s.append(per_trial_s + (train + evaluate) / step_pace)
    costs_s = len(grid.trials) * per_trial_s
    one = (train_s + evaluate_s) / step_pace + costs_s
    at_work_pace = (train_s + evaluate_s) / work_pace + len(grid.trials) * idle_per_trial_s
    return {"bare_h": train_s / 3600, "evaluation_bare_h": evaluate_s / 3600, "step_pace": step_pace,
            "per_trial_s": per_trial_s, "costs_h": costs_s / 3600, "one_gpu_h": one / 3600,
            "at_work_pace_h": at_work_pace / 3600, "work_pace": work_pace,
            "eight_gpus_h": max(one / 8, max(trial_s)) / 3600, "longest_trial_h": max(trial_s) / 3600}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400_000, help="training images of the synthetic dataset")
    parser.add_argument("--test", type=int, default=20_000, help="its test images")
    parser.add_argument("--seconds", type=float, default=20.0, help="bare compute per trial, about")
    parser.add_argument("--sizes", default="0.25,1", help="each model's N, as shares of --images (comma-separated)")
    parser.add_argument("--lengths", default="1", help="trials' bare compute as multiples of --seconds, in turn "
                        "(scaling.yaml's trials differ in length: T from 50 to 800)")  # fmt: skip
    parser.add_argument("--models", action="append", help="models (default: the six of Table 3)")
    parser.add_argument("--breakdown", action="append", default=[], metavar="MODEL",
                        help="also this model's recipe step with either loss; repeatable")  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each bare or recipe step")
    parser.add_argument("--timeout", type=float, default=1800, help="stop the grid after this many seconds")
    parser.add_argument("--work", type=Path, help="where the dataset and storage go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--replay", type=Path, metavar="JSON",
                        help="read a run's --json again (its trials, bare rates and wall time) instead of measuring")
    args = parser.parse_args()
    if args.replay:
        measured = json.loads(args.replay.read_text())
        if any("timeline" not in t for t in measured["trials"]):
            sys.exit(f"{args.replay}: its trials have no epochs (written before main_job.py kept them)")
        report(measured["device"], measured["bare"], measured["breakdown"], measured["run"], measured["trials"],
               tuple(measured["bare"]), args.json)  # fmt: skip
        return
    if not torch.cuda.is_available():
        sys.exit("main_job.py measures a GPU; no CUDA device here")
    models = tuple(args.models or MODELS)
    with tempfile.TemporaryDirectory(dir=args.work, ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "storage" / "torch-compile")  # the grid's, as mlpgrid sets
        started = time.time()
        dataset = write_dataset(work / "synthetic-21k", args.images, args.test)
        print(f"{torch.cuda.get_device_name()}: dataset of {args.images:,} + {args.test:,} images written and "
              f"verified in {time.time() - started:.0f} s", flush=True)  # fmt: skip
        bare = {m: bare_step(m, BATCH, True, args.steps, CLASSES)["images_per_s"] for m in models}
        breakdown = {}
        for m in args.breakdown:
            breakdown[m] = {"two cross-entropies": recipe_step(m, recipe_loss, args.steps),
                                "one pass, compiled": recipe_step(m, compiled_recipe_loss, args.steps)}  # fmt: skip
        torch.cuda.empty_cache()
        print("bare steps measured; the grid runs", flush=True)
        sizes, lengths = ([float(x) for x in arg.split(",")] for arg in (args.sizes, args.lengths))
        plan = grid_file(work / "main-job.yaml", dataset, args.images, args.test, bare, args.seconds, sizes, lengths)
        planned = sum(t["examples"] * t["epochs"] / bare[t["model"]] for t in plan["trials"])
        print(f"{len(plan['trials'])} trials, {planned:.0f} s of bare compute", flush=True)
        run = run_grid(work / "main-job.yaml", work / "storage", args.timeout)
        trials = per_trial(work / "storage")
    for t in trials:
        t["test_images"] = t["evaluations"] * args.test
    if run["timed_out"]:
        print(f"stopped after --timeout {args.timeout:.0f} s; the figures below are of what ran until then")
    report(torch.cuda.get_device_name(), bare, breakdown, run, trials, models, args.json)


def report(device: str, bare: dict[str, float], breakdown: dict, run: dict, trials: list[dict],
           models: tuple[str, ...], json_path: Path | None) -> None:  # fmt: skip
    """What the run measured, printed (and written to ``json_path``): see the module's docstring."""
    failed = [t for t in trials if t["status"] == "failed"]
    unfinished = sum(t["status"] != "finished" for t in trials)
    print(
        f"mlpgrid run exited {run['returncode']}; {len(trials)} trials recorded, {unfinished} not finished, "
        f"{len(failed)} failed" + "".join(f"\n  {t['model']} N={t['examples']}: {t['error']}" for t in failed[:3])
    )
    if run["returncode"] and not run["timed_out"]:
        print(run["stderr"], run["stdout"], sep="\n")
    by_model = {m: [t for t in trials if t["model"] == m] for m in models}
    trial_rate = {m: statistics.median(t["images_per_s"] for t in ts if t["images_per_s"]) for m, ts in by_model.items()
                  if any(t["images_per_s"] for t in ts)}  # fmt: skip
    if not trial_rate:
        sys.exit("no trial trained an epoch")
    # The bare time of the epochs trained (all of them unless --timeout stopped the grid).
    bare_s = sum(t["examples"] * t["epochs_done"] / bare[t["model"]] for t in trials)
    spent = max(1e-9, sum(t["span_s"] + (t["startup_s"] or 0) for t in trials))
    startups = [t["startup_s"] for t in trials if t["startup_s"] is not None]
    idle_s = idle_seconds(trials, run["wall_s"])
    run["load_while_training"], _ = load_while_training(trials, bare)
    run["work_while_busy"] = work_while_busy(trials, bare, run["wall_s"] - idle_s)
    costs = {
        "startup_s": statistics.median(startups) if startups else float("nan"),
        "idle_per_trial_s": idle_s / max(1, len(trials)),
        "per_trial_s": per_trial_costs(trials, bare, run["wall_s"], run["load_while_training"]),
    }
    shares = {k: sum(t[k] or 0 for t in trials) / spent for k in ("startup_s", "compile_s", "eval_s")}
    shares["between_epochs_s"] = sum(t["span_s"] - t["epoch_s"] for t in trials) / spent
    efficiency = bare_s / run["wall_s"]
    # Trials share the GPU (time-sliced): a model's pace is read where its trials alone stepped.
    pace = {m: load_while_training(trials, bare, m) for m in models}
    results = {"device": device, "bare": bare, "breakdown": breakdown, "trial_rate": trial_rate,
              "pace": {m: {"of_bare": p, "seconds": s} for m, (p, s) in pace.items()},
              "run": run, "bare_s": bare_s, "efficiency": efficiency, "shares": shares, "costs": costs,
              "trials": trials, "projection": None}  # fmt: skip
    if len(bare) == 6:  # every model of scaling.yaml measured
        results["projection"] = projection(bare, run["load_while_training"], costs["per_trial_s"],
                                          run["work_while_busy"], costs["idle_per_trial_s"])  # fmt: skip

    print(
        f"\n{results['device']}; {len(trials)} trials at batch {BATCH}, {CLASSES:,} classes; {' / '.join(run['notes'])}"
    )
    print(f"{'model':>13} | {'bare img/s':>11} {'trial img/s':>11} {'trial/bare':>10} {'GPU pace':>8} {'over':>6} | "
          f"{'recipe, 2 CE':>12} {'1-pass':>11} | {'pause ms':>8} | {'peak GiB':>8} {'share':>5}")  # fmt: skip
    for m in models:
        rate = trial_rate.get(m, float("nan"))
        two, one = (breakdown.get(m, {}).get(k, float("nan")) for k in ("two cross-entropies", "one pass, compiled"))
        peak = max((t["memory_gb"] or 0 for t in by_model[m]), default=0)
        share = by_model[m][0]["gpu_share"] if by_model[m] else "-"
        # Between one epoch's end and the next one's start (metrics, logging, a checkpoint's copy).
        pauses = [(t["span_s"] - t["epoch_s"]) / t["epochs_done"] * 1e3 for t in by_model[m] if t["epochs_done"]]
        pause = statistics.median(pauses) if pauses else float("nan")
        print(f"{m:>13} | {bare[m]:>11,.0f} {rate:>11,.0f} {rate / bare[m]:>10.1%} {pace[m][0]:>8.1%} "
              f"{pace[m][1]:>5.0f}s | "
              f"{two:>12,.0f} {one:>11,.0f} | {pause:>8.1f} | "
              f"{peak:>8.1f} {share or '-':>5}")  # fmt: skip
    print(
        f"wall {run['wall_s']:.0f} s against {bare_s:.0f} s of bare compute: {efficiency:.1%}; GPU busy "
        f"{run['gpu_busy']:.1%}; of the trials' time: " + ", ".join(f"{k[:-2]} {v:.1%}" for k, v in shares.items())
    )
    print(f"while trials stepped, their steps did {run['load_while_training']:.1%} of the bare step's work (each "
          f"epoch's rate over its steps); while any trained, evaluated or paused between epochs, the GPU did "
          f"{run['work_while_busy']:.1%} (evaluation at a third of a step an image); "
          f"failed: {len(failed)}")  # fmt: skip
    if results["projection"]:
        p = results["projection"]
        print(f"scaling.yaml (150 trials, evaluated on {IN21K_TEST:,} test images as it says): "
              f"bare {p['bare_h']:.1f} h, evaluation {p['evaluation_bare_h']:.1f} h; projected {p['one_gpu_h']:.1f} h "
              f"on one GPU (both at the steps' pace {p['step_pace']:.1%}, and {p['per_trial_s']:.1f} s a trial "
              f"beyond its steps as in this run: {p['costs_h']:.1f} h), {p['eight_gpus_h']:.1f} h on eight (its "
              f"longest trial {p['longest_trial_h']:.1f} h); {p['at_work_pace_h']:.1f} h at this run's pace while "
              f"busy ({p['work_pace']:.1%}) over all its compute, as if its trials were as short as these")  # fmt: skip
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
