"""The torch modules of the vision MLPs that :mod:`mlpgrid.models.architecture` describes.

Every model has ``embed`` (its first layer: what the first-layer picture shows), ``features``
(the representation the head and a linear probe read) and ``head``; :func:`build` makes the
one a config names.
"""

from __future__ import annotations

import torch
from torch import nn

from mlpgrid.models.architecture import MLPConfig, ModelConfig, PatchConfig


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


class Affine(nn.Module):
    """ResMLP's Aff: a per-channel scale and shift (``alpha * x + beta``), instead of a norm."""

    def __init__(self, width: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(width))
        self.beta = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016), as ResMLP's recipe uses it: in training each
    example's residual branch is dropped with probability ``rate`` and the kept ones scaled by
    1 / (1 - rate); the identity in evaluation. One rate for every block, as in ResMLP's code."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return branch
        keep = torch.rand((len(branch),) + (1,) * (branch.dim() - 1), device=branch.device) >= self.rate
        return branch * keep.to(branch.dtype) / (1 - self.rate)


def _channel_mlp(width: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width),
                         nn.Dropout(dropout))  # fmt: skip


class MixerBlock(nn.Module):
    """``X + MLP_tokens(LN(X)^T)^T``, then ``X + MLP_channels(LN(X))``; X is (batch, tokens, channels)."""

    def __init__(self, cfg: PatchConfig):
        super().__init__()
        self.token_norm, self.channel_norm = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.token_mlp = _channel_mlp(cfg.tokens, cfg.token_hidden, cfg.dropout)
        self.channel_mlp = _channel_mlp(cfg.width, cfg.channel_hidden, cfg.dropout)
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.channel_mlp(self.channel_norm(x)))


class ResMLPBlock(nn.Module):
    """``X + g1 * Linear_tokens(Aff(X)^T)^T``, then ``X + g2 * MLP(Aff(X))``, LayerScale g."""

    LAYER_SCALE = {12: 0.1, 24: 1e-5, 36: 1e-6}  # ResMLP's initial g by depth, as in their code

    def __init__(self, cfg: PatchConfig):
        super().__init__()
        self.token_affine, self.channel_affine = Affine(cfg.width), Affine(cfg.width)
        self.token_mix = nn.Linear(cfg.tokens, cfg.tokens)
        self.channel_mlp = _channel_mlp(cfg.width, cfg.channel_hidden, cfg.dropout)
        scale = self.LAYER_SCALE[min(self.LAYER_SCALE, key=lambda d: abs(d - cfg.depth))]
        self.token_scale = nn.Parameter(torch.full((cfg.width,), scale))
        self.channel_scale = nn.Parameter(torch.full((cfg.width,), scale))
        self.drop_path = DropPath(cfg.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.token_mix(self.token_affine(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.drop_path(self.token_scale * mixed)
        return x + self.drop_path(self.channel_scale * self.channel_mlp(self.channel_affine(x)))


class PatchMLP(nn.Module):
    """Patches -> Linear(C*P*P, c) per patch -> depth x block -> norm -> mean over tokens -> head."""

    def __init__(self, cfg: PatchConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.patch_features, cfg.width)
        block = MixerBlock if cfg.family == "Mixer" else ResMLPBlock
        self.blocks = nn.Sequential(*[block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width) if cfg.family == "Mixer" else Affine(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, R, R) -> (B, tokens, C*P*P), each patch's pixels in (channel, row, column) order."""
        b, c, side, p = x.shape[0], self.cfg.channels, self.cfg.side, self.cfg.patch
        x = x.reshape(b, c, side // p, p, side // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, self.cfg.tokens, self.cfg.patch_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(self.patches(x)))).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


Network = MLP | PatchMLP


def build(cfg: ModelConfig) -> Network:
    """The model ``cfg`` describes."""
    return PatchMLP(cfg) if isinstance(cfg, PatchConfig) else MLP(cfg)
