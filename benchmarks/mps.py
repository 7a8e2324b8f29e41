"""K trials on one GPU, three ways: time-slicing, CUDA MPS, and fused into one process.

    python benchmarks/mps.py                                    # B-6/Wi-256 and B-12/Wi-1024 at batch 4096, K = 8
    python benchmarks/mps.py --config B-6/Wi-1024:16384 --members 4 --json mps.json

Trials that share a GPU are, unless mlpgrid groups them, each its own process. By default the
GPU runs one process's kernels at a time (time-slicing); under MPS (the Multi-Process Service)
kernels of different processes run side by side; a fused group (``mlpgrid.training.fused``) is one
process stepping all K models in one batched step. For each model and batch this measures,
side by side, the GPU's images/s of: one process alone; K processes at once, time-sliced; K
processes at once under an MPS control daemon this script starts (pipe and log directories in
a temporary folder) and stops again; K members fused in one process. Every process steps
mlpgrid's MLP on a random bf16 batch already on the GPU (bf16 autocast, fused AdamW,
compiled: ``trial_step.make_bare_step``; fused: ``StackedMLP`` as in ``groups.py``); after
every process has compiled and warmed up they step together for ``--steps`` steps, and the
rate is all their images over the time from the first start to the last end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_step(model: str, batch: int, members: int) -> Callable[[], None]:
    """One process's step: the model alone (``members`` 1) or ``members`` of it fused."""
    if members == 1:
        from trial_step import make_bare_step

        return make_bare_step(model, batch, compiled=True)
    import torch
    from groups import SIDE, bare_fused_step

    from mlpgrid.models import architecture, networks
    from mlpgrid.training.fused import StackedMLP

    cfg = architecture.config_for(model, 3 * SIDE * SIDE, 10)
    stacked = StackedMLP(cfg, [networks.MLP(cfg).cuda() for _ in range(members)])
    optimizer = torch.optim.AdamW(stacked.parameters(), lr=1e-4, fused=True)
    net = torch.compile(stacked)
    x = torch.randn(batch, 3, SIDE, SIDE, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 10, (batch,), device="cuda")
    return lambda: bare_fused_step(net, optimizer, x, labels)


def worker(model: str, batch: int, members: int, steps: int, go: Path, out: Path) -> None:
    """One process: warm up, say so, wait for ``go``, time ``steps`` steps, write the times."""
    import torch

    step = make_step(model, batch, members)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    out.with_suffix(".ready").touch()
    while not go.exists():
        time.sleep(0.01)
    started = time.time()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    out.write_text(json.dumps({"started": started, "ended": time.time()}))


def run_together(model: str, batch: int, processes: int, members: int, args: argparse.Namespace,
                 env: dict[str, str], work: Path) -> float:  # fmt: skip
    """The GPU's images/s with ``processes`` processes of ``members`` models each, stepping at once."""
    run = Path(tempfile.mkdtemp(dir=work))
    go, outs = run / "go", [run / f"worker-{i}.json" for i in range(processes)]
    command = [sys.executable, __file__, "--config", f"{model}:{batch}", "--members", str(members),
               "--steps", str(args.steps)]  # fmt: skip
    workers = [subprocess.Popen([*command, "--worker", str(go), str(out)], env=env) for out in outs]
    deadline = time.time() + args.timeout
    try:
        while not all(out.with_suffix(".ready").exists() for out in outs):
            if time.time() > deadline or any(w.poll() not in (None, 0) for w in workers):
                raise RuntimeError(f"{processes} processes of {model} did not all warm up")
            time.sleep(0.05)
        go.touch()
        for w in workers:
            w.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for w in workers:
            w.kill()
    times = [json.loads(out.read_text()) for out in outs]
    wall = max(t["ended"] for t in times) - min(t["started"] for t in times)
    return processes * members * batch * args.steps / wall


class MPSDaemon:
    """An MPS control daemon of this script's own, in a temporary pipe directory."""

    def __init__(self, work: Path) -> None:
        self.env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(work / "mps-pipe"),
                        CUDA_MPS_LOG_DIRECTORY=str(work / "mps-log"))  # fmt: skip
        for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            Path(self.env[key]).mkdir()

    def __enter__(self) -> dict[str, str]:
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=self.env, check=True, timeout=30)
        return self.env

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=self.env, timeout=30)


def measure(model: str, batch: int, k: int, args: argparse.Namespace, work: Path) -> dict[str, float | str]:
    """Images/s of the four ways for one model and batch."""
    plain = dict(os.environ)
    row: dict[str, float | str] = {
        "alone": run_together(model, batch, 1, 1, args, plain, work),
        "time_slicing": run_together(model, batch, k, 1, args, plain, work),
        "fused": run_together(model, batch, 1, k, args, plain, work),
    }
    try:
        with MPSDaemon(Path(tempfile.mkdtemp(dir=work))) as env:
            row["mps"] = run_together(model, batch, k, 1, args, env, work)
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        row["mps_error"] = str(e)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="MODEL:BATCH; default B-6/Wi-256:4096, B-12/Wi-1024:4096")
    parser.add_argument("--members", type=int, default=8, help="K: processes at once, or members fused")
    parser.add_argument("--steps", type=int, default=100, help="timed steps of each process")
    parser.add_argument("--timeout", type=float, default=240, help="seconds for one measurement")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.config or ["B-6/Wi-256:4096", "B-12/Wi-1024:4096"]]
    if args.worker:
        worker(*configs[0], args.members, args.steps, *args.worker)
        return
    k, rows = args.members, []
    with tempfile.TemporaryDirectory() as tmp:
        for model, batch in configs:
            row = {"model": model, "batch": batch, "k": k, **measure(model, batch, k, args, Path(tmp))}
            rows.append(row)
            mps = f"{row['mps']:,.0f}" if "mps" in row else f"failed ({row['mps_error']})"
            print(f"{model} at batch {batch}, GPU images/s: 1 alone {row['alone']:,.0f}; {k} processes "
                  f"time-sliced {row['time_slicing']:,.0f}, under MPS {mps}; {k} fused in one process "
                  f"{row['fused']:,.0f}", flush=True)  # fmt: skip
            if "mps" in row:
                print(f"  MPS / time-slicing {row['mps'] / row['time_slicing']:.2f}x; fused / time-slicing "
                      f"{row['fused'] / row['time_slicing']:.2f}x", flush=True)  # fmt: skip
            else:
                print(f"  fused / time-slicing {row['fused'] / row['time_slicing']:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
