"""Grid files: YAML in, validated :class:`Trial` list out.

A grid file has the sections ``name``, ``description``, ``metric``, ``data``, ``run``,
``base``, ``grid`` and ``zip``; docs/grid-files.md is their reference. Its
tables of fields are made by :func:`reference` from the metadata of :class:`TrialConfig` and
:class:`RunOptions`, which are also the one source of the checks, the messages and the trial
ids. :func:`parse` reads one section at a time and reports every mistake with the file, the
field's path and what is allowed, before anything runs.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlpgrid import data
from mlpgrid.data.files import regular_file
from mlpgrid.grid import metrics
from mlpgrid.models import architecture

OPTIMIZERS = ("lion", "adamw", "sgd")
# Tensors of state each optimizer keeps per weight (momentum; AdamW also its second moment).
OPTIMIZER_STATE_SLOTS = {"lion": 1, "adamw": 2, "sgd": 1}
SCHEDULES = ("cosine", "constant", "wsd")
COOLDOWN_SHAPES = ("1-sqrt", "linear")


def _opt(help: str, **checks: Any) -> dict:
    return dict(help=help, **checks)


@dataclass(frozen=True)
class TrialConfig:
    """Everything that determines a trial's result. A trial is a pure function of this."""

    model: str = field(metadata=_opt("model name, " + architecture.NAME_FORMAT, parse=architecture.parse_name))
    epochs: int = field(metadata=_opt("epochs T", min=1))
    dataset: str = field(
        default="fashion-mnist",
        metadata=_opt(f"dataset: one of {', '.join(data.DATASETS)} or a prepared dataset's name", parse=data.info),
    )
    examples: int | None = field(
        default=None, metadata=_opt("examples N (class-proportional subset); null = all", min=1)
    )
    batch_size: int = field(default=256, metadata=_opt("batch size", min=1))
    optimizer: str = field(default="lion", metadata=_opt("optimizer", choices=OPTIMIZERS))
    lr: float = field(default=1e-4, metadata=_opt("peak learning rate", gt=0))
    weight_decay: float = field(
        default=0.0, metadata=_opt("weight decay (decoupled for Lion and AdamW, L2 for SGD)", min=0)
    )
    momentum: float = field(default=0.9, metadata=_opt("SGD momentum", min=0, lt=1))
    label_smoothing: float = field(default=0.0, metadata=_opt("label smoothing", min=0, lt=1))
    mixup: float = field(default=0.0, metadata=_opt("MixUp Beta(alpha, alpha) strength; 0 = off", min=0))
    flip: bool = field(default=False, metadata=_opt("random horizontal flips"))
    crop_padding: int = field(
        default=0, metadata=_opt("random crops from images padded by this many pixels; 0 = off", min=0)
    )
    clip_grad: float = field(default=0.0, metadata=_opt("gradient norm clipping; 0 = off", min=0))
    warmup_epochs: float = field(default=0.0, metadata=_opt("linear warm-up length in epochs", min=0))
    schedule: str = field(
        default="cosine",
        metadata=_opt(
            "learning-rate decay after warm-up; wsd: constant, then a cooldown to 0 over the last `cooldown` "
            "of T (trials of one wsd run that differ only in T train it once: see Trunks)",
            choices=SCHEDULES,
        ),
    )
    cooldown: float = field(default=0.2, metadata=_opt("wsd: the cooldown's share of T", gt=0, lt=1))
    cooldown_shape: str = field(
        default="1-sqrt", metadata=_opt("wsd: how the cooldown falls to 0", choices=COOLDOWN_SHAPES)
    )
    seed: int = field(default=0, metadata=_opt("seed of the subset, initialisation, order and augmentation", min=0))
    resolution: int | None = field(default=None, metadata=_opt("image side in pixels; null = the dataset's", min=1))
    channels: int | None = field(default=None, metadata=_opt("image channels; null = the dataset's", choices=(1, 3)))
    expansion: int | None = field(
        default=None, metadata=_opt("block expansion k (0 = one m->m layer); null = family default", min=0)
    )
    activation: str | None = field(
        default=None, metadata=_opt("activation; null = family default", choices=architecture.ACTIVATIONS)
    )
    norm: str | None = field(
        default=None, metadata=_opt("normalisation; null = family default", choices=architecture.NORMS)
    )
    norm_position: str | None = field(
        default=None,
        metadata=_opt("norm before or after the block; null = family default", choices=architecture.NORM_POSITIONS),
    )
    skip: bool | None = field(
        default=None, metadata=_opt("residual connection around each block; null = family default")
    )
    dropout: float = field(
        default=0.0, metadata=_opt("dropout in B-MLP blocks and RepMLPNet's FFNs (after the activation)", min=0, lt=1)
    )
    drop_path: float = field(
        default=0.0,
        metadata=_opt("stochastic depth of Mixer and ResMLP: each block's residual branches dropped per "
                      "example with this probability", min=0, lt=1),
    )  # fmt: skip
    partition: int | None = field(
        default=None,
        metadata=_opt("RepMLPNet: the side of its partitions, at most (each stage's whole map where smaller); "
                      "null = each stage's whole map, as in its paper", min=1),
    )  # fmt: skip
    local_kernels: tuple[int, ...] = field(
        default=architecture.REPMLPNET_KERNELS,
        metadata=_opt("RepMLPNet: the kernel sides of its Local Perceptron's conv branches, merged into its FCs "
                      "after training (a list of odd numbers; [] = none)", parse=architecture.check_kernel),
    )  # fmt: skip
    # Stages after pre-training. Compute C counts pre-training only; these record their own.
    probe_datasets: tuple[str, ...] = field(
        default=(), metadata=_opt("datasets to linear-probe the trained body on (a list)", parse=data.info)
    )
    probe_epochs: int = field(default=50, metadata=_opt("linear-probe epochs (Lion on frozen features)", min=1))
    probe_lr: float = field(default=1e-5, metadata=_opt("linear-probe learning rate", gt=0))
    probe_examples: int | None = field(
        default=None, metadata=_opt("at most this many probe training examples; null = all", min=1)
    )
    finetune_datasets: tuple[str, ...] = field(
        default=(), metadata=_opt("datasets to fine-tune the trained model on (a list)", parse=data.info)
    )
    finetune_epochs: int = field(default=50, metadata=_opt("fine-tuning epochs (SGD with momentum)", min=1))
    finetune_lr_head: float = field(default=0.01, metadata=_opt("fine-tuning learning rate of the new head", gt=0))
    finetune_lr_body: float = field(default=0.001, metadata=_opt("fine-tuning learning rate of the body", gt=0))
    tta: int = field(
        default=0, metadata=_opt("test-time augmentation: average the logits of K random crops; 0 = off", min=0)
    )

    @property
    def dataset_info(self) -> data.DatasetInfo:
        return data.info(self.dataset)

    @property
    def datasets(self) -> tuple[str, ...]:
        """Every dataset the trial reads: pre-training's first, then the stages'."""
        return tuple(dict.fromkeys((self.dataset, *self.probe_datasets, *self.finetune_datasets)))

    @property
    def probes_itself(self) -> bool:
        """Whether a linear probe runs on the pre-training dataset; its ``probe_examples`` are then
        held out of pre-training (see :func:`mlpgrid.data.subset.split_off`)."""
        return self.dataset in self.probe_datasets

    @property
    def pool_size(self) -> int:
        """Training images pre-training may draw from."""
        return self.dataset_info.train_size - (self.probe_examples or 0 if self.probes_itself else 0)

    @property
    def num_examples(self) -> int:
        return self.examples or self.pool_size

    @property
    def steps_per_epoch(self) -> int:
        """Every example once, the last batch possibly smaller."""
        return -(-self.num_examples // self.batch_size)

    def cooldown_start(self, steps_per_epoch: int | None = None) -> int:
        """The step a wsd trial's cooldown starts at: its last ``cooldown`` of steps, after warm-up."""
        per_epoch = steps_per_epoch or self.steps_per_epoch
        total = self.epochs * per_epoch
        warmup = min(round(self.warmup_epochs * per_epoch), total)
        return max(warmup, min(total - 1, total - round(self.cooldown * total)))

    def model_config(self) -> architecture.ModelConfig:
        ds = self.dataset_info
        side = self.resolution or ds.resolution
        channels = self.channels or ds.channels
        return architecture.config_for(
            self.model,
            in_features=channels * side * side,
            num_classes=ds.num_classes,
            expansion=self.expansion,
            activation=self.activation,
            norm=self.norm,
            norm_position=self.norm_position,
            skip=self.skip,
            dropout=self.dropout,
            drop_path=self.drop_path,
            image=(channels, side),
            partition=self.partition,
            kernels=self.local_kernels,
        )


FIELDS = {f.name: f for f in dataclasses.fields(TrialConfig)}
# The stages after pre-training: they read the pre-trained model and change nothing of it
# (see :func:`pretraining_id`).
STAGE_FIELDS = ("probe_datasets", "probe_epochs", "probe_lr", "probe_examples", "finetune_datasets",
                "finetune_epochs", "finetune_lr_head", "finetune_lr_body", "tta")  # fmt: skip
_TYPES = typing.get_type_hints(TrialConfig)
_REQUIRED = [f.name for f in FIELDS.values() if f.default is dataclasses.MISSING]


@dataclass(frozen=True)
class RunOptions:
    """How trials run; none of it changes a trial's result, so none of it is in its id."""

    checkpoint_every_steps: int = field(
        default=0,
        metadata=_opt(
            "a checkpoint every this many steps, always written, besides each epoch's end (skipped while it "
            "would cost over 1% of training); 0 = epoch ends only"
        ),  # fmt: skip
    )
    evaluate_every: int = field(
        default=1,
        metadata=_opt(
            "evaluate on the test split every this many epochs and after the last (test_loss, test_error); "
            "a test split of 522,500 images takes longer than training on 100k each epoch"
        ),  # fmt: skip
    )
    data_budget_gb: float | None = field(
        default=None,
        metadata=_opt(
            "keep at most this many GiB of images on the device, stream the rest; auto = what 90% "
            "of the trial's share of GPU memory spares beside its model's measured memory, 8 on a CPU"
        ),  # fmt: skip
    )
    gpus_per_trial: float | None = field(
        default=None,
        metadata=_opt(
            "share of a GPU per trial (0.5: two per GPU), or a whole number k > 1: k data-parallel workers of a "
            "GPU each (as `workers: k`); auto = by the step's size"
        ),
    )
    workers: int | None = field(
        default=None,
        metadata=_opt(
            "data-parallel workers per trial (Ray Train, DDP; a GPU each, or --cpus-per-trial cores without GPUs); "
            "a trial keeps its result to float rounding; auto = 1, more for a trial that alone on one GPU would "
            "outlast the rest of the grid on the others (up to 8)"
        ),  # fmt: skip
    )
    ray_train: bool | None = field(
        default=None,
        metadata=_opt(
            "train every trial through a Ray Train TorchTrainer (one worker unless data-parallel); auto = only "
            "data-parallel trials, the rest in Ray actors reused from trial to trial, which start faster"
        ),
    )
    compile: bool | None = field(
        default=None,
        metadata=_opt(
            "torch.compile the model and the augmentation; "
            "auto = on GPU, the model from 2e16 FLOPs, the augmentation with it or from 4M images"
        ),
    )
    group: int | None = field(
        default=None,
        metadata=_opt(
            "at most this many trials trained together by one worker; auto = up to 16 where it pays "
            '(see "Trial groups"), off = 1'
        ),  # fmt: skip
    )
    fuse: bool | None = field(
        default=None,
        metadata=_opt(
            "step a group's members fused; auto = on a GPU where a member's step is under 1 "
            "TFLOP, one after another otherwise"
        ),  # fmt: skip
    )
    max_trials: int = field(
        default=100_000, metadata=_opt("refuse a grid of more trials than this (a typo in an axis); raise it at will")
    )


@dataclass(frozen=True)
class Trial:
    id: str
    config: TrialConfig

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @property
    def pretraining_id(self) -> str:
        return pretraining_id(self.config)

    @property
    def params(self) -> int:
        return architecture.count_params(self.config.model_config())

    @property
    def forward_flops(self) -> int:
        return architecture.forward_flops(self.config.model_config())

    @property
    def compute(self) -> float:
        return architecture.compute(self.forward_flops, self.config.num_examples, self.config.epochs)

    @property
    def deployed_sizes(self) -> dict[str, int]:
        """A RepMLPNet's ``deployed_params`` and ``deployed_forward_flops``: its merged form's, which
        it is evaluated as after training (its compute C counts the training form's); none for a
        model without a merged form."""
        model = self.config.model_config()
        if not isinstance(model, architecture.RepConfig):
            return {}
        merged = architecture.deployed(model)
        return {"deployed_params": architecture.count_params(merged),
                "deployed_forward_flops": architecture.forward_flops(merged)}  # fmt: skip

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes of one of its checkpoints: fp32 weights and the optimizer's state (one slot a
        weight for Lion and SGD, two for AdamW)."""
        return self.final_weights_bytes * (1 + OPTIMIZER_STATE_SLOTS[self.config.optimizer])

    @property
    def final_weights_bytes(self) -> int:
        """Bytes of what it keeps once finished: its fp32 weights, without optimizer state."""
        return 4 * self.params

    @property
    def step_flops(self) -> float:
        """Hardware FLOPs of one training step (a full batch)."""
        return architecture.hardware_training_flops(self.config.model_config(), self.config.batch_size)


@dataclass(frozen=True)
class GridSpec:
    name: str
    path: Path
    data_roots: dict[str, str]
    run: RunOptions
    trials: list[Trial]
    metric: str = metrics.TEST_ERROR  # the error the frontier uses

    def data_root(self, dataset: str) -> Path:
        """Where ``dataset`` is read from: the grid's ``data`` entry, else its env var or default;
        absolute, as the paths a worker is given must be (Ray Tune runs each trial in a folder of
        its own)."""
        return data.info(dataset).root(self.data_roots.get(dataset)).absolute()

    @functools.cached_property
    def labels(self) -> dict[str, str]:
        """Each trial's name for people, by id (see :func:`trial_labels`)."""
        return trial_labels(self.trials)

    def trial(self, trial_id: str) -> Trial:
        matches = [t for t in self.trials if t.id.startswith(trial_id)]
        if len(matches) != 1:
            known = ", ".join(t.id for t in self.trials[:10])
            problem = "no trial" if not matches else f"{len(matches)} trials"
            raise SpecError(
                f"{self.path}: {problem} with id {trial_id!r} (ids: {known}{', ...' if len(self.trials) > 10 else ''})"
            )
        return matches[0]


def _compact(n: int) -> str:
    """10000 -> 10k, 1281167 -> 1.28M: three significant digits."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def _label_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "+".join(map(str, value)) or "none"
    return str(value)


# Settings shown in every trial's label when at most this many vary; beyond (an ablation grid),
# a label shows only where its trial departs from the grid's most common value.
LABEL_FIELDS = 3


def varying_settings(trials: typing.Sequence[Trial]) -> list[str]:
    """The settings besides model, N and T that differ among ``trials``, in :data:`FIELDS` order."""
    return [name for name in FIELDS if name not in ("model", "examples", "epochs")
            and len({getattr(t.config, name) for t in trials}) > 1]  # fmt: skip


def trial_labels(trials: typing.Sequence[Trial]) -> dict[str, str]:
    """Each trial's name for people, by id: its model, N and T, then the other settings that vary
    among ``trials`` (``B-6/Wi-256 N=1.28M T=50 lr=1e-05``), so no two trials of a grid read
    alike. N is shown in three digits (``1.28M``) unless that makes two sizes of the grid alike."""
    sizes = {t.config.num_examples for t in trials}
    compact = len({_compact(n) for n in sizes}) == len(sizes)
    varying = {name: collections.Counter(getattr(t.config, name) for t in trials).most_common(1)[0][0]
               for name in varying_settings(trials)}  # fmt: skip
    labels = {}
    for t in trials:
        n = t.config.num_examples
        words = [t.config.model, f"N={_compact(n) if compact else n}", f"T={t.config.epochs}"]
        for name, usual in varying.items():
            value = getattr(t.config, name)
            if len(varying) <= LABEL_FIELDS or value != usual:
                words.append(f"{name}={_label_value(value)}")
        labels[t.id] = " ".join(words)
    return labels


class SpecError(ValueError):
    """A grid file that cannot run; the message names the file, the field and what is allowed."""


def trial_id(config: TrialConfig) -> str:
    """A stable id: a hash of the settings that differ from their defaults.

    Leaving defaults out keeps ids stable when a new option (with a default that keeps the
    old behaviour) is added. Defaults must therefore never change meaning.
    """
    settings = {
        f.name: getattr(config, f.name)
        for f in FIELDS.values()
        if f.default is dataclasses.MISSING or getattr(config, f.name) != f.default
    }
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def pretraining_id(config: TrialConfig) -> str:
    """The id of the trial's pre-training: its id with the stages after pre-training left out.

    Trials that differ only in their stages (a probe or fine-tune dataset added to finished
    trials, another probe learning rate) pre-train the same model: one trains it, the others
    start from its final checkpoint. A probe of the pre-training dataset is kept in: the
    examples it holds out are not pre-trained on.
    """
    held_out: dict[str, Any] = {"probe_datasets": (config.dataset,), "probe_examples": config.probe_examples}
    bare: dict[str, Any] = {f: FIELDS[f].default for f in STAGE_FIELDS}
    return trial_id(dataclasses.replace(config, **(bare | (held_out if config.probes_itself else {}))))


# --- YAML ------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-4`` as a number (YAML 1.1 wants ``1.0e-4``), and refuses
    a document that expands to more than :data:`MAX_VALUES` values: an alias repeats a whole
    subtree, so a few lines can stand for billions of values ("billion laughs")."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:  # values once aliases are expanded, each node counted once
            if id(n) not in sizes:
                sizes[id(n)] = 0  # a node that contains itself counts as one value
                children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else (
                    n.value if isinstance(n, yaml.SequenceNode) else [])  # fmt: skip
                sizes[id(n)] = min(MAX_VALUES + 1, 1 + sum(size(c) for c in children))
            return sizes[id(n)]

        if node is not None and size(node) > MAX_VALUES:
            raise yaml.composer.ComposerError(None, None, f"expands to more than {MAX_VALUES:,} values "
                                              "(aliases repeating aliases)", node.start_mark)  # fmt: skip
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping, refused where a key appears twice: YAML would keep the last silently."""
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping (the first at line "
                    f"{seen[key].start_mark.line + 1}); set it once", key_node.start_mark)  # fmt: skip
            if isinstance(key, typing.Hashable):
                seen[key] = key_node
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# --- validation ------------------------------------------------------------------------


def _allowed_values(name: str) -> str:
    meta = FIELDS[name].metadata
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    return meta["help"]


def _is_list_field(name: str) -> bool:
    return typing.get_origin(_TYPES[name]) is tuple


def _check_value(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``name``, or None."""
    meta = FIELDS[name].metadata
    if _is_list_field(name):
        item = typing.get_args(_TYPES[name])[0]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            return f"expected a list of {'names' if item is str else 'whole numbers'}, got {value!r} ({meta['help']})"
        for v in value:
            try:
                meta["parse"](v)
            except ValueError as e:
                return str(e)
        return None if len(set(value)) == len(value) else f"{value!r} lists a value twice"
    kinds = [t for t in typing.get_args(_TYPES[name]) or (_TYPES[name],) if t is not type(None)]
    if value is None:
        return None if type(None) in typing.get_args(_TYPES[name]) else f"must be set ({meta['help']})"
    kind = kinds[0]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        return f"expected {kind.__name__}, got {type(value).__name__} {value!r} ({meta['help']})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r} ({meta['help']})"
    if isinstance(value, int) and abs(value) > MAX_INT:
        return f"must be at most {MAX_INT:.0e} in size, got a number of {len(str(abs(value)))} digits"
    if "choices" in meta and value not in meta["choices"]:
        return f"unknown {name} {value!r}; allowed: {', '.join(map(str, meta['choices']))}"
    if "parse" in meta:
        try:
            meta["parse"](value)
        except ValueError as e:
            return str(e)
    for bound, ok, text in (
        ("min", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if bound in meta and not ok(value, meta[bound]):
            return f"must be {text} {meta[bound]}, got {value!r} ({meta['help']})"
    return None


def _normalise(name: str, value: Any) -> Any:
    """Whole numbers given for float fields become floats, so ``lr: 1`` and ``lr: 1.0`` are one trial."""
    if _TYPES[name] is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if _is_list_field(name):
        return tuple(value)
    return value


# Names people reach for that difflib would not match to ours.
_ALIASES = {
    "learning_rate": "lr", "n": "examples", "num_examples": "examples", "t": "epochs", "bs": "batch_size",
    "wd": "weight_decay", "optim": "optimizer", "ls": "label_smoothing", "width": "model", "depth": "model",
}  # fmt: skip


def _unknown_key(key: Any, allowed: list[str]) -> str:
    alias = _ALIASES.get(str(key).lower())
    guess = [alias] if alias in allowed else difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return f"unknown field {key!r}; {hint}allowed: {', '.join(allowed)}"


class _Errors:
    def __init__(self, path: Path):
        self.path = path
        self.items: dict[str, None] = {}  # in the order found, each once

    def add(self, where: str, problem: str) -> None:
        """Record a problem once, however many trials share the value that causes it."""
        self.items[f"{self.path}: {where}: {problem}"] = None

    def raise_if_any(self) -> None:
        if self.items:
            raise SpecError("\n".join(self.items))


def _axis_values(section: str, raw: Any, errors: _Errors) -> dict[str, list[tuple[str, Any]]]:
    """``{field: [(path, value), ...]}`` for a ``grid`` or ``zip`` group, values checked."""
    axes: dict[str, list[tuple[str, Any]]] = {}
    if not isinstance(raw, dict):
        errors.add(section, f"expected a mapping of field: [values], got {type(raw).__name__}")
        return axes
    for key, values in raw.items():
        where = f"{section}.{key}"
        if key not in FIELDS:
            errors.add(where, _unknown_key(key, list(FIELDS)))
            continue
        if not isinstance(values, list):
            errors.add(where, f"an axis is a list of values, got {values!r}")
            continue
        if not values:
            errors.add(where, "empty axis: give at least one value")
            continue
        axes[key] = [(f"{where}[{i}]", v) for i, v in enumerate(values)]
        for path, v in axes[key]:
            if problem := _check_value(key, v):
                errors.add(path, problem)
    return axes


def _expand(base: dict, grid: dict, zips: list[dict]) -> list[dict[str, tuple[str, Any]]]:
    """Cartesian product of the grid axes and the zip groups, each value with its path."""
    factors = [[{key: v} for v in vals] for key, vals in grid.items()]
    for group in zips:
        factors.append([dict(zip(group, combo, strict=True)) for combo in zip(*group.values(), strict=True)])
    settings = []
    for combo in itertools.product(*factors):
        merged = dict(base)
        for part in combo:
            merged.update(part)
        settings.append(merged)
    return settings


# --- sections ----------------------------------------------------------------------------

_TOP_KEYS = ("name", "description", "metric", "data", "run", "base", "grid", "zip")
RESERVED_NAMES = ("mlflow.db", "mlflow.lock", "mlartifacts", "ray", "data-checks")  # see mlpgrid.grid.layout
MAX_INT = 10**12  # larger whole numbers are typos (a model width of 200 digits)
MAX_VALUES = 10**6  # values in a grid file once its YAML aliases are expanded
MAX_DEPTH = 100  # [ and { nested in a grid file
MAX_FILE_BYTES = 2**20


def _flow_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest in ``text``, quoted strings and comments left out."""
    depth = deepest = 0
    for char in re.sub(r"'[^']*'|\"(?:[^\"\\]|\\.)*\"|#[^\n]*", "", text):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _document(text: str, path: Path) -> dict:
    """The file's YAML as a mapping; malformed YAML is named by line and column."""
    if _flow_depth(text) > MAX_DEPTH:  # PyYAML takes seconds on deep [[[...]]] before it fails
        raise SpecError(f"{path}: nested more than {MAX_DEPTH} deep, not a grid file")
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a grid file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise SpecError(f"{path}: {where}: malformed YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: a grid file is a mapping with keys name, data, run, base, grid, zip")
    return doc


def _name_section(doc: dict, path: Path, errors: _Errors) -> str:
    for key in doc:
        if key not in _TOP_KEYS:
            errors.add(str(key), _unknown_key(key, list(_TOP_KEYS)))
    name = doc.get("name", path.stem)
    # The name is a directory under storage and an MLflow experiment: one path component,
    # not hidden or a parent, not a file mlpgrid keeps there, short enough for any filesystem.
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", name, re.ASCII):
        errors.add("name", f"expected up to 100 letters, digits, '.', '_' or '-', not starting with '.', got "
                   f"{str(name)[:120]!r}")  # fmt: skip
    elif name in RESERVED_NAMES:
        errors.add("name", f"{name!r} is a file mlpgrid keeps in storage ({', '.join(RESERVED_NAMES)}); choose another")
    return name


@dataclass(frozen=True)
class _DataEntry:
    """One entry of the ``data`` section: where a dataset lives and, for one not prepared yet,
    what the file declares about it."""

    name: str
    where: str  # the field's path, for messages
    root: str
    declared: dict[str, int] | None  # None: a directory to read as it is


def _data_section(raw: Any, path: Path, errors: _Errors) -> list[_DataEntry]:
    """The entries of ``data``, their form checked.

    An entry is a directory (a built-in dataset's files, or a prepared dataset), or a mapping
    ``{path, classes, train, test, resolution[, channels]}`` for a dataset to be prepared there.
    """
    if not isinstance(raw, dict):
        errors.add("data", "expected a mapping of dataset name: directory")
        return []
    entries = []
    for ds, entry in raw.items():
        where = f"data.{ds}"
        facts = entry if isinstance(entry, dict) else {"path": entry}
        if not isinstance(facts.get("path"), str) or not facts["path"] or "\0" in facts["path"]:
            errors.add(where, f"expected a directory path (or a mapping with path), got {entry!r}")
            continue
        numbers = {k: v for k, v in facts.items() if k != "path"}
        unknown = [k for k in numbers if k not in data.DECLARED_FACTS]
        bad = [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if unknown or bad:
            errors.add(where, _unknown_key(unknown[0], ["path", *data.DECLARED_FACTS]) if unknown
                       else f"{bad[0]} must be a whole number, got {numbers[bad[0]]!r}")  # fmt: skip
            continue
        try:
            root = str((path.parent / facts["path"]).resolve())
        except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError on Python 3.11)
            errors.add(where, f"{facts['path']}: cannot be resolved ({e})")
            continue
        entries.append(_DataEntry(ds, where, root, numbers if isinstance(entry, dict) else None))
    return entries


def _use_datasets(entries: list[_DataEntry], errors: _Errors) -> dict[str, str]:
    """Make each dataset of ``data`` known to :mod:`mlpgrid.data` (a prepared one from its manifest,
    a declared one from what the file says, checked against its manifest once prepared), so
    that the trials can be checked against its size; returns ``{dataset: directory}``."""
    roots = {}
    for entry in entries:
        try:
            if entry.name in data.DATASETS:
                pass  # a built-in dataset's own files
            elif entry.declared is not None:
                missing = [k for k in ("classes", "train", "test", "resolution") if k not in entry.declared]
                if missing:
                    raise ValueError(f"declaring a dataset needs {', '.join(missing)} too")
                data.declare(entry.name, entry.root, entry.declared)
            else:  # a prepared dataset: its manifest says what the trials need to know
                data.register(entry.name, entry.root)
        except (OSError, ValueError) as e:
            errors.add(entry.where, f"{e} (or a built-in dataset: {', '.join(data.DATASETS)})")
            continue
        roots[entry.name] = entry.root
    return roots


def _run_section(raw: Any, errors: _Errors) -> RunOptions:
    if not isinstance(raw, dict):
        errors.add("run", "expected a mapping")
        return RunOptions()
    run_fields = [f.name for f in dataclasses.fields(RunOptions)]
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in run_fields:
            errors.add(f"run.{key}", _unknown_key(key, run_fields))
        elif (problem := run_option_problem(key, value)) is not None:
            errors.add(f"run.{key}", f"{problem}, got {value!r}")
        elif value != "auto":
            options[key] = 1 if key == "group" and value in ("off", False) else value  # YAML reads off as false
    return RunOptions(**options)


def _base_section(raw: Any, errors: _Errors) -> dict[str, tuple[str, Any]]:
    """``{field: (path, value)}`` of ``base``, values checked."""
    if not isinstance(raw, dict):
        errors.add("base", f"expected a mapping of field: value, got {type(raw).__name__}")
        return {}
    base = {}
    for key, value in raw.items():
        if key not in FIELDS:
            errors.add(f"base.{key}", _unknown_key(key, list(FIELDS)))
            continue
        base[key] = (f"base.{key}", value)
        if isinstance(value, list) and not _is_list_field(key):
            errors.add(f"base.{key}", "base holds single values; put lists under grid or zip")
        elif problem := _check_value(key, value):
            errors.add(f"base.{key}", problem)
    return base


def _zip_section(raw: Any, errors: _Errors) -> list[tuple[str, dict[str, list[tuple[str, Any]]]]]:
    """``zip`` as ``[(section path, axes)]``: one group, or a list of groups of equal-length axes."""
    groups = raw if isinstance(raw, list) else [raw]
    zips = []
    for i, group in enumerate(groups):
        section = "zip" if isinstance(raw, dict) else f"zip[{i}]"
        axes = _axis_values(section, group, errors)
        lengths = {k: len(v) for k, v in axes.items()}
        if len(set(lengths.values())) > 1:
            errors.add(section, f"zipped axes need equal lengths, got {lengths}")
        zips.append((section, axes))
    return zips


def _check_fields_set_once(base: dict, sections: list[tuple[str, dict]], errors: _Errors) -> None:
    """Each field in one place only, and every required field somewhere."""
    seen: dict[str, str] = {key: where for key, (where, _) in base.items()}
    for section, axes in sections:
        for key in axes:
            if key in seen:
                errors.add(f"{section}.{key}", f"{key} is already set in {seen[key]}; set each field in one place")
            seen[key] = f"{section}.{key}"
    for key in _REQUIRED:
        if key not in seen:
            errors.add(key, f"required field missing: set {key} in base, grid or zip ({_allowed_values(key)})")


def _check_size(grid: dict, zips: list[dict], most: int, errors: _Errors) -> None:
    """Refuse a grid of more than ``most`` trials before making any of them."""
    count = math.prod(len(values) for values in grid.values())
    count *= math.prod(len(next(iter(axes.values()))) for axes in zips)
    if count > most:
        errors.add("grid", f"expands to {count:,} trials, more than run.max_trials ({most:,}); set run.max_trials "
                   "to run a grid this large")  # fmt: skip
        errors.raise_if_any()


def _trials(base: dict, grid: dict, zips: list[dict], errors: _Errors) -> list[Trial]:
    """The trials the axes expand to, each checked against its dataset; duplicates refused."""
    trials: list[Trial] = []
    origin: dict[str, str] = {}
    for setting in _expand(base, grid, zips):
        config = TrialConfig(**{k: _normalise(k, v) for k, (_, v) in setting.items()})
        where = {k: p for k, (p, _) in setting.items()}
        ds = config.dataset_info
        if config.probes_itself and not config.probe_examples:
            errors.add(where["probe_datasets"], f"probing {ds.name}, the pre-training dataset, holds out "
                       "probe_examples of its training images from pre-training: set probe_examples")  # fmt: skip
        elif config.probes_itself and config.pool_size < 1:
            errors.add(where["probe_examples"], f"holds out {config.probe_examples} of {ds.name}'s {ds.train_size} "
                       "training images to probe, leaving none to pre-train on")  # fmt: skip
        elif config.examples is not None and config.examples > config.pool_size:
            held = f" ({ds.train_size} less {config.probe_examples} held out to probe)" if config.probes_itself else ""
            errors.add(
                where["examples"],
                f"{config.examples} examples requested but {ds.name} has {config.pool_size} training images{held}",
            )
        if config.channels == 1 and ds.channels == 3:
            errors.add(where["channels"], f"{ds.name} has 3 channels; channels may be 3 or null")
        try:
            config.model_config()
        except ValueError as e:  # a patch size that does not divide the images, MLP options on a Mixer
            errors.add(where["model"], str(e))
            continue
        channels = config.channels or ds.channels
        for field_name in ("probe_datasets", "finetune_datasets"):
            for stage in map(data.info, getattr(config, field_name)):
                if stage.channels > channels:
                    errors.add(where[field_name], f"{stage.name} has {stage.channels} channels but the model "
                               f"reads {channels} ({ds.name}'s): a stage reads its images as pre-training does;"
                               " set channels: 3 to pre-train on 3")  # fmt: skip
        tid = trial_id(config)
        label = ", ".join(p for p in where.values() if not p.startswith("base."))
        if tid in origin:
            errors.add(label or "grid", f"duplicate trial: same settings as {origin[tid]}")
            continue
        origin[tid] = label or "base"
        trials.append(Trial(tid, config))
    return trials


def _metric_section(raw: Any, trials: list[Trial], errors: _Errors) -> str:
    if trials and raw not in (allowed := errors_every_trial_reports(trials)):
        errors.add("metric", f"{raw!r} is not measured by every trial; allowed: {', '.join(allowed)}")
    return raw


def parse(text: str, path: Path) -> GridSpec:
    """Validate a grid file's text; raises :class:`SpecError` listing every problem."""
    errors = _Errors(path)
    doc = _document(text, path)
    name = _name_section(doc, path, errors)
    data_roots = _use_datasets(_data_section(doc.get("data") or {}, path, errors), errors)
    run_options = _run_section(doc.get("run") or {}, errors)
    base = _base_section(doc.get("base") or {}, errors)
    grid = _axis_values("grid", doc.get("grid") or {}, errors)
    zips = _zip_section(doc.get("zip") or [], errors)
    _check_fields_set_once(base, [("grid", grid), *zips], errors)
    errors.raise_if_any()
    _check_size(grid, [axes for _, axes in zips if axes], run_options.max_trials, errors)
    trials = _trials(base, grid, [axes for _, axes in zips if axes], errors)
    metric = _metric_section(doc.get("metric", metrics.TEST_ERROR), trials, errors)
    errors.raise_if_any()
    return GridSpec(name, path, data_roots, run_options, trials, metric)


def errors_every_trial_reports(trials: list[Trial]) -> list[str]:
    """The errors every one of ``trials`` reports, by MLflow metric name."""
    common = None
    for t in trials:
        names = metrics.errors_reported(t.config)
        common = names if common is None else common & names
    return sorted(common or [])


def reduce(grid: GridSpec, scale: float | None = None, only: tuple[tuple[str, str], ...] = ()) -> GridSpec:
    """A smaller version of ``grid`` to try a pipeline first: the trials matching every
    ``(field, value)`` of ``only``, with N, T and the stages' epochs (and TTA crops) times
    ``scale``; N and T values that differ in the grid still differ (T = 2, 4, 8 at 0.1 become 1,
    2, 3), so the scaled grid keeps the full grid's trials apart. A scaled grid gets its own name,
    so its runs never mix with the full grid's."""
    trials = grid.trials
    for name, value in only:
        if name not in FIELDS:
            raise SpecError(f"--only {name}={value}: {_unknown_key(name, list(FIELDS))}")
        trials = [t for t in trials if str(getattr(t.config, name)) == value]
        if not trials:
            raise SpecError(f"{grid.path}: no trial has {name}={value}")
    if not scale:
        return dataclasses.replace(grid, trials=trials)

    def shrink(n: int) -> int:
        return max(1, round(n * scale))

    def kept_apart(values: set[int]) -> dict[int, int]:
        """Each value times ``scale``, distinct values kept distinct and in order (2, 4, 8 at 0.1: 1, 2, 3)."""
        mapped: dict[int, int] = {}
        for v in sorted(values):
            mapped[v] = max(shrink(v), max(mapped.values(), default=0) + 1)
        return mapped

    # From the whole grid's values, so a trial scales alike whatever --only keeps.
    sizes = kept_apart({t.config.num_examples for t in grid.trials})
    lengths = kept_apart({t.config.epochs for t in grid.trials})
    reduced: dict[str, Trial] = {}
    for t in trials:
        c = t.config
        small = dataclasses.replace(
            c, examples=sizes[c.num_examples], epochs=lengths[c.epochs], probe_epochs=shrink(c.probe_epochs),
            finetune_epochs=shrink(c.finetune_epochs), tta=c.tta and shrink(c.tta),
            probe_examples=c.probe_examples and shrink(c.probe_examples),
        )  # fmt: skip
        reduced.setdefault(trial_id(small), Trial(trial_id(small), small))  # trials may collapse into one
    return dataclasses.replace(grid, name=f"{grid.name}-scale{scale:g}", trials=list(reduced.values()))


def run_option_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for ``run.<key>`` (or its command-line option), or None."""
    whole = key in ("checkpoint_every_steps", "evaluate_every", "max_trials", "workers")
    auto = "" if whole and key != "workers" else " or auto"
    if value == "auto" and auto:
        return None
    if key in ("compile", "fuse", "ray_train"):
        return None if isinstance(value, bool) else "expected true, false or auto"
    if key == "group":
        count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        off = value == "off" or value is False  # YAML reads a bare off as false
        return None if count or off else "expected the most trials a worker trains together (>= 1), off or auto"
    kind = int if whole else float
    if isinstance(value, bool) or not isinstance(value, (int, kind)) or not math.isfinite(value):
        return f"expected a {'whole ' if kind is int else ''}number{auto}"
    if key in ("max_trials", "evaluate_every", "workers") and value < 1:
        return "expected a whole number >= 1" + (" or auto" if key == "workers" else "")
    if key == "gpus_per_trial" and not (0 < value <= 1 or (value >= 2 and value == int(value))):
        return "expected the share of one GPU a trial takes (0 < x <= 1), a whole number of GPUs (>= 2) or auto"
    return "expected a number >= 0" if value < 0 else None


def _shown(value: Any) -> str:
    """A default as it is written in a grid file."""
    if value is dataclasses.MISSING:
        return "required"
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"


def reference() -> str:
    """The grid file's fields as Markdown tables, made from :class:`TrialConfig` and
    :class:`RunOptions` (docs/grid-files.md's copy is checked against it: ``python -m mlpgrid.grid.spec``)."""
    lines = ["Trial settings (any of them in `base`, `grid` or `zip`):", "",
             "| field | meaning | default |", "|---|---|---|"]  # fmt: skip
    for f in FIELDS.values():
        allowed = f" ({', '.join(map(str, f.metadata['choices']))})" if "choices" in f.metadata else ""
        lines.append(f"| `{f.name}` | {f.metadata['help']}{allowed} | {_shown(f.default)} |")
    lines += ["", "Run options (under `run`; they never change a trial's result, so they are not in its id):", "",
              "| field | meaning | default |", "|---|---|---|"]  # fmt: skip
    for f in dataclasses.fields(RunOptions):
        default = "auto" if f.default is None else _shown(f.default)
        lines.append(f"| `{f.name}` | {f.metadata['help']} | {default} |")
    return "\n".join(lines) + "\n"


def load(path: str | Path) -> GridSpec:
    """Read and validate a grid file (UTF-8, at most :data:`MAX_FILE_BYTES`)."""
    path = Path(path)
    try:
        regular_file(path, MAX_FILE_BYTES, "a grid file")
    except ValueError as e:
        raise SpecError(str(e)) from None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # never more, should it grow meanwhile
    except OSError as e:
        raise SpecError(f"{path}: cannot read grid file ({e.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB, not a grid file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None
    return parse(text, path)


if __name__ == "__main__":
    print(reference(), end="")
