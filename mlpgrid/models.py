"""The torch modules of the vision MLPs that :mod:`mlpgrid.architecture` describes."""

from __future__ import annotations

import torch
from torch import nn

from mlpgrid.architecture import MLPConfig


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "batchnorm":
        return nn.BatchNorm1d(width)
    return nn.Identity()


class Block(nn.Module):
    """One MLP block: norm, the block's layer(s), optional residual; norm before or after."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        m = cfg.width
        act = nn.GELU() if cfg.activation == "gelu" else nn.ReLU()
        if cfg.expansion == 0:
            self.fn = nn.Sequential(nn.Linear(m, m), act)
        else:
            hidden = cfg.expansion * m
            self.fn = nn.Sequential(
                nn.Linear(m, hidden), act, nn.Dropout(cfg.dropout), nn.Linear(hidden, m), nn.Dropout(cfg.dropout)
            )
        self.norm = _norm(cfg.norm, m)
        self.pre = cfg.norm_position == "pre"
        self.skip = cfg.skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.pre:
            out = self.fn(self.norm(z))
            return z + out if self.skip else out
        out = self.fn(z)
        return self.norm(z + out if self.skip else out)


class MLP(nn.Module):
    """Flatten -> Linear(in, m) -> depth x Block -> Linear(m, classes)."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_features, cfg.width)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the head reads (what a linear probe trains on)."""
        return self.blocks(self.embed(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
