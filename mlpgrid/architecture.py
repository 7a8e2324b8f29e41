"""The paper's vision MLPs as plain data: their names, configs, sizes and forward FLOPs.

Two families (Bachmann et al. 2023, "Scaling MLPs"):

* S-MLP, the standard MLP: ``Block(z) = act(W . norm(z))`` with isotropic width m, ReLU.
* B-MLP, the inverted bottleneck: ``Block(z) = z + W_c . act(W_e . norm(z))`` with
  W_e: m -> k*m, W_c: k*m -> m, k = 4, GELU, pre-LayerNorm.

Both flatten the image, embed it with ``Linear(C*R*R, m)``, apply L blocks and end in
``Linear(m, classes)`` with no final norm. A model is named ``B-L/Wi-m`` or ``S-L/Wi-m``.

FLOPs follow fvcore, which the paper used: one multiply-add counts as one FLOP, LayerNorm
with affine weights costs 5 per element, BatchNorm at inference 2 per element, activations,
dropout and residual adds cost nothing. Hardware rates (TFLOP/s, MFU) count 2 FLOPs per
multiply-add instead: see ``HARDWARE_FLOPS_PER_MAC``.

Nothing here needs torch, so the commands that only plan and read results (``status``,
``frontier``, ``--dry-run``) start without it; the modules themselves are in ``models``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HARDWARE_FLOPS_PER_MAC = 2

FAMILIES = ("B", "S")
ACTIVATIONS = ("gelu", "relu")
NORMS = ("layernorm", "batchnorm", "none")
NORM_POSITIONS = ("pre", "post")

# One spelling per model: ASCII digits without leading zeros (``B-01/Wi-016`` or full-width
# digits would be the same model under other trial ids), and sizes a machine can hold.
_NAME = re.compile(r"(?P<family>[BS])-(?P<depth>[1-9][0-9]*)/Wi-(?P<width>[1-9][0-9]*)", re.ASCII)
MAX_DEPTH, MAX_WIDTH = 1024, 1 << 17
NAME_FORMAT = "'B-<depth>/Wi-<width>' or 'S-<depth>/Wi-<width>' (e.g. 'B-12/Wi-1024')"


@dataclass(frozen=True)
class MLPConfig:
    """Everything that fixes an MLP's architecture.

    ``expansion`` 0 means a single ``m -> m`` layer per block (the S-MLP block); k >= 1 means
    two layers ``m -> k*m -> m`` (the B-MLP block, k = 4 in the paper).
    """

    family: str
    depth: int
    width: int
    in_features: int
    num_classes: int
    expansion: int
    activation: str
    norm: str
    norm_position: str
    skip: bool
    dropout: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.family}-{self.depth}/Wi-{self.width}"


def parse_name(name: str) -> tuple[str, int, int]:
    """``'B-12/Wi-1024'`` -> ``('B', 12, 1024)``; raises ValueError on anything else."""
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if not match or len(match["depth"]) > 4 or len(match["width"]) > 6:
        raise ValueError(f"unknown model {name!r}; expected {NAME_FORMAT}")
    depth, width = int(match["depth"]), int(match["width"])
    if depth > MAX_DEPTH or width > MAX_WIDTH:
        raise ValueError(f"model {name!r}: at most depth {MAX_DEPTH} and width {MAX_WIDTH}")
    return match["family"], depth, width


def config_for(
    name: str,
    in_features: int,
    num_classes: int,
    *,
    expansion: int | None = None,
    activation: str | None = None,
    norm: str | None = None,
    norm_position: str | None = None,
    skip: bool | None = None,
    dropout: float = 0.0,
) -> MLPConfig:
    """The config of a named model; options left as None take the family's paper default."""
    family, depth, width = parse_name(name)
    defaults = {
        "B": dict(expansion=4, activation="gelu", norm="layernorm", norm_position="pre", skip=True),
        "S": dict(expansion=0, activation="relu", norm="layernorm", norm_position="pre", skip=False),
    }[family]
    chosen = dict(expansion=expansion, activation=activation, norm=norm, norm_position=norm_position, skip=skip)
    options = {k: defaults[k] if v is None else v for k, v in chosen.items()}
    return MLPConfig(family, depth, width, in_features, num_classes, dropout=dropout, **options)


def _block_linears(cfg: MLPConfig) -> list[tuple[int, int]]:
    m = cfg.width
    if cfg.expansion == 0:
        return [(m, m)]
    return [(m, cfg.expansion * m), (cfg.expansion * m, m)]


def _norm_params(cfg: MLPConfig) -> int:
    return 0 if cfg.norm == "none" else 2 * cfg.width


def count_params(cfg: MLPConfig) -> int:
    """Trainable parameters, computed without building the model."""
    linears = [(cfg.in_features, cfg.width), (cfg.width, cfg.num_classes)]
    linears += _block_linears(cfg) * cfg.depth
    weights = sum(i * o + o for i, o in linears)
    return weights + cfg.depth * _norm_params(cfg)


def forward_flops(cfg: MLPConfig) -> int:
    """Forward FLOPs for one example, fvcore's convention (a multiply-add is one FLOP)."""
    macs = cfg.in_features * cfg.width + cfg.width * cfg.num_classes
    macs += cfg.depth * sum(i * o for i, o in _block_linears(cfg))
    per_element = {"layernorm": 5, "batchnorm": 2, "none": 0}[cfg.norm]
    return macs + cfg.depth * per_element * cfg.width


def compute(flops_per_forward: int, examples: int, epochs: int) -> float:
    """Training compute C = FLOP(f) x 3 x N x T (forward plus a backward of twice its cost)."""
    return float(flops_per_forward) * 3 * examples * epochs


def hardware_training_flops(cfg: MLPConfig, images: int) -> float:
    """FLOPs the hardware executes to train on ``images`` examples (two per multiply-add)."""
    return HARDWARE_FLOPS_PER_MAC * compute(forward_flops(cfg), images, 1)
