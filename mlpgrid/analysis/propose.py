"""From a fitted allocation back to trials: the model, N and T that spend a budget C as the
frontier recommends, and grid files of such trials to test the recommendation.

Models are drawn from the grid's family: its depths, with widths in steps of 32, nearest in
log P to the target. Given a model, the examples seen D = C / (3 FLOP(f)) go to as many unique
examples as the dataset has, repeated over T epochs only beyond that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from mlpgrid.analysis.frontier import Point
from mlpgrid.analysis.outputs import write_new
from mlpgrid.grid import spec
from mlpgrid.grid.spec import GridSpec, RunOptions, Trial, TrialConfig
from mlpgrid.models import architecture

WIDTHS = range(32, 16384 + 1, 32)
SPREAD = (1 / 4, 1 / 2, 1, 2, 4)  # model sizes around P* of a proposal, as factors of P*
_PLACEMENT = ("model", "examples", "epochs")


def family_models(grid: GridSpec, template: TrialConfig) -> list[str]:
    """The models a proposal may choose among, of the template's family: a B- or S-MLP of any
    depth the grid uses at any width in :data:`WIDTHS`; a Mixer, ResMLP or RepMLPNet of any size
    at any patch size the grid uses."""
    family = architecture.parse_name(template.model)[0]
    used = [t.config.model for t in grid.trials if architecture.parse_name(t.config.model)[0] == family]
    if family in ("B", "S"):
        depths = sorted({architecture.parse_name(name)[1] for name in used})
        return [f"{family}-{d}/Wi-{w}" for d in depths for w in WIDTHS]
    by_family: dict[str, Iterable[str]] = {"Mixer": architecture.MIXER_SIZES, "ResMLP": architecture.RESMLP_SIZES,
                                           "RepMLPNet": architecture.REPMLPNET_SIZES}  # fmt: skip
    sizes = by_family[family]
    patches = sorted({name.rsplit("/", 1)[1] for name in used})
    return [f"{family}-{size}/{patch}" for size in sizes for patch in patches]


def _params(template: TrialConfig, model: str) -> int:
    return architecture.count_params(dataclasses.replace(template, model=model).model_config())


def nearest_model(params: float, template: TrialConfig, names: list[str]) -> str:
    """The model of ``names`` (:func:`family_models`) whose size is nearest ``params``."""
    return min(names, key=lambda name: abs(math.log(_params(template, name) / params)))


def spend(budget: float, model: str, template: TrialConfig) -> TrialConfig:
    """The template with ``model``, and the N and T that make its compute closest to ``budget``."""
    cfg = dataclasses.replace(template, model=model)
    seen = budget / (3 * architecture.forward_flops(cfg.model_config()))
    most = cfg.pool_size  # what pre-training may draw from
    epochs = max(1, round(seen / most))
    examples = min(most, max(1, round(seen / epochs)))
    return dataclasses.replace(cfg, examples=examples, epochs=epochs)


def iso_compute(budget: float, params: float, template: TrialConfig, names: list[str]) -> list[TrialConfig]:
    """Trials that all spend ``budget``, with models from P*/4 to 4 P*: the one nearest P*
    should reach the lowest error if the allocation fit is right."""
    chosen = dict.fromkeys(nearest_model(params * f, template, names) for f in SPREAD)
    return [spend(budget, model, template) for model in chosen]


def write_grid(path: Path, source: GridSpec, configs: list[TrialConfig], header: str) -> GridSpec:
    """A new grid file of ``configs`` (which differ only in model, N and T) under the source
    grid's name, so that their runs join its experiment; read back to validate it. Raises
    :class:`~mlpgrid.analysis.outputs.OutputError` where ``path`` exists or cannot be written."""
    defaults = TrialConfig(model=configs[0].model, epochs=1)
    first = dataclasses.asdict(configs[0])
    base = {
        k: v for k, v in first.items()
        if k not in _PLACEMENT and v != getattr(defaults, k) and all(getattr(c, k) == v for c in configs)
    }  # fmt: skip
    varying = {k: [getattr(c, k) for c in configs] for k in _PLACEMENT}
    doc: dict = {"name": source.name}
    if source.data_roots:
        doc["data"] = dict(source.data_roots)
    if run := {k: v for k, v in dataclasses.asdict(source.run).items() if v != getattr(RunOptions(), k)}:
        doc["run"] = run
    doc |= {"base": base, "zip": varying}
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    write_new(path, comment + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    return spec.load(path)


def template(grid: GridSpec, frontier: list[Point], budget: float) -> TrialConfig:
    """The settings to recommend at ``budget``: those of the grid's frontier trial nearest in
    compute (its learning rate, batch size, ...), else of the grid's first trial."""
    by_id = {t.id: t.config for t in grid.trials}
    known = [p for p in frontier if p.trial_id in by_id]
    if not known:
        return grid.trials[0].config
    return by_id[min(known, key=lambda p: abs(math.log(p.compute / budget))).trial_id]


def recommend(grid: GridSpec, frontier: list[Point], budget: float, params: float) -> dict[str, Any]:
    """The model nearest ``params`` in the grid's family, with the N and T that spend ``budget``."""
    base = template(grid, frontier, budget)
    cfg = spend(budget, nearest_model(params, base, family_models(grid, base)), base)
    trial = Trial(spec.trial_id(cfg), cfg)
    return {"model": cfg.model, "model_params": trial.params, "examples": cfg.examples, "epochs": cfg.epochs,
            "compute": trial.compute}  # fmt: skip
