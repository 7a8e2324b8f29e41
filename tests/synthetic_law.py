"""Trials drawn from a known scaling law, to check that the frontier analysis recovers it.

E(P, D) = E_inf + A P^-alpha_p + B D^-beta with compute C = 3 P D (FLOP(f) = P, T = 1, so
the examples seen D are the examples N). Minimising over P at fixed C gives the frontier
E*(C) = E_inf + K C^-(alpha_p beta / (alpha_p + beta)) and the allocation
P* ∝ C^(beta / (alpha_p + beta)), D* ∝ C^(alpha_p / (alpha_p + beta)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlpgrid.analysis.frontier import Point


@dataclass(frozen=True)
class Law:
    e_inf: float = 0.05
    a: float = 3e4
    alpha_p: float = 1.0  # the paper's Fig. 6: about 1 in parameters
    b: float = 7.5
    beta: float = 0.35  # and about 0.35 in examples

    @property
    def alpha(self) -> float:
        """The exponent of the compute-optimal frontier E*(C)."""
        return self.alpha_p * self.beta / (self.alpha_p + self.beta)

    @property
    def params_exponent(self) -> float:
        return self.beta / (self.alpha_p + self.beta)

    @property
    def examples_exponent(self) -> float:
        return self.alpha_p / (self.alpha_p + self.beta)

    def error(self, params: np.ndarray, examples: np.ndarray) -> np.ndarray:
        return self.e_inf + self.a * params**-self.alpha_p + self.b * examples**-self.beta

    def optimal_error(self, compute: float) -> float:
        """E*(C), minimised over a fine continuum of model sizes."""
        params = np.logspace(2, 12, 20001)
        return float(self.error(params, compute / (3 * params)).min())


def draw(law: Law, rng: np.random.Generator, noise: float = 0.02) -> list[Point]:
    """An iso-compute grid, as Hoffmann et al.'s: 13 budgets from 1e10 to 1e16 FLOPs, each
    trained with every model size of 1e4..1e9 (4 per decade) that leaves it 1e3..1e12 examples,
    so that each budget brackets its optimum. Errors carry a relative noise of ``noise``."""
    points = []
    for compute in np.logspace(10, 16, 13):
        for params in np.logspace(4, 9, 21):
            examples = compute / (3 * params)
            if 1e3 <= examples <= 1e12:
                error = float(law.error(params, examples) * np.exp(rng.normal(0, noise)))
                points.append(Point(compute=compute, error=error, params=params, examples=examples, epochs=1,
                                    model=f"P{params:.3g}"))  # fmt: skip
    return points
