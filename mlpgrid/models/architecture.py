"""The vision MLPs as plain data: their names, configs, sizes and forward FLOPs.

Two families of plain MLPs on flattened pixels (Bachmann et al. 2023, "Scaling MLPs"):

* S-MLP, the standard MLP: ``Block(z) = act(W . norm(z))`` with isotropic width m, ReLU.
* B-MLP, the inverted bottleneck: ``Block(z) = z + W_c . act(W_e . norm(z))`` with
  W_e: m -> k*m, W_c: k*m -> m, k = 4, GELU, pre-LayerNorm.

Both flatten the image, embed it with ``Linear(C*R*R, m)``, apply L blocks and end in
``Linear(m, classes)`` with no final norm. A model is named ``B-L/Wi-m`` or ``S-L/Wi-m``.

And two patch-based all-MLP families, the structure between them and a ConvNet: both cut the
image into non-overlapping P x P patches, embed each with one ``Linear(C*P*P, c)`` (S = (R/P)^2
tokens of c channels), apply L blocks, pool the tokens by their mean and end in a linear head:

* MLP-Mixer (Tolstikhin et al. 2021), ``Mixer-{S,B,L,H}/P``: each block is
  ``X + MLP_tokens(LN(X)^T)^T`` (S -> D_S -> S) then ``X + MLP_channels(LN(X))`` (c -> D_C -> c),
  GELU, and a LayerNorm before the pooling; sizes from their Table 1.
* ResMLP (Touvron et al. 2021), ``ResMLP-{S12,S24,S36,B24}/P``: each block is
  ``X + diag(g1) Linear_tokens(Aff(X)^T)^T`` (one S -> S layer) then
  ``X + diag(g2) MLP(Aff(X))`` (c -> 4c -> c, GELU), with Aff(x) = a * x + b per channel
  instead of a LayerNorm and LayerScale g; an Aff before the pooling.

And the all-MLP family with a ConvNet's *local* prior while it trains:

* RepMLPNet (Ding et al., CVPR 2022), ``RepMLPNet-{T,B,D,L}/P``: P x P patches embedded by one
  linear layer (their stride-P convolution) with BatchNorm and ReLU, then four stages at 1/P,
  1/2P, 1/4P and 1/8P of the image's side (a 2x2 patch merge with BatchNorm and ReLU between
  them), ending in BatchNorm, mean pooling and a linear head. Each block is
  ``X + RepMLP(BN(X))`` then ``X + FFN(BN(X))`` (1x1 layers c -> 4c -> c, each with
  BatchNorm, GELU between). The RepMLP block multiplies a Global Perceptron's per-channel gate
  (mean pool, c -> c/4 -> c, ReLU, sigmoid) into a Partition Perceptron: an FC over each
  h x w partition's positions, one of S weight sets per channel (channel i uses set i mod S),
  with BatchNorm; in training a Local Perceptron adds depthwise k x k convolutions with
  BatchNorm (kernels 1 and 3) in parallel. After training *Locality Injection* merges the conv
  and BN branches into the FC exactly (:func:`mlpgrid.models.networks.inject_locality`): the
  deployed model is a pure MLP. Sizes are their code's; it defines them at 224 and 256 pixels
  with one partition per stage map (h = the stage's side: 56/28/14/7, 64/32/16/8). Here any
  side divisible by 8P, h the stage's side unless ``partition`` caps it. A ``deployed`` config
  describes the merged form; compute C counts the training form (what training costs).

FLOPs follow fvcore, which the paper used: one multiply-add counts as one FLOP, LayerNorm
with affine weights costs 5 per element, BatchNorm at inference 2 per element, activations,
dropout, residual adds and other elementwise products (ResMLP's Aff and LayerScale) and the
mean pooling cost nothing. Hardware rates (TFLOP/s, MFU) count 2 FLOPs per
multiply-add instead: see ``HARDWARE_FLOPS_PER_MAC``.

Nothing here needs torch, so the commands that only plan and read results (``status``,
``frontier``, ``--dry-run``) start without it; the modules themselves are in ``models``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

HARDWARE_FLOPS_PER_MAC = 2

FAMILIES = ("B", "S", "Mixer", "ResMLP", "RepMLPNet")
ACTIVATIONS = ("gelu", "relu")
NORMS = ("layernorm", "batchnorm", "none")
NORM_POSITIONS = ("pre", "post")

# One spelling per model: ASCII digits without leading zeros (``B-01/Wi-016`` or full-width
# digits would be the same model under other trial ids), and sizes a machine can hold.
_NAME = re.compile(r"(?P<family>[BS])-(?P<depth>[1-9][0-9]*)/Wi-(?P<width>[1-9][0-9]*)", re.ASCII)
MAX_DEPTH, MAX_WIDTH = 1024, 1 << 17
NAME_FORMAT = (
    "'B-<depth>/Wi-<width>' or 'S-<depth>/Wi-<width>' (e.g. 'B-12/Wi-1024'), 'Mixer-<size>/<patch>'"
    " (size S, B, L or H), 'ResMLP-<size>/<patch>' (size S12, S24, S36 or B24) or 'RepMLPNet-<size>/<patch>'"
    " (size T, B, D or L)"
)
# Mixer's Table 1: blocks L, channels c, token-MLP width D_S, channel-MLP width D_C.
MIXER_SIZES = {"S": (8, 512, 256, 2048), "B": (12, 768, 384, 3072), "L": (24, 1024, 512, 4096),
               "H": (32, 1280, 640, 5120)}  # fmt: skip
# ResMLP's Table 1 (and their code): blocks L and channels c; the channel MLP is 4c wide.
RESMLP_SIZES = {"S12": (12, 384), "S24": (24, 384), "S36": (36, 384), "B24": (24, 768)}
RESMLP_EXPANSION = 4
# RepMLPNet's code: channels, blocks and weight sets S of each of the four stages.
REPMLPNET_SIZES = {
    "T": ((64, 128, 256, 512), (2, 2, 6, 2), (1, 4, 16, 128)),
    "B": ((96, 192, 384, 768), (2, 2, 12, 2), (1, 4, 32, 128)),
    "D": ((80, 160, 320, 640), (2, 2, 18, 2), (1, 4, 16, 128)),
    "L": ((96, 192, 384, 768), (2, 2, 18, 2), (1, 4, 32, 256)),
}
REPMLPNET_KERNELS = (1, 3)  # the Local Perceptron's kernels in their models
GATE_REDUCTION = 4  # the Global Perceptron's c -> c/4 -> c
_PATCH_NAME = re.compile(r"(?P<family>Mixer|ResMLP|RepMLPNet)-(?P<size>[A-Z][0-9]*)/(?P<patch>[1-9][0-9]*)", re.ASCII)


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


class _Patches:
    """What a model that cuts its images into patches knows of them."""

    channels: int  # of the image
    side: int  # of the image
    patch: int

    @property
    def patch_features(self) -> int:
        return self.channels * self.patch * self.patch

    @property
    def in_features(self) -> int:
        """Pixels of an image, as an MLP's config gives them."""
        return self.channels * self.side * self.side


@dataclass(frozen=True)
class PatchConfig(_Patches):
    """Everything that fixes a Mixer's or a ResMLP's architecture (``token_hidden`` 0: ResMLP's
    single linear token-mixing layer)."""

    family: str  # "Mixer" or "ResMLP"
    size: str  # "B", "S12", ...
    patch: int
    depth: int
    width: int  # channels c of each token
    token_hidden: int  # D_S
    channel_hidden: int  # D_C
    channels: int  # of the image
    side: int  # of the image
    num_classes: int
    dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth: each block's residual branches dropped per example

    @property
    def name(self) -> str:
        return f"{self.family}-{self.size}/{self.patch}"

    @property
    def tokens(self) -> int:
        return (self.side // self.patch) ** 2


@dataclass(frozen=True)
class RepConfig(_Patches):
    """Everything that fixes a RepMLPNet's architecture, in its training form or (``deployed``)
    the merged one."""

    size: str  # "T", "B", "D" or "L"
    patch: int
    channels_per_stage: tuple[int, ...]
    blocks: tuple[int, ...]
    sharesets: tuple[int, ...]
    partitions: tuple[int, ...]  # the side h of each stage's partitions
    kernels: tuple[int, ...]  # the Local Perceptron's (odd) kernel sides; () = none
    channels: int  # of the image
    side: int  # of the image
    num_classes: int
    dropout: float = 0.0  # in each FFN, after its activation
    deployed: bool = False  # the merged form: the conv branches and the FC's BatchNorm in its weights

    family = "RepMLPNet"

    @property
    def name(self) -> str:
        return f"RepMLPNet-{self.size}/{self.patch}"

    @property
    def depth(self) -> int:
        return sum(self.blocks)

    @property
    def width(self) -> int:
        return self.channels_per_stage[-1]

    @property
    def stage_sides(self) -> tuple[int, ...]:
        return tuple(self.side // self.patch // 2**i for i in range(len(self.blocks)))


ModelConfig = MLPConfig | PatchConfig | RepConfig


def parse_name(name: str) -> tuple[str, int, int]:
    """``'B-12/Wi-1024'`` -> ``('B', 12, 1024)``, ``'Mixer-B/16'`` -> ``('Mixer', 12, 768)``
    (family, blocks, channels); raises ValueError on anything else."""
    patch = _PATCH_NAME.fullmatch(name) if isinstance(name, str) else None
    if patch:
        by_family: dict[str, dict[str, Any]] = {"Mixer": MIXER_SIZES, "ResMLP": RESMLP_SIZES,
                                                "RepMLPNet": REPMLPNET_SIZES}  # fmt: skip
        sizes = by_family[patch["family"]]
        if patch["size"] not in sizes or len(patch["patch"]) > 4:
            raise ValueError(f"unknown model {name!r}: {patch['family']} comes in sizes {', '.join(sizes)}")
        if patch["family"] == "RepMLPNet":
            channels, blocks, _ = sizes[patch["size"]]
            return "RepMLPNet", sum(blocks), channels[-1]
        return patch["family"], sizes[patch["size"]][0], sizes[patch["size"]][1]
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
    drop_path: float = 0.0,
    image: tuple[int, int] | None = None,
    partition: int | None = None,
    kernels: tuple[int, ...] | None = None,
) -> ModelConfig:
    """The config of a named model; options left as None take the family's paper default.
    ``image`` (channels, side) is what a patch family cuts into patches; ``partition`` and
    ``kernels`` are RepMLPNet's."""
    family, depth, width = parse_name(name)
    given: dict[str, Any] = dict(expansion=expansion, activation=activation, norm=norm, norm_position=norm_position,
                                 skip=skip)  # fmt: skip
    if family != "RepMLPNet" and (partition is not None or kernels not in (None, REPMLPNET_KERNELS)):
        raise ValueError(f"{name}: partition and local_kernels apply to RepMLPNet only")
    if family == "RepMLPNet":
        chosen = [k for k, v in given.items() if v is not None] + (["drop_path"] if drop_path else [])
        if chosen:
            raise ValueError(f"{name}: {', '.join(chosen)} apply to B- and S-MLPs (drop_path: Mixer, ResMLP) only")
        return _rep_config(name, num_classes, image, dropout, partition, kernels)
    if family in ("Mixer", "ResMLP"):
        chosen = [k for k, v in given.items() if v is not None]
        if chosen:
            raise ValueError(f"{name}: {', '.join(chosen)} apply to B- and S-MLPs only")
        return _patch_config(name, num_classes, image, dropout, drop_path)
    if drop_path:
        raise ValueError(f"{name}: drop_path (stochastic depth) applies to Mixer and ResMLP only")
    defaults: dict[str, Any] = {
        "B": dict(expansion=4, activation="gelu", norm="layernorm", norm_position="pre", skip=True),
        "S": dict(expansion=0, activation="relu", norm="layernorm", norm_position="pre", skip=False),
    }[family]
    options = {k: defaults[k] if v is None else v for k, v in given.items()}
    return MLPConfig(family, depth, width, in_features, num_classes, dropout=dropout, **options)


def _patch_config(
    name: str, num_classes: int, image: tuple[int, int] | None, dropout: float, drop_path: float
) -> PatchConfig:
    match = _PATCH_NAME.fullmatch(name)
    assert match is not None, f"{name} is not a patch model's name"
    family, size, patch = match["family"], match["size"], int(match["patch"])
    if image is None:
        raise ValueError(f"{name} cuts the image into patches: give its channels and side")
    channels, side = image
    if side % patch:
        raise ValueError(f"{name}: images of {side}x{side} do not divide into {patch}x{patch} patches")
    if family == "Mixer":
        depth, width, token_hidden, channel_hidden = MIXER_SIZES[size]
    else:
        (depth, width), token_hidden = RESMLP_SIZES[size], 0
        channel_hidden = RESMLP_EXPANSION * width
    return PatchConfig(family, size, patch, depth, width, token_hidden, channel_hidden, channels, side, num_classes,
                       dropout, drop_path)  # fmt: skip


def _rep_config(name: str, num_classes: int, image: tuple[int, int] | None, dropout: float, partition: int | None,
                kernels: tuple[int, ...] | None) -> RepConfig:  # fmt: skip
    match = _PATCH_NAME.fullmatch(name)
    assert match is not None, f"{name} is not a patch model's name"
    size, patch = match["size"], int(match["patch"])
    if image is None:
        raise ValueError(f"{name} cuts the image into patches: give its channels and side")
    channels, side = image
    stages = len(REPMLPNET_SIZES[size][1])
    if side % (patch * 2 ** (stages - 1)):
        divisor = patch * 2 ** (stages - 1)
        raise ValueError(f"{name}: its {stages} stages halve the patch map of {side}x{side} images {stages - 1} "
                         f"times; use a side divisible by {divisor} (resolution)")  # fmt: skip
    kernels = REPMLPNET_KERNELS if kernels is None else tuple(kernels)
    for k in kernels:
        check_kernel(k)
    if len(set(kernels)) < len(kernels):
        raise ValueError(f"{name}: local kernels {list(kernels)} list a side twice")
    sides = [side // patch // 2**i for i in range(stages)]
    if partition is not None and (partition < 1 or any(s % min(s, partition) for s in sides)):
        raise ValueError(f"{name}: partition {partition} must divide each stage's side ({', '.join(map(str, sides))}) "
                         "it is smaller than")  # fmt: skip
    partitions = tuple(s if partition is None else min(s, partition) for s in sides)
    width, blocks, sharesets = REPMLPNET_SIZES[size]
    return RepConfig(size, patch, width, blocks, sharesets, partitions, kernels, channels, side, num_classes, dropout)


def check_kernel(side: int) -> int:
    """A Local Perceptron kernel's side: odd, so that it is centred on its position."""
    if side < 1 or side % 2 == 0 or side > MAX_KERNEL:
        raise ValueError(f"a local kernel's side is odd, 1 to {MAX_KERNEL} (1, 3, 5, ...), got {side}")
    return side


MAX_KERNEL = 31


def deployed(cfg: RepConfig) -> RepConfig:
    """The merged (deployed) form of a RepMLPNet."""
    return dataclasses.replace(cfg, deployed=True)


def _rep_stages(cfg: RepConfig) -> list[tuple[int, int, int, int, int]]:
    """Each stage's (channels c, blocks, sets S, partition side h, positions H*W)."""
    stages = zip(cfg.channels_per_stage, cfg.blocks, cfg.sharesets, cfg.partitions, cfg.stage_sides, strict=True)
    return [(c, n, s, h, side * side) for c, n, s, h, side in stages]


def _rep_params(cfg: RepConfig) -> int:
    """A RepMLPNet's trainable parameters (BatchNorm's weight and bias; not its running statistics)."""
    widths = cfg.channels_per_stage
    total = cfg.patch_features * widths[0] + 2 * widths[0]  # embedding, its BN
    total += sum(4 * a * b + 2 * b for a, b in zip(widths, widths[1:], strict=False))  # 2x2 merges, their BN
    for c, n, sets, h, _ in _rep_stages(cfg):
        gate = c * (c // GATE_REDUCTION) + c // GATE_REDUCTION + (c // GATE_REDUCTION) * c + c
        partition = sets * (h * h) ** 2
        if cfg.deployed:
            partition += sets * h * h  # the merged bias
        else:
            partition += 2 * sets + sum(sets * k * k + 2 * sets for k in cfg.kernels)  # its BN, the conv branches
        ffn = c * 4 * c + 2 * 4 * c + 4 * c * c + 2 * c
        total += n * (4 * c + gate + partition + ffn)  # the two pre-BNs, ...
    return total + 2 * cfg.width + cfg.width * cfg.num_classes + cfg.num_classes  # head BN, head


def _rep_flops(cfg: RepConfig, norms: bool = True) -> int:
    """A RepMLPNet's forward FLOPs, fvcore's count in evaluation: multiply-adds, and with ``norms``
    2 per element of a BatchNorm and 1 per element of a mean pool (adaptive_avg_pool2d); the
    gate's product and sigmoid, activations and residual adds nothing."""
    per_norm, per_pool = (2, 1) if norms else (0, 0)
    widths, sides = cfg.channels_per_stage, cfg.stage_sides
    total = sides[0] ** 2 * (cfg.patch_features * widths[0] + per_norm * widths[0])
    total += sum(s * s * (4 * a * b + per_norm * b) for a, b, s in zip(widths, widths[1:], sides[1:], strict=False))
    for c, n, _, h, hw in _rep_stages(cfg):
        gate = per_pool * hw * c + 2 * c * (c // GATE_REDUCTION)  # pool, two 1x1 layers on one position
        partition = c * hw * h * h  # each channel's positions through its set's (h*h)^2 FC, per partition
        if not cfg.deployed:
            partition += per_norm * c * hw + sum(c * hw * k * k + per_norm * c * hw for k in cfg.kernels)
        ffn = hw * 8 * c * c + per_norm * hw * (4 * c + c)
        total += n * (2 * per_norm * c * hw + gate + partition + ffn)
    last = cfg.width * sides[-1] ** 2
    return total + (per_norm + per_pool) * last + cfg.width * cfg.num_classes


def multiply_adds(cfg: RepConfig) -> int:
    """A RepMLPNet's multiply-adds per forward (its FLOPs without the BatchNorms and pools), what
    ``torch.utils.flop_counter`` counts (at 2 each) and what RepMLPNet's paper reports: its
    deployed form's, every BatchNorm folded into the layer before it."""
    return _rep_flops(cfg, norms=False)


def _rep_hidden_elements(cfg: RepConfig) -> int:
    """Elements one example's RepMLPNet forward writes (each layer's and norm's output)."""
    total = 2 * cfg.channels_per_stage[0] * cfg.stage_sides[0] ** 2
    for c, n, _, _, hw in _rep_stages(cfg):
        total += n * c * hw * (7 + 2 * len(cfg.kernels) + 3 * 4 + 2)
    return total


def _block_linears(cfg: MLPConfig) -> list[tuple[int, int]]:
    m = cfg.width
    if cfg.expansion == 0:
        return [(m, m)]
    return [(m, cfg.expansion * m), (cfg.expansion * m, m)]


def _norm_params(cfg: MLPConfig) -> int:
    return 0 if cfg.norm == "none" else 2 * cfg.width


def _patch_linears(cfg: PatchConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """A block's linear layers (in, out), those applied to each token's channels and those
    applied to each channel's tokens."""
    c, s = cfg.width, cfg.tokens
    per_token = [(c, cfg.channel_hidden), (cfg.channel_hidden, c)]
    per_channel = [(s, cfg.token_hidden), (cfg.token_hidden, s)] if cfg.token_hidden else [(s, s)]
    return per_token, per_channel


def count_params(cfg: ModelConfig) -> int:
    """Trainable parameters, computed without building the model."""
    if isinstance(cfg, RepConfig):
        return _rep_params(cfg)
    if isinstance(cfg, PatchConfig):
        per_token, per_channel = _patch_linears(cfg)
        block = sum(i * o + o for i, o in per_token + per_channel) + 4 * cfg.width  # two norms (or Aff)
        if cfg.family == "ResMLP":
            block += 2 * cfg.width  # LayerScale
        embed, head = cfg.patch_features * cfg.width + cfg.width, cfg.width * cfg.num_classes + cfg.num_classes
        return embed + cfg.depth * block + 2 * cfg.width + head
    linears = [(cfg.in_features, cfg.width), (cfg.width, cfg.num_classes)]
    linears += _block_linears(cfg) * cfg.depth
    weights = sum(i * o + o for i, o in linears)
    return weights + cfg.depth * _norm_params(cfg)


def forward_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs for one example, fvcore's convention (a multiply-add is one FLOP)."""
    if isinstance(cfg, RepConfig):
        return _rep_flops(cfg)
    if isinstance(cfg, PatchConfig):
        per_token, per_channel = _patch_linears(cfg)
        c, s = cfg.width, cfg.tokens
        block = s * sum(i * o for i, o in per_token) + c * sum(i * o for i, o in per_channel)
        norms = 2 * cfg.depth + 1 if cfg.family == "Mixer" else 0  # LayerNorms; Aff is elementwise
        return s * cfg.patch_features * c + cfg.depth * block + norms * 5 * s * c + c * cfg.num_classes
    macs = cfg.in_features * cfg.width + cfg.width * cfg.num_classes
    macs += cfg.depth * sum(i * o for i, o in _block_linears(cfg))
    per_element = {"layernorm": 5, "batchnorm": 2, "none": 0}[cfg.norm]
    return macs + cfg.depth * per_element * cfg.width


def hidden_elements(cfg: ModelConfig) -> int:
    """Elements one example's forward pass writes between input and logits, layer by layer (each
    linear layer's output, each norm's, each activation's): what a backward pass keeps."""
    if isinstance(cfg, RepConfig):
        return _rep_hidden_elements(cfg)
    if isinstance(cfg, PatchConfig):
        per_token, per_channel = _patch_linears(cfg)
        c, s = cfg.width, cfg.tokens
        block = s * sum(2 * o for _, o in per_token) + c * sum(2 * o for _, o in per_channel) + 2 * s * c
        return s * c + cfg.depth * block
    norm = 0 if cfg.norm == "none" else cfg.width
    return cfg.width + cfg.depth * (sum(2 * o for _, o in _block_linears(cfg)) + norm)


def compute(flops_per_forward: int, examples: int, epochs: int) -> float:
    """Training compute C = FLOP(f) x 3 x N x T (forward plus a backward of twice its cost)."""
    return float(flops_per_forward) * 3 * examples * epochs


def hardware_training_flops(cfg: ModelConfig, images: int) -> float:
    """FLOPs the hardware executes to train on ``images`` examples (two per multiply-add)."""
    return HARDWARE_FLOPS_PER_MAC * compute(forward_flops(cfg), images, 1)
