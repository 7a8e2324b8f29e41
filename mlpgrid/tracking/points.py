"""A finished trial as the frontier sees it: its compute, error, P, N and T.

Kept apart from :mod:`mlpgrid.analysis.frontier` so that what records trials (:mod:`mlpgrid.tracking.writer`)
need not import the fitting code and SciPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlpgrid.models import architecture


@dataclass(frozen=True)
class Point:
    """One trial's result: its compute C = FLOP(f) 3 N T, error, P, N and T."""

    compute: float
    error: float
    params: float
    examples: float
    epochs: float
    model: str = ""
    trial_id: str = ""
    settings: tuple[tuple[str, str], ...] = ()  # swept settings other than model, N, T and seed

    @property
    def family(self) -> str:
        """The model's family (``B``, ``S``, ``Mixer``, ``ResMLP``, ``RepMLPNet``); "" for a model of no known
        name (a CSV row without one)."""
        try:
            return architecture.parse_name(self.model)[0]
        except ValueError:
            return ""

    @property
    def examples_seen(self) -> float:
        return self.examples * self.epochs

    def key(self) -> tuple:
        """What a point of the compute plot stands for: a (model, N, T)."""
        return (self.model or self.params, self.examples, self.epochs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "compute": self.compute, "error": self.error, "params": self.params, "examples": self.examples,
            "epochs": self.epochs, "model": self.model, "trial_id": self.trial_id, "settings": dict(self.settings),
        }  # fmt: skip
