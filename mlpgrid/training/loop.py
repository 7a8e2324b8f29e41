"""The training loop: one or more trials (members) on one stream of batches, top to bottom.

:func:`run_group` is the function every runner calls, in-process or inside a Ray worker; a
trial alone is a group of one (:func:`run_trial`). It reads:

1. **set up**: one batch stream for all members (:func:`mlpgrid.training.setup.set_up_data`),
   then each member's model and optimizer as it would have them alone, seeded, and restored
   from the newest good checkpoint of its own directory (:func:`resume`): same weights,
   optimizer state, RNG state and position in the same data order;
2. **the engine** that steps them: one after another, each its own model and optimizer
   (:class:`Separate`: what a trial alone is), or fused, their weights stacked
   (:class:`mlpgrid.training.fused.Fused`);
3. **epochs**: every step one batch for every member, each with its own learning rate
   (:func:`lr_at`); checkpoints at each epoch's end and every ``checkpoint_every_steps``; then
   each member's metrics, built in one place (:func:`epoch_metrics`);
4. **the end** of each member at its own T: its last checkpoint on disk, its stages and
   first-layer picture (:func:`finish`), its :class:`TrialResult` to ``on_end``. A member whose
   loss stops being finite ends as diverged. Neither changes what the others compute.

Members checkpoint together, at the same positions (one background write for all of them), and
each member's checkpoint is the one it would write alone: it could go on alone from any of them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mlpgrid import data, policy
from mlpgrid.data.loader import Batch, Loader, resident_share
from mlpgrid.grid import spec
from mlpgrid.grid.layout import TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.models.networks import Network, RepMLPNet, inject_locality
from mlpgrid.training import pictures
from mlpgrid.training.checkpoint import BackgroundSaver, CheckpointDir, hold_if_asked
from mlpgrid.training.parallel import ALONE, Workers
from mlpgrid.training.setup import DataParts, Model, TrialOptions, make_model, set_up_data
from mlpgrid.training.stages import StageDir, run_stages
from mlpgrid.training.step import compiled_recipe_loss, cosine, evaluate, train_step

log = logging.getLogger(__name__)


class TrialDiverged(RuntimeError):
    """The training loss stopped being finite."""


@dataclass(frozen=True)
class Hooks:
    """What the caller hears of one member while it trains."""

    resumed: Callable[[list[dict[str, Any]]], None] | None = None  # the epochs a checkpoint already holds
    epoch: Callable[[dict[str, Any]], None] | None = None  # each epoch's metrics as it ends
    stages: Callable[[dict[str, float]], None] | None = None  # the stages' metrics


@dataclass(frozen=True)
class TrialResult:
    status: str  # finished (a trial that diverges ends with TrialDiverged instead)
    seed: int
    device: str
    epochs: int
    train_loss: float
    test_loss: float
    test_error: float
    best_test_error: float
    history: list[dict[str, Any]]  # every epoch's metrics
    resumed_from: list[list[int]]  # [epoch, step] of each resume that had training left
    compiled: bool
    checkpoint_problems: list[str]  # damaged checkpoints passed over, and why
    stages: dict[str, float]
    first_layer: str  # the picture of the first layer (a PNG)


Outcome = TrialResult | BaseException  # how a member ended: its result, TrialDiverged, or the error that ended it


def lr_at(cfg: TrialConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warm-up, then decay. Under
    wsd it is constant until :meth:`TrialConfig.cooldown_start`, whatever T is, then falls to 0 (Hägele et al.
    2024: a 1-sqrt cooldown of 20% matched cosine at every length)."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        start = cfg.cooldown_start(steps_per_epoch)
        if step < start:
            return cfg.lr
        done = (step - start) / (total - start)
        return cfg.lr * (1 - (math.sqrt(done) if cfg.cooldown_shape == "1-sqrt" else done))
    return cfg.lr * cosine((step - warmup) / max(1, total - warmup))


# --- where a member stands ------------------------------------------------------------------


@dataclass
class Position:
    """Where training stands: what a checkpoint holds besides the model and optimizer."""

    loss_sum: torch.Tensor  # of the epoch under way, on the device
    epoch: int = 0  # epochs done
    step: int = 0  # steps done of the epoch under way
    history: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0  # images of the epoch under way
    resumed_from: list[list[int]] = field(default_factory=list)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _differs(saved: dict[str, Any], config: TrialConfig) -> bool:
    """Whether a checkpoint's config pre-trains another model than ``config``: a setting added
    since the checkpoint was written counts as its default, as in the trial id, and the stages
    after pre-training do not count (a trial may start from another's pre-trained model)."""
    known: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in spec.FIELDS}
    if len(known) < len(saved):
        return True  # a setting this version no longer has
    return spec.pretraining_id(TrialConfig(**known)) != spec.pretraining_id(config)


def resume(cfg: TrialConfig, model: Model, device: torch.device, checkpoints: CheckpointDir) -> Position:
    """The position of the newest good checkpoint, its state loaded into ``model``; the start
    when there is none."""
    state = checkpoints.latest()
    for problem in checkpoints.problems:
        log.warning("%s; passed over for an earlier checkpoint", problem)
    if state is None:
        return Position(loss_sum=torch.zeros((), device=device))
    if _differs(state["config"], cfg):
        raise ValueError(f"{checkpoints.path}: checkpoint belongs to another trial config (copied or moved here?); "
                         "move it away and this trial trains from the start")  # fmt: skip
    epoch, step = state["epoch"], state["step"]
    if state["optimizer"] is None and epoch < cfg.epochs:
        raise ValueError(f"{checkpoints.path}: its newest checkpoint holds a finished trial's weights only (no "
                         f"optimizer state), at epoch {epoch} of {cfg.epochs}; move it away and this trial "
                         "trains from the start")  # fmt: skip
    model.network.load_state_dict(state["model"])
    if state["optimizer"] is not None:  # a finished trial keeps its weights only: nothing is left to train
        model.optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], device)
    return Position(
        epoch=epoch, step=step, history=state["history"], loss_sum=state["loss_sum"].to(device),
        seen=state["seen"], resumed_from=state["resumed_from"] + ([[epoch, step]] if epoch < cfg.epochs else []),
    )  # fmt: skip


def checkpoint_state(cfg: TrialConfig, model: dict[str, Any], optimizer: dict[str, Any] | None, position: Position,
                     device: torch.device) -> dict[str, Any]:  # fmt: skip
    """What a trial's checkpoint holds: its config, position, model and optimizer state, RNG state."""
    return {
        "config": dataclasses.asdict(cfg), "epoch": position.epoch, "step": position.step, "model": model,
        "optimizer": optimizer, "rng": _rng_state(device), "history": position.history,
        "loss_sum": position.loss_sum.cpu(), "seen": position.seen, "resumed_from": position.resumed_from,
    }  # fmt: skip


@dataclass(frozen=True)
class Branch:
    """A shorter wsd trial of a member's run (see :mod:`mlpgrid.execution.trunks`): up to its
    cooldown start it is the member's computation, so the member writes its state there into
    the branch's checkpoints, as the branch would have written it alone."""

    cfg: TrialConfig
    layout: TrialLayout


@dataclass
class Member:
    """One trial of the group: its config, directory, hooks and where it stands."""

    index: int  # in the group as given
    cfg: TrialConfig
    layout: TrialLayout
    hooks: Hooks
    checkpoints: CheckpointDir
    position: Position
    compiled: bool  # whether its model (or the stack it is in) is compiled
    compile_seconds: float | None  # spent compiling its own model in this attempt, until logged


# --- the engines ----------------------------------------------------------------------------


class Engine(Protocol):
    """How the members' models take a step together; members are indexed as they are kept."""

    compile_seconds: float | None  # the engine's own compiling (a fused stack), until logged

    def begin_epoch(self, lrs: list[list[float]]) -> None:
        """Each member's learning rate at every step of the coming epoch; the models in training
        mode (evaluation left them in eval mode: dropout and batch statistics depend on it)."""

    def step(self, batch: Batch, step: int) -> torch.Tensor:
        """One optimizer step of every member on ``batch``; their losses (members,), on the device."""

    def evaluate(self, test: Loader) -> list[tuple[float, float]]:
        """Each member's (test loss, test error)."""

    def states(self, i: int, lr: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """Member ``i``'s model and optimizer state, as it would checkpoint them alone."""

    def member_model(self, i: int) -> Network:
        """Member ``i``'s network, for its stages."""

    def keep(self, indices: list[int]) -> None:
        """Only the members ``indices`` go on."""


class Separate:
    """Members stepped one after another on the same batch, each its own model and optimizer:
    every member computes exactly what it computes alone (and a trial alone is one of these,
    on one worker or, through DDP, on several: :mod:`mlpgrid.training.parallel`)."""

    def __init__(self, models: list[Model], cfgs: list[TrialConfig], workers: Workers = ALONE):
        self.models, self.cfgs, self.workers = models, cfgs, workers
        self.compile_seconds: float | None = None
        self.lrs: list[list[float]] = []

    def begin_epoch(self, lrs: list[list[float]]) -> None:
        self.lrs = lrs
        for model in self.models:
            model.network.train()

    def step(self, batch: Batch, step: int) -> torch.Tensor:
        losses = []
        for model, cfg, lrs in zip(self.models, self.cfgs, self.lrs, strict=True):
            for group in model.optimizer.param_groups:
                group["lr"] = lrs[step]
            scale = self.workers.loss_scale(len(batch.labels), batch.whole)
            if model.compiled is not None and batch.whole == cfg.batch_size:  # full batches: compiled
                losses.append(train_step(model.compiled, model.optimizer, batch, cfg.label_smoothing, cfg.clip_grad,
                                         compiled_recipe_loss, scale))  # fmt: skip
            else:
                losses.append(train_step(model.stepped, model.optimizer, batch, cfg.label_smoothing, cfg.clip_grad,
                                         loss_scale=scale))  # fmt: skip
        return torch.stack(losses)

    def evaluate(self, test: Loader) -> list[tuple[float, float]]:
        return [evaluate(model.network, test) for model in self.models]

    def states(self, i: int, lr: float) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.models[i].network.state_dict(), self.models[i].optimizer.state_dict()

    def member_model(self, i: int) -> Network:
        return self.models[i].network

    def keep(self, indices: list[int]) -> None:
        self.models = [self.models[i] for i in indices]
        self.cfgs = [self.cfgs[i] for i in indices]


class _MemberWrites:
    """Writes every member's checkpoint of one position (what :class:`BackgroundSaver` saves)."""

    def save(self, writes: list[tuple[CheckpointDir, dict[str, Any]]], epoch: int, step: int) -> None:
        for checkpoints, state in writes:
            checkpoints.save(state, epoch, step)


# --- one epoch's record ---------------------------------------------------------------------


def _evaluates(cfg: TrialConfig, epoch: int, every: int) -> bool:
    """Whether a member evaluates on the test split after ``epoch``: every ``every`` and its last."""
    return epoch % every == 0 or epoch >= cfg.epochs


def epoch_metrics(member: Member, engine: Engine, parts: DataParts, *, train_loss: float,
                  test: tuple[float, float] | None, lr: float, images: int, train_seconds: float,
                  started: float) -> dict[str, Any]:  # fmt: skip
    """What a member records of an epoch (:data:`mlpgrid.grid.metrics.EPOCH` and the hardware's;
    the test loss and error where it was evaluated); its compile seconds once per attempt, with
    its first epoch."""
    metrics: dict[str, Any] = {
        "epoch": member.position.epoch + 1, "train_loss": train_loss, "lr": lr, "images_per_s": images / train_seconds,
        "resident_share": resident_share(parts.train),
        "tflops": parts.flops_per_image * images / train_seconds / 1e12,
        "epoch_seconds": time.perf_counter() - started,
    }  # fmt: skip
    if test is not None:
        metrics["test_loss"], metrics["test_error"] = test
    if parts.peak_tflops:
        metrics["mfu"] = metrics["tflops"] / parts.peak_tflops
    if parts.device.type == "cuda":  # what the process held of the GPU's memory at most (its allocator's)
        metrics["memory_gb"] = torch.cuda.max_memory_reserved(parts.device) / 2**30
    compiling = [s for s in (member.compile_seconds, engine.compile_seconds) if s is not None]
    if compiling:
        metrics["compile_seconds"] = sum(compiling)
        member.compile_seconds = None
    return metrics


# --- the loop -------------------------------------------------------------------------------


def _set_up_member(index: int, cfg: TrialConfig, layout: TrialLayout, hooks: Hooks, options: TrialOptions,
                   parts: DataParts, workers: Workers, *,
                   from_checkpoint: bool = True) -> tuple[Member, Model]:  # fmt: skip
    """A member's own model, as alone, resumed from its newest good checkpoint (or not)."""
    model = make_model(cfg, options, parts.device, parts.train.out_dtype, workers)
    checkpoints = CheckpointDir(layout.checkpoints)
    if from_checkpoint:
        position = resume(cfg, model, parts.device, checkpoints)
    else:
        position = Position(loss_sum=torch.zeros((), device=parts.device))
    if not workers.lead:  # the lead holds the checkpoint's loss sum and count of the epoch under way
        position.loss_sum, position.seen = torch.zeros_like(position.loss_sum), 0
    member = Member(index, cfg, layout, hooks, checkpoints, position, model.compiled is not None, model.compile_seconds)
    return member, model


def _members_to_train(cfgs: list[TrialConfig], layouts: list[TrialLayout], hooks: list[Hooks], options: TrialOptions,
                      parts: DataParts, datasets: data.Datasets, on_end: Callable[[int, Outcome], None],
                      workers: Workers) -> list[tuple[Member, Model]]:  # fmt: skip
    """Every member set up and resumed as alone; those whose training is left, at one position.
    A member that cannot be set up (another trial's checkpoint in its directory, say) ends at
    once, alone; one trained before only has its end left, which comes now."""
    members: list[tuple[Member, Model]] = []
    for i, (cfg, layout, h) in enumerate(zip(cfgs, layouts, hooks, strict=True)):
        try:
            members.append(_set_up_member(i, cfg, layout, h, options, parts, workers))
        except Exception as e:  # noqa: BLE001 - it alone fails
            on_end(i, e)
    for m, _ in members:
        if m.position.history and m.hooks.resumed and workers.lead:
            m.hooks.resumed(m.position.history)
    for m, model in members:
        if m.position.epoch >= m.cfg.epochs and workers.lead:
            _finish(m, model.network, parts, datasets, on_end)
    going = [(m, model) for m, model in members if m.position.epoch < m.cfg.epochs]
    if len({(m.position.epoch, m.position.step) for m, _ in going}) > 1:
        # Checkpoints are written together, so this takes a damaged one; start them over together.
        log.warning("the members' newest good checkpoints are at different positions: they start again together")
        going = [_set_up_member(m.index, m.cfg, m.layout, m.hooks, options, parts, workers, from_checkpoint=False)
                 for m, _ in going]  # fmt: skip
    if going:
        workers.check_same(going[0][0].position.epoch, going[0][0].position.step, parts.device)
    return going


def run_group(
    cfgs: list[TrialConfig],
    layouts: list[TrialLayout],
    options: TrialOptions,
    *,
    datasets: data.Datasets,
    hooks: list[Hooks],
    device: torch.device,
    fuse: bool,
    on_end: Callable[[int, Outcome], None],
    branches: list[list[Branch]] | None = None,
    workers: Workers = ALONE,
) -> None:
    """Train the trials ``cfgs`` (one trial, or a group: see :func:`mlpgrid.execution.groups.group_key`)
    in their directories ``layouts``, resuming each from its checkpoints; ``on_end(i, outcome)`` is
    called as member ``i`` ends, with its :class:`TrialResult` or the exception that ended it
    (:class:`TrialDiverged` for a diverged one). ``fuse`` steps the members fused.

    The training set is kept on ``device`` when it fits in the data budget, else streamed to it;
    both give the same batches. Checkpoints are written in the background
    (:class:`BackgroundSaver`): every ``options.checkpoint_every_steps`` steps, as a member ends,
    and at each other epoch end unless the previous one is still being written or too recent
    (:meth:`BackgroundSaver.skips`). ``branches``:
    each member's :class:`Branch` es, whose checkpoints it writes at their cooldown starts.
    ``workers``: this process's place among a data-parallel trial's workers (a trial of one
    member, not fused): each trains its shard of every batch; the lead alone evaluates,
    checkpoints, calls the hooks and finishes the member (another worker's ``on_end`` hears only
    a divergence or an error; see :mod:`mlpgrid.training.parallel`).
    """
    assert workers.count == 1 or (len(cfgs) == 1 and not fuse), "a data-parallel trial trains alone"
    compile_stack = fuse and policy.compiles_stack(cfgs, device.type, options.compile)
    member_options = dataclasses.replace(options, compile=False) if fuse else options
    compile_loader = compile_stack or any(policy.compiles_augmentation(c, device.type, options.compile) for c in cfgs)
    if compile_loader:
        # A reused worker's earlier groups compiled other shapes through the same functions, and
        # Dynamo's recompile limit counts them all: on an H100 a worker's later models failed
        # (FailOnRecompileLimitHit in the compiled Lion; benchmarks/main_job.py). Inductor's
        # disk cache keeps what they made.
        torch.compiler.reset()
    parts = set_up_data(cfgs, options, datasets, device, compile_loader, workers.shard)
    going = _members_to_train(cfgs, layouts, hooks, member_options, parts, datasets, on_end, workers)
    if not going:
        return
    active = [m for m, _ in going]
    engine: Engine
    if fuse:
        from mlpgrid.training.fused import Fused

        engine = Fused([m.cfg for m in active], [model for _, model in going], parts, compile_stack)
        for m in active:
            m.compiled = compile_stack
    else:
        engine = Separate([model for _, model in going], [m.cfg for m in active], workers)
    saver = BackgroundSaver(_MemberWrites())
    steps = len(parts.train)
    branch_at: dict[tuple[int, int, int], list[Branch]] = {}  # (member index, epoch, step) -> its branches there
    for m in active:
        for b in branches[m.index] if branches else []:
            branch_at.setdefault((m.index, *divmod(b.cfg.cooldown_start(steps), steps)), []).append(b)
    while active:
        epoch, start_step = active[0].position.epoch, active[0].position.step
        sums = torch.stack([m.position.loss_sum for m in active])
        seen = active[0].position.seen
        schedule = [[lr_at(m.cfg, epoch * steps + step, steps) for step in range(steps)] for m in active]
        engine.begin_epoch(schedule)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started, images = time.perf_counter(), 0
        for step, batch in enumerate(parts.train.epoch(epoch, start_step), start=start_step):
            losses = engine.step(batch, step)
            n = len(batch.labels)
            sums += losses * n
            seen += n
            images += n
            every = options.checkpoint_every_steps
            if every and (step + 1) % every == 0 and step + 1 < steps:
                for m in active:
                    m.position.step = step + 1
                sums, (seen,) = workers.add_up(sums, [seen], on_lead=True)
                # Asked for by the grid (to bound what a preemption loses): written, never skipped.
                _save(saver, engine, active, sums, seen, [lrs[step] for lrs in schedule], device,
                      required=True, writer=workers.lead)  # fmt: skip
                if workers.lead:
                    hold_if_asked(saver, epoch, step + 1, [m.layout.root for m in active])
            if branch_at and step + 1 < steps and any(k[1:] == (epoch, step + 1) for k in branch_at):
                sums, (seen,) = workers.add_up(sums, [seen], on_lead=True)
                if workers.lead:
                    _write_branches(branch_at, engine, active, epoch, step + 1, sums, seen,
                                    [lrs[step] for lrs in schedule], device)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the loop only queues work; wait for it to be done
        sums, (seen, images) = workers.add_up(sums, [seen, images])
        train_seconds = time.perf_counter() - started
        lrs = [member_lrs[-1] for member_lrs in schedule]  # of the epoch's last step
        due = [_evaluates(m.cfg, epoch + 1, options.evaluate_every) for m in active]
        results: list[tuple[float, float] | None] = [None] * len(active)
        if any(due) and workers.lead:
            results = list(engine.evaluate(parts.test))
        going_on: list[int] = []
        ending: list[int] = []
        ended_epochs: list[tuple[Member, dict[str, Any]]] = []
        for i, (m, test) in enumerate(zip(active, results, strict=True)):
            train_loss = sums[i].item() / seen
            if not math.isfinite(train_loss):
                on_end(m.index, TrialDiverged(f"training loss is {train_loss} in epoch {epoch + 1} (lr {m.cfg.lr})"))
                continue
            metrics = epoch_metrics(m, engine, parts, train_loss=train_loss, test=test if due[i] else None, lr=lrs[i],
                                    images=images,
                                    train_seconds=train_seconds, started=started)  # fmt: skip
            m.position.history.append(metrics)
            m.position.epoch, m.position.step = epoch + 1, 0
            ended_epochs.append((m, metrics))
            (ending if m.position.epoch >= m.cfg.epochs else going_on).append(i)
        engine.compile_seconds = None
        kept = going_on + ending
        active = [active[i] for i in kept]
        engine.keep(kept)
        lrs = [lrs[i] for i in kept]
        sums, seen = torch.zeros(len(active), device=device), 0
        if active:
            _save(saver, engine, active, sums, seen, lrs, device, required=bool(ending), writer=workers.lead)
            if branch_at and workers.lead:
                _write_branches(branch_at, engine, active, epoch + 1, 0, sums, seen, lrs, device)
        for m, metrics in ended_epochs:
            if m.hooks.epoch and workers.lead:
                m.hooks.epoch(metrics)
        if ending:
            saver.wait()  # the last checkpoint is on disk before a member counts as trained
            for i in range(len(going_on), len(kept)) if workers.lead else ():
                _finish(active[i], engine.member_model(i), parts, datasets, on_end)
            active = active[: len(going_on)]
            engine.keep(list(range(len(going_on))))
    saver.wait()


def _save(saver: BackgroundSaver, engine: Engine, active: list[Member], sums: torch.Tensor, seen: int,
          lrs: list[float], device: torch.device, *, required: bool, writer: bool = True) -> None:  # fmt: skip
    """Checkpoint every active member at its (common) position, in one background write (by
    the ``writer``: a data-parallel trial's lead)."""
    for i, m in enumerate(active):
        m.position.loss_sum, m.position.seen = sums[i].clone(), seen  # where the next epoch starts from, too
    if not writer or saver.skips(required):
        return  # it would be skipped: copy no member's state for it
    writes = []
    for i, m in enumerate(active):
        model_state, optimizer_state = engine.states(i, lrs[i])
        finished = m.position.epoch == m.cfg.epochs  # its final weights: nothing is left to train
        writes.append((m.checkpoints, checkpoint_state(m.cfg, model_state, None if finished else optimizer_state,
                                                        m.position, device)))  # fmt: skip
    saver.save(writes, active[0].position.epoch, active[0].position.step, required=required)


def _write_branches(branch_at: dict[tuple[int, int, int], list[Branch]], engine: Engine, active: list[Member],
                    epoch: int, step: int, sums: torch.Tensor, seen: int, lrs: list[float],
                    device: torch.device) -> None:  # fmt: skip
    """Write the checkpoint of every branch that starts its cooldown at (epoch, step): the
    member's state there, under the branch's config, as the branch alone would have written it.
    A branch with checkpoints of its own keeps them."""
    for i, m in enumerate(active):
        for branch in branch_at.pop((m.index, epoch, step), []):
            checkpoints = CheckpointDir(branch.layout.checkpoints)
            if checkpoints.positions():
                continue
            model_state, optimizer_state = engine.states(i, lrs[i])
            position = Position(loss_sum=sums[i].clone(), epoch=epoch, step=step, history=list(m.position.history),
                                seen=seen)  # fmt: skip
            checkpoints.save(checkpoint_state(branch.cfg, model_state, optimizer_state, position, device), epoch, step)


# --- the end --------------------------------------------------------------------------------


def finish(member: Member, model: Network, parts: DataParts, datasets: data.Datasets) -> TrialResult:
    """The stages after pre-training (a RepMLPNet's on its merged form, the pure MLP it deploys
    as), the first layer's picture, and the member's result."""
    cfg, position = member.cfg, member.position
    if isinstance(model, RepMLPNet):
        model = inject_locality(model)
    stage_dir = StageDir(member.layout.stages)
    stage_metrics = run_stages(model, cfg, datasets, stage_dir, parts.device, parts.budget_bytes, member.hooks.stages)
    weight = model.embed.weight.detach().float().cpu().numpy()
    channels, side, _ = parts.image_shape
    side = getattr(model.cfg, "patch", side)  # a patch model's first layer sees one patch
    picture = pictures.first_layer(weight, channels, side, stage_dir.path / "first_layer.png")
    history = position.history
    final = history[-1]
    return TrialResult(
        status="finished", seed=cfg.seed, device=str(parts.device), epochs=len(history),
        train_loss=final["train_loss"], test_loss=final["test_loss"], test_error=final["test_error"],
        best_test_error=min(h["test_error"] for h in history if "test_error" in h), history=history,
        resumed_from=position.resumed_from,
        compiled=member.compiled, checkpoint_problems=member.checkpoints.problems, stages=stage_metrics,
        first_layer=str(picture),
    )  # fmt: skip


def _finish(member: Member, model: Network, parts: DataParts, datasets: data.Datasets,
            on_end: Callable[[int, Outcome], None]) -> None:  # fmt: skip
    """A trained member's end; its outcome goes to ``on_end``, whatever it is."""
    try:
        outcome: Outcome = finish(member, model, parts, datasets)
    except Exception as e:  # noqa: BLE001 - this member failed; the group goes on
        outcome = e
    on_end(member.index, outcome)


def run_trial(
    cfg: TrialConfig,
    layout: TrialLayout,
    options: TrialOptions | None = None,
    *,
    datasets: data.Datasets | None = None,
    hooks: Hooks = Hooks(),
    device: torch.device | None = None,
) -> TrialResult:
    """Train ``cfg`` to the end in the trial directory ``layout`` (resuming from its
    checkpoints), run the stages ``cfg`` declares (see :mod:`mlpgrid.training.stages`) and
    return the result: :func:`run_group` with one member. Raises what ended it otherwise
    (:class:`TrialDiverged` when the training loss becomes NaN or infinite).

    ``datasets`` says where each dataset lives and may already hold the pre-training arrays
    (default: every dataset from its default place).
    """
    from mlpgrid.training.hardware import pick_device

    outcomes: list[Outcome] = []
    run_group([cfg], [layout], options or TrialOptions(), datasets=datasets or data.Datasets(), hooks=[hooks],
              device=device or pick_device(), fuse=False, on_end=lambda _, end: outcomes.append(end))  # fmt: skip
    (outcome,) = outcomes
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
