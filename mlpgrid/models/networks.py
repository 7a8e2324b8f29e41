"""The torch modules of the vision MLPs that :mod:`mlpgrid.models.architecture` describes.

Every model has ``embed`` (its first layer: what the first-layer picture shows), ``features``
(the representation the head and a linear probe read) and ``head``; :func:`build` makes the
one a config names. A RepMLPNet trained with its conv branches becomes the pure MLP it
deploys as through :func:`inject_locality`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from mlpgrid.models.architecture import GATE_REDUCTION, MLPConfig, ModelConfig, PatchConfig, RepConfig


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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(patches(x, self.cfg.patch)))).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, R, R) -> (B, (R/p)^2, C*p*p), the p x p patches in rows, each patch's pixels in
    (channel, row, column) order."""
    b, c, side = x.shape[0], x.shape[1], x.shape[2]
    x = x.reshape(b, c, side // p, p, side // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (side // p) ** 2, c * p * p)


# --- RepMLPNet ------------------------------------------------------------------------------


class GlobalPerceptron(nn.Module):
    """A per-channel gate from the whole map: mean pool, c -> c/4 -> c, ReLU, sigmoid."""

    def __init__(self, c: int):
        super().__init__()
        self.reduce, self.expand = nn.Linear(c, c // GATE_REDUCTION), nn.Linear(c // GATE_REDUCTION, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return torch.sigmoid(self.expand(F.relu(self.reduce(pooled))))[:, :, None, None]


class PartitionPerceptron(nn.Module):
    """An FC over the h x w positions of each partition of each channel, channel i with weight
    set i mod S; in training with BatchNorm and (the Local Perceptron) depthwise k x k
    convolutions with BatchNorm beside it, deployed as one FC with a bias (the merge of them)."""

    def __init__(self, c: int, sets: int, h: int, kernels: tuple[int, ...], deployed: bool):
        super().__init__()
        self.c, self.sets, self.h = c, sets, h
        # Each set initialised as a linear layer of h*h inputs is (their grouped 1x1 convolution's).
        self.weight = nn.Parameter(torch.stack([nn.Linear(h * h, h * h, bias=False).weight.detach()
                                                for _ in range(sets)]))  # fmt: skip
        if deployed:
            self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(sets, h * h))
            self.norm: nn.BatchNorm2d | None = None
            self.local = nn.ModuleDict()
        else:
            self.bias, self.norm = None, nn.BatchNorm2d(sets)
            self.local = nn.ModuleDict({
                str(k): nn.Sequential(nn.Conv2d(sets, sets, k, padding=k // 2, groups=sets, bias=False),
                                      nn.BatchNorm2d(sets))
                for k in kernels
            })  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, side, _ = x.shape
        h, parts = self.h, side // self.h
        # (N, C, parts, h, parts, h) -> every partition of every group of S channels: (N', S, h*h)
        rows = x.reshape(n, c, parts, h, parts, h).permute(0, 2, 4, 1, 3, 5).reshape(-1, self.sets, h * h)
        out = torch.einsum("bsi,soi->bso", rows, self.weight)
        if self.bias is not None:
            out = out + self.bias
        out = out.reshape(-1, self.sets, h, h)
        if self.norm is not None:
            out = self.norm(out)
        for branch in self.local.values():
            out = out + branch(rows.reshape(-1, self.sets, h, h))
        return out.reshape(n, parts, parts, c, h, h).permute(0, 3, 1, 4, 2, 5).reshape(n, c, side, side)


class RepMLPUnit(nn.Module):
    """``X + gate(Y) * Partition(Y)`` with Y = BN(X), then ``X + FFN(BN(X))``."""

    def __init__(self, cfg: RepConfig, c: int, sets: int, h: int):
        super().__init__()
        self.norm1, self.norm2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.gate = GlobalPerceptron(c)
        self.partition = PartitionPerceptron(c, sets, h, cfg.kernels, cfg.deployed)
        self.ffn = nn.Sequential(
            nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Conv2d(4 * c, c, 1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.partition(y) * self.gate(y)
        return x + self.ffn(self.norm2(x))


class RepMLPNet(nn.Module):
    """Patches -> Linear(C*P*P, c) + BN + ReLU -> four stages of units with 2x2 merges between
    -> BN -> mean pool -> head."""

    def __init__(self, cfg: RepConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.channels_per_stage
        self.embed = nn.Linear(cfg.patch_features, widths[0], bias=False)
        self.embed_norm = nn.BatchNorm2d(widths[0])
        self.stages = nn.ModuleList(
            nn.Sequential(*[RepMLPUnit(cfg, c, sets, h) for _ in range(n)])
            for c, n, sets, h in zip(widths, cfg.blocks, cfg.sharesets, cfg.partitions, strict=True)
        )
        self.merges = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 2, stride=2, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths, widths[1:], strict=False)
        )
        self.norm = nn.BatchNorm2d(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        side = self.cfg.side // self.cfg.patch
        x = self.embed(patches(x, self.cfg.patch)).transpose(1, 2).reshape(len(x), -1, side, side)
        x = F.relu(self.embed_norm(x))
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        return F.adaptive_avg_pool2d(self.norm(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _fused(weight: torch.Tensor, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight (output channels first) and bias once the evaluation-mode BatchNorm after
    it is folded in."""
    assert norm.running_var is not None and norm.running_mean is not None
    scale = norm.weight / (norm.running_var + norm.eps).sqrt()
    return weight * scale.reshape(-1, *[1] * (weight.dim() - 1)), norm.bias - norm.running_mean * scale


@torch.no_grad()
def _merged_partition(block: PartitionPerceptron) -> tuple[torch.Tensor, torch.Tensor]:
    """Locality Injection: the (S, h*h, h*h) weights and (S, h*h) bias of one FC that computes,
    in evaluation, what the block's FC, BatchNorm and conv branches compute together."""
    assert block.norm is not None
    sets, hh = block.sets, block.h * block.h
    weight, bias = _fused(block.weight, block.norm)
    bias = bias[:, None].expand(sets, hh).clone()
    # Each position's unit vector through a branch's convolution gives that position's column of
    # the branch as an FC (zero padding at the partition's edges is what the branch sees).
    basis = torch.eye(hh, device=weight.device, dtype=weight.dtype).reshape(hh, 1, block.h, block.h)
    basis = basis.repeat(1, sets, 1, 1)
    for branch in block.local.values():
        assert isinstance(branch, nn.Sequential)
        conv, norm = branch[0], branch[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
        kernel, shift = _fused(conv.weight, norm)
        columns = F.conv2d(basis, kernel, padding=conv.padding, groups=sets)  # (input position, S, h, h)
        weight = weight + columns.reshape(hh, sets, hh).permute(1, 2, 0)
        bias = bias + shift[:, None]
    return weight, bias


def inject_locality(model: RepMLPNet) -> RepMLPNet:
    """The deployed form of a trained RepMLPNet: every Partition Perceptron one FC (its conv
    branches and BatchNorm merged in), everything else as trained. It computes what ``model``
    computes in evaluation mode, up to float rounding."""
    merged = RepMLPNet(dataclasses.replace(model.cfg, deployed=True)).to(next(model.parameters()).device)
    state = {k: v for k, v in model.state_dict().items() if ".partition." not in k}
    missing, _ = merged.load_state_dict(state, strict=False)
    for name, module in model.named_modules():
        if isinstance(module, PartitionPerceptron):
            target = merged.get_submodule(name)
            assert isinstance(target, PartitionPerceptron)
            weight, bias = _merged_partition(module)
            target.weight.data.copy_(weight)
            assert target.bias is not None
            target.bias.data.copy_(bias)
    assert all(".partition." in k for k in missing), missing
    return merged.train(model.training)


Network = MLP | PatchMLP | RepMLPNet


def build(cfg: ModelConfig) -> Network:
    """The model ``cfg`` describes."""
    if isinstance(cfg, RepConfig):
        return RepMLPNet(cfg)
    return PatchMLP(cfg) if isinstance(cfg, PatchConfig) else MLP(cfg)
