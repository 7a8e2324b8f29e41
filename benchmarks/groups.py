"""Trial groups on a GPU: how much faster K same-shape trials train together than alone.

    python benchmarks/groups.py                          # everything below, --json groups.json
    python benchmarks/groups.py --part sweep --part rule --steps 30

- ``sweep``: a 16-trial learning-rate sweep (factor-2 grid) of B-6/Wi-256 at batch 1024 as one
  fused group, against one of its trials alone (eager, as mlpgrid trains it alone, and
  compiled). Rates are images per second of all members together, from the rates the trials
  log per epoch (the first epoch left out: it compiles).
- ``rule``: for growing steps, 8 members fused against one trial alone, both compiled: where
  fusing stops paying (``mlpgrid.policy.FUSE_BELOW_STEP_FLOPS``).
- ``patch``: the same for Mixer and ResMLP (their matmuls are over batch x patches rows).
- ``leave``: a compiled fused group of four B-6/Wi-512 at batch 4096 whose members end at
  T = 1, 3, 5, 7 (each leaving the stack, which is compiled again for the members left) against
  four that all end at T = 4: the same 16 member-epochs. Wall time of each group, from its
  start to its last member's end, and the seconds of each compile of the stack.
- ``vmap``: the fused step two ways, bare (no loader): batched matmuls written by hand and
  mlpgrid's ``StackedMLP`` (``torch.func.vmap`` over ``functional_call`` of the MLP), both
  compiled, with fused AdamW on the stacked weights.

Data: random pixels in CIFAR-10's file layout at 64x64 (speed does not depend on pixel values),
kept on the GPU; the paper's recipe (flips, crops, MixUp, label smoothing) with AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import write_cifar10  # noqa: E402

from mlpgrid import data  # noqa: E402
from mlpgrid.grid.layout import TrialLayout  # noqa: E402
from mlpgrid.grid.spec import Trial, TrialConfig  # noqa: E402
from mlpgrid.models import architecture, networks
from mlpgrid.training.fused import StackedMLP  # noqa: E402
from mlpgrid.training.loop import Hooks, run_group, run_trial  # noqa: E402
from mlpgrid.training.setup import TrialOptions  # noqa: E402
from mlpgrid.training.step import autocast  # noqa: E402

SIDE = 64
RECIPE = dict(optimizer="adamw", flip=True, crop_padding=4, mixup=0.8, label_smoothing=0.3)
RULE = (("B-6/Wi-256", 4096), ("B-6/Wi-256", 16384), ("B-6/Wi-512", 16384), ("B-6/Wi-1024", 16384))
# The patch families' steps on either side of FUSE_BELOW_STEP_FLOPS (0.36 to 1.9 TFLOP).
PATCH_RULE = (("ResMLP-S12/16", 256), ("Mixer-S/16", 256), ("ResMLP-S12/8", 256), ("Mixer-S/8", 256))


def _rate(history: list[dict]) -> float:
    return statistics.mean(m["images_per_s"] for m in history[1:])


Datasets = Callable[[], data.Datasets]


def alone(cfg: TrialConfig, datasets: Datasets, work: Path, compile: bool) -> float:
    """Images/s of ``cfg`` trained alone."""
    result = run_trial(cfg, TrialLayout(Path(tempfile.mkdtemp(dir=work))), TrialOptions(compile=compile),
                       datasets=datasets())  # fmt: skip
    return _rate(result.history)


def fused(cfgs: list[TrialConfig], datasets: Datasets, work: Path) -> float:
    """Images/s of all members of a fused, compiled group together."""
    results = {}
    root = Path(tempfile.mkdtemp(dir=work))
    run_group(cfgs, [TrialLayout(root / str(i)) for i in range(len(cfgs))], TrialOptions(compile=True),
              datasets=datasets(), hooks=[Hooks()] * len(cfgs), device=torch.device("cuda"), fuse=True,
              on_end=results.__setitem__)  # fmt: skip
    return len(cfgs) * statistics.mean(_rate(r.history) for r in results.values())


def _member_ends(cfgs: list[TrialConfig], datasets: Datasets, work: Path) -> tuple[list[float], list[float]]:
    """Seconds from a fused, compiled group's start to each member's end, and the seconds the
    stack spent compiling, each time (as the last member to end logged them)."""
    root, ended, results = Path(tempfile.mkdtemp(dir=work)), {}, {}

    def end(i: int, outcome: object) -> None:
        ended[i], results[i] = time.perf_counter() - started, outcome

    started = time.perf_counter()
    run_group(cfgs, [TrialLayout(root / str(i)) for i in range(len(cfgs))], TrialOptions(compile=True),
              datasets=datasets(), hooks=[Hooks()] * len(cfgs), device=torch.device("cuda"), fuse=True,
              on_end=end)  # fmt: skip
    last = results[max(ended, key=ended.get)]
    return [ended[i] for i in range(len(cfgs))], [m["compile_seconds"] for m in last.history if "compile_seconds" in m]


def leave(datasets: Datasets, work: Path, examples: int) -> dict:
    base = dict(model="B-6/Wi-512", dataset="cifar-10", resolution=SIDE, examples=examples, batch_size=4096,
                **RECIPE)  # fmt: skip
    result = {}
    for name, epochs in (("end together", (4, 4, 4, 4)), ("leave at their T", (1, 3, 5, 7))):
        ends, compiles = _member_ends([TrialConfig(**base, epochs=t, lr=1e-3 * (i + 1))
                                       for i, t in enumerate(epochs)], datasets, work)  # fmt: skip
        wall = max(ends)
        result[name] = {"epochs": epochs, "wall_s": wall, "member_epochs_per_s": sum(epochs) / wall,
                        "ended_at_s": [round(e, 1) for e in ends],
                        "compile_s": [round(c, 1) for c in compiles]}  # fmt: skip
        print(f"fused compiled group of 4 x B-6/Wi-512, T = {epochs} ({name}): {wall:.1f} s, "
              f"{sum(epochs) / wall:.2f} member-epochs/s, members ended at {result[name]['ended_at_s']} s, "
              f"the stack compiled for {result[name]['compile_s']} s", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return result


def sweep(datasets: Datasets, work: Path, examples: int, epochs: int) -> dict:
    base = dict(model="B-6/Wi-256", dataset="cifar-10", resolution=SIDE, examples=examples, batch_size=1024,
                epochs=epochs, **RECIPE)  # fmt: skip
    cfgs = [TrialConfig(**base, lr=1e-3 * 2.0**k) for k in range(-8, 8)]
    result = {"trials": len(cfgs), "alone_eager": alone(cfgs[8], datasets, work, compile=False),
              "alone_compiled": alone(cfgs[8], datasets, work, compile=True),
              "group": fused(cfgs, datasets, work)}  # fmt: skip
    print(f"lr sweep, 16 x B-6/Wi-256 at batch 1024: alone {result['alone_eager']:,.0f} img/s eager, "
          f"{result['alone_compiled']:,.0f} compiled; fused group {result['group']:,.0f} img/s: "
          f"{result['group'] / result['alone_eager']:.1f}x eager alone, "
          f"{result['group'] / result['alone_compiled']:.1f}x compiled alone", flush=True)  # fmt: skip
    return result


def rule(datasets: Datasets, work: Path, examples: int, members: int,
         sizes: tuple[tuple[str, int], ...] = RULE) -> list[dict]:  # fmt: skip
    rows = []
    for model, batch in sizes:
        base = dict(model=model, dataset="cifar-10", resolution=SIDE, examples=examples, batch_size=batch, epochs=3,
                    **RECIPE)  # fmt: skip
        cfgs = [TrialConfig(**base, lr=1e-3 * (i + 1)) for i in range(members)]
        single = alone(cfgs[0], datasets, work, compile=True)
        together = fused(cfgs, datasets, work)
        step = Trial("", cfgs[0]).step_flops
        rows.append({"model": model, "batch": batch, "step_tflop": step / 1e12, "alone": single, "fused": together,
                     "gain": together / single})  # fmt: skip
        print(f"{model:>12} batch {batch:>5} (step {step / 1e12:5.2f} TFLOP): alone {single:>12,.0f} img/s, "
              f"{members} fused {together:>12,.0f} img/s: {together / single:.2f}x", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return rows


class BatchedMatmuls(StackedMLP):
    """The fused forward written out by hand, for comparison: the first layer as one multiply of
    the batch with every member's embedding side by side, the later ones as ``torch.baddbmm``."""

    def __init__(self, cfg: architecture.MLPConfig, members: list[networks.MLP]):
        super().__init__(cfg, members)
        self._index = {name: i for i, name in enumerate(self.names)}

    def _p(self, name: str) -> torch.Tensor:
        return self.stacked[self._index[name]]

    def _linear(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """``z`` (K, B, in) through each member's own ``name`` layer: (K, B, out)."""
        weight, bias = self._p(f"{name}.weight"), self._p(f"{name}.bias")
        return torch.baddbmm(bias[:, None, :], z, weight.transpose(1, 2))

    def _norm(self, block: int, z: torch.Tensor) -> torch.Tensor:
        if self.cfg.norm == "none":
            return z
        weight, bias = self._p(f"blocks.{block}.norm.weight"), self._p(f"blocks.{block}.norm.bias")
        return F.layer_norm(z, (self.cfg.width,)) * weight[:, None, :] + bias[:, None, :]

    def _block(self, block: int, z: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        act = F.gelu if cfg.activation == "gelu" else F.relu
        x = self._norm(block, z) if cfg.norm_position == "pre" else z
        out = act(self._linear(f"blocks.{block}.fn.0", x))
        if cfg.expansion:
            out = self._linear(f"blocks.{block}.fn.3", out)
        out = z + out if cfg.skip else out
        return out if cfg.norm_position == "pre" else self._norm(block, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> every member's logits (K, B, classes)."""
        k, m = self.members, self.cfg.width
        weight, bias = self._p("embed.weight"), self._p("embed.bias")
        z = F.linear(x.flatten(1), weight.reshape(k * m, -1), bias.reshape(k * m))  # (B, K*m): one multiply
        z = z.view(len(x), k, m).transpose(0, 1)
        for block in range(self.cfg.depth):
            z = self._block(block, z)
        return self._linear("head", z)


def bare_fused_step(model, optimizer, x, labels) -> None:  # noqa: ANN001
    """One step of a stacked model on one batch, every member's loss summed."""
    with autocast(x.device):
        logits = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.repeat(len(logits)))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def vmap_against_bmm(members: int, batch: int, steps: int) -> dict:
    """Bare fused steps/s of StackedMLP and of torch.func.vmap over the MLP, both compiled."""
    cfg = architecture.config_for("B-6/Wi-256", 3 * SIDE * SIDE, 10)
    nets = [networks.MLP(cfg).cuda() for _ in range(members)]
    x = torch.randn(batch, 3, SIDE, SIDE, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 10, (batch,), device="cuda")
    stacked, by_hand = StackedMLP(cfg, nets), BatchedMatmuls(cfg, nets)
    variants = {
        "batched matmuls by hand": (torch.compile(by_hand), list(by_hand.parameters())),
        "torch.func.vmap (StackedMLP)": (torch.compile(stacked), list(stacked.parameters())),
    }
    rates = {}
    for name, (model, weights) in variants.items():
        optimizer = torch.optim.AdamW(weights, lr=1e-4, fused=True)
        for _ in range(3):  # compile, warm up
            bare_fused_step(model, optimizer, x, labels)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            bare_fused_step(model, optimizer, x, labels)
        torch.cuda.synchronize()
        rates[name] = members * batch * steps / (time.perf_counter() - started)
        print(f"bare fused step, {members} x B-6/Wi-256 at batch {batch}, {name}: {rates[name]:,.0f} img/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", action="append", choices=("sweep", "rule", "patch", "leave", "vmap"),
                        help="default: all")  # fmt: skip
    parser.add_argument("--examples", type=int, default=65536, help="training images of the synthetic dataset")
    parser.add_argument("--members", type=int, default=8, help="members of a group in the rule part")
    parser.add_argument("--steps", type=int, default=30, help="timed steps in the vmap part")
    parser.add_argument("--size", action="append", metavar="MODEL:BATCH",
                        help="(model, batch) of the rule or patch part instead of its own; repeatable")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("groups.py measures GPU speed; no CUDA device here")
    parts = args.part or ["sweep", "rule", "patch", "leave", "vmap"]
    sizes = tuple((model, int(batch)) for model, batch in (s.rsplit(":", 1) for s in args.size or ()))
    print(torch.cuda.get_device_name(), flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = write_cifar10(work / "cifar-10-batches-py", train=args.examples)
        arrays = data.load("cifar-10", str(root), SIDE)  # resized once, handed to every run

        def datasets() -> data.Datasets:
            shared = data.Datasets({"cifar-10": root})
            shared.keep("cifar-10", SIDE, None, arrays)
            return shared

        measures = {
            "vmap": lambda: vmap_against_bmm(8, 4096, args.steps),
            "sweep": lambda: sweep(datasets, work, min(args.examples, 50_000), epochs=4),
            "rule": lambda: rule(datasets, work, args.examples, args.members, sizes or RULE),
            "patch": lambda: rule(datasets, work, min(args.examples, 32_768), args.members, sizes or PATCH_RULE),
            "leave": lambda: leave(datasets, work, args.examples),
        }
        for part in parts:
            try:
                results[part] = measures[part]()
            except Exception:  # noqa: BLE001 - say what failed, measure the rest
                traceback.print_exc()
                results[part] = {"error": traceback.format_exc()}
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
