"""A group of trials trained together by one worker, on one stream of batches.

:func:`run_group` is :func:`mlpgrid.training.loop.run_trial` for the members of a
:class:`~mlpgrid.execution.groups.Group`: one set of loaders, then every step one batch fed to every
member. Each member is set up and resumed from its own checkpoint directory exactly as it would
be alone, so its checkpoints are the ordinary ones (it could go on alone from any of them);
the members step either fused (:mod:`mlpgrid.training.fused`) or one after another (each its own model
and optimizer, as alone). A member that reaches its epochs ends there: its last checkpoint is
written, its stages run and it leaves the group; one whose loss stops being finite leaves as
diverged. Neither changes what the others compute.

Members checkpoint together, at the same positions (one background write for all of them), so
a group killed at any point resumes from a position every member holds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mlpgrid import data
from mlpgrid.data.loader import resident_share
from mlpgrid.execution.groups import FUSED_COMPILE_PAYS_FLOPS, MAX_MEMBERS, hardware_flops
from mlpgrid.grid.layout import TrialLayout
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.models import architecture, networks
from mlpgrid.training.checkpoint import BackgroundSaver, CheckpointDir, hold_if_asked
from mlpgrid.training.fused import StackedMLP, StackedOptimizer, clip_members, member_losses
from mlpgrid.training.hardware import matmul_peak_tflops
from mlpgrid.training.loop import (
    Components,
    Hooks,
    Loader,
    Position,
    TrialDiverged,
    TrialOptions,
    TrialResult,
    checkpoint_state,
    compiles_augmentation,
    data_budget,
    finish,
    image_shape,
    load_data,
    lr_at,
    make_model,
    resume,
)
from mlpgrid.training.step import autocast, compile_for_training, evaluate, train_step

log = logging.getLogger(__name__)

Outcome = TrialResult | BaseException  # how a member ended: its result, TrialDiverged, or the error that ended it


@dataclass
class Member:
    """One trial of the group: its config, directory, hooks, its own (alone) components, position."""

    index: int  # in the group as given
    cfg: TrialConfig
    layout: TrialLayout
    hooks: Hooks
    parts: Components
    checkpoints: CheckpointDir
    position: Position


class _Sequential:
    """Members stepped one after another on the same batch, each with its own model and
    optimizer: every member computes exactly what it computes alone."""

    def __init__(self, members: list[Member]):
        self.members = members
        self.compile_seconds = None
        self.lrs: list[list[float]] = []

    def schedule(self, lrs: list[list[float]]) -> None:
        """Each member's learning rate at every step of the coming epoch."""
        self.lrs = lrs

    def step(self, batch: Any, step: int) -> torch.Tensor:
        losses = []
        for member, lrs in zip(self.members, self.lrs, strict=True):
            parts, cfg = member.parts, member.cfg
            for group in parts.optimizer.param_groups:
                group["lr"] = lrs[step]
            full = parts.compiled is not None and len(batch.labels) == cfg.batch_size
            losses.append(train_step(parts.compiled if full else parts.model, parts.optimizer, batch,
                                     cfg.label_smoothing, cfg.clip_grad))  # fmt: skip
        return torch.stack(losses)

    def evaluate(self, test: Loader) -> list[tuple[float, float]]:
        return [evaluate(m.parts.model, test) for m in self.members]

    def states(self, i: int, lr: float) -> tuple[dict[str, Any], dict[str, Any]]:
        parts = self.members[i].parts
        return parts.model.state_dict(), parts.optimizer.state_dict()

    def member_model(self, i: int) -> networks.Network:
        return self.members[i].parts.model

    def keep(self, indices: list[int]) -> None:
        self.members = [self.members[i] for i in indices]


class _Fused:
    """Members' weights stacked and stepped at once (:class:`StackedMLP`, :class:`StackedOptimizer`)."""

    def __init__(self, members: list[Member], compile: bool):
        lead = members[0]
        self.device = lead.parts.device
        self.model = StackedMLP(lead.cfg.model_config(), [m.parts.model for m in members])
        betas = lead.parts.optimizer.param_groups[0].get("betas", (0.9, 0.99))
        self.optimizer = StackedOptimizer(lead.cfg.optimizer, list(self.model.stacked),
                                          [m.cfg.weight_decay for m in members], [m.cfg.momentum for m in members],
                                          betas, compiled=compile)  # fmt: skip
        self.templates = []  # each member's optimizer state_dict, for its hyperparameters
        for i, m in enumerate(members):
            saved = m.parts.optimizer.state_dict()
            self.optimizer.load_member(i, saved)
            self.templates.append({"param_groups": saved["param_groups"]})
            m.parts = dataclasses.replace(m.parts, model=None, optimizer=None)  # the stack holds them now
        self.label_smoothing = self._per_member([m.cfg.label_smoothing for m in members])
        self.clip_grads = [m.cfg.clip_grad for m in members]  # on the host: asking the device would wait for it
        self.clip = self._per_member(self.clip_grads)
        self.lrs: torch.Tensor | None = None  # (members, steps of the epoch)
        self.batch_size = lead.cfg.batch_size
        self.example = (self.batch_size, *lead.parts.image_shape), lead.parts.train.out_dtype  # a full batch's
        self.compiled, self.compile_seconds = None, None
        if compile:
            # The stack compiles once for each number of members it has (see keep), up to
            # MAX_MEMBERS graphs of each function; torch.compile runs a function eagerly past
            # its recompile limit, and this worker's earlier groups count against it.
            torch.compiler.reset()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_MEMBERS)
            self._compile()

    def _compile(self) -> None:
        """Compile the stack for its members now; the seconds it took count until logged."""
        shape, dtype = self.example
        self.compiled, seconds = compile_for_training(self.model, torch.zeros(shape, dtype=dtype, device=self.device))
        self.compile_seconds = (self.compile_seconds or 0.0) + seconds

    def _per_member(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def schedule(self, lrs: list[list[float]]) -> None:
        """Each member's learning rate at every step of the coming epoch, copied to the device
        once. A copy from the host every step would make the host wait for the device each
        step, as would anything read back from it: the step only queues work."""
        self.lrs = torch.tensor(lrs, dtype=torch.float32).to(self.device)

    def step(self, batch: Any, step: int) -> torch.Tensor:
        self.optimizer.lr.copy_(self.lrs[:, step])
        net = self.compiled if self.compiled is not None and len(batch.labels) == self.batch_size else self.model
        with autocast(self.device):
            logits = net(batch.images)
        losses = member_losses(logits, batch, self.label_smoothing)
        self.optimizer.zero_grad()
        losses.sum().backward()
        if any(c > 0 for c in self.clip_grads):
            clip_members(self.optimizer.params, self.clip)
        self.optimizer.step()
        return losses.detach()

    @torch.no_grad()
    def evaluate(self, test: Loader) -> list[tuple[float, float]]:
        k = self.model.members
        loss_sum = torch.zeros(k, device=self.device)
        wrong = torch.zeros(k, device=self.device, dtype=torch.long)
        for batch in test.epoch(0):
            with autocast(self.device):
                logits = self.model(batch.images).float()  # (K, B, C)
            labels = batch.labels.expand(k, -1)
            loss_sum += F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(1)
            wrong += (logits.argmax(-1) != labels).sum(1)
        return [(loss / test.size, errors / test.size) for loss, errors in zip(loss_sum.tolist(), wrong.tolist(),
                                                                             strict=True)]  # fmt: skip

    def states(self, i: int, lr: float) -> tuple[dict[str, Any], dict[str, Any]]:
        template = {"param_groups": [g | {"lr": lr} for g in self.templates[i]["param_groups"]]}
        return self.model.member_state(i), self.optimizer.member_state(i, template)

    def member_model(self, i: int) -> networks.Network:
        return self.model.member_model(i)

    def keep(self, indices: list[int]) -> None:
        members = self.model.members
        if indices == list(range(members)):
            return
        self.model.keep(indices)
        self.optimizer.keep(indices, list(self.model.stacked))
        self.templates = [self.templates[i] for i in indices]
        self.label_smoothing, self.clip = self.label_smoothing[indices], self.clip[indices]
        self.clip_grads = [self.clip_grads[i] for i in indices]
        if self.compiled is not None and len(indices) != members:
            # Only the stack's own graphs compile again, for the new number of members (and
            # the optimizer's update at its next step): four B-6/Wi-512 at batch 4096 on an
            # H200 leaving one by one, 9.8, 7.0 and 8.5 s (benchmarks/groups.py --part leave).
            self._compile()


class _Checkpoints:
    """Writes every member's checkpoint of one position (what :class:`BackgroundSaver` saves)."""

    def save(self, writes: list[tuple[CheckpointDir, dict[str, Any]]], epoch: int, step: int) -> None:
        for checkpoints, state in writes:
            checkpoints.save(state, epoch, step)


def _set_up_member(index: int, cfg: TrialConfig, layout: TrialLayout, hooks: Hooks, options: TrialOptions,
                   shared: Components, *, from_checkpoint: bool = True) -> Member:  # fmt: skip
    """A member's own components, as alone, resumed from its newest good checkpoint (or not)."""
    model, compiled, optimizer, compile_seconds = make_model(cfg, options, shared.device, shared.train.out_dtype)
    parts = dataclasses.replace(shared, model=model, compiled=compiled, optimizer=optimizer,
                                compile_seconds=compile_seconds)  # fmt: skip
    checkpoints = CheckpointDir(layout.checkpoints)
    position = (
        resume(cfg, parts, checkpoints) if from_checkpoint else Position(loss_sum=torch.zeros((), device=shared.device))
    )
    return Member(index, cfg, layout, hooks, parts, checkpoints, position)


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
) -> None:
    """Train the trials ``cfgs`` (one group: see :func:`mlpgrid.execution.groups.group_key`) in their
    directories ``layouts``, resuming each from its checkpoints; ``on_end(i, outcome)`` is called
    as member ``i`` ends, with its :class:`TrialResult` or the exception that ended it
    (:class:`TrialDiverged` for a diverged one). ``fuse`` steps the members fused."""
    lead = cfgs[0]
    compile_pays = device.type == "cuda" and hardware_flops(cfgs) >= FUSED_COMPILE_PAYS_FLOPS
    compile_stack = fuse and (compile_pays if options.compile is None else options.compile)
    member_options = dataclasses.replace(options, compile=False) if fuse else options
    compile_loader = compile_stack or any(compiles_augmentation(cfg, options, device) for cfg in cfgs)
    budget = data_budget(options, device, cfgs)
    train, test = load_data(lead, datasets, device, budget, len(cfgs), compile_loader)
    mc = lead.model_config()
    shared = Components(
        device=device, budget_bytes=budget, train=train, test=test, model=None, compiled=None, optimizer=None,
        image_shape=image_shape(lead), flops_per_image=architecture.hardware_training_flops(mc, 1),
        peak_tflops=matmul_peak_tflops(device) if device.type == "cuda" else None, compile_seconds=None,
    )  # fmt: skip
    members = []
    for i, (cfg, layout, h) in enumerate(zip(cfgs, layouts, hooks, strict=True)):
        try:
            members.append(_set_up_member(i, cfg, layout, h, member_options, shared))
        except Exception as e:  # noqa: BLE001 - e.g. another trial's checkpoint in its directory: it alone fails
            on_end(i, e)
    for m in members:
        if m.position.history and m.hooks.resumed:
            m.hooks.resumed(m.position.history)
    saver = BackgroundSaver(_Checkpoints())
    for m in [m for m in members if m.position.epoch >= m.cfg.epochs]:  # trained before: only their end is left
        _finish(m, m.parts.model, datasets, on_end)
    active = [m for m in members if m.position.epoch < m.cfg.epochs]
    if len({(m.position.epoch, m.position.step) for m in active}) > 1:
        # Checkpoints are written together, so this takes a damaged one; start them over together.
        log.warning("the members' newest good checkpoints are at different positions: they start again together")
        active = [_set_up_member(m.index, m.cfg, m.layout, m.hooks, member_options, shared, from_checkpoint=False)
                  for m in active]  # fmt: skip
    if not active:
        return
    engine = _Fused(active, compile_stack) if fuse else _Sequential(active)
    steps = len(train)
    while active:
        epoch, start_step = active[0].position.epoch, active[0].position.step
        sums = torch.stack([m.position.loss_sum for m in active])
        seen = active[0].position.seen
        schedule = [[lr_at(m.cfg, epoch * steps + step, steps) for step in range(steps)] for m in active]
        engine.schedule(schedule)
        started, images = time.perf_counter(), 0

        for step, batch in enumerate(train.epoch(epoch, start_step), start=start_step):
            losses = engine.step(batch, step)
            n = len(batch.labels)
            sums += losses * n
            seen += n
            images += n
            every = options.checkpoint_every_steps
            if every and (step + 1) % every == 0 and step + 1 < steps:
                for m in active:
                    m.position.step = step + 1
                _save(saver, engine, active, sums, seen, [lrs[step] for lrs in schedule], device, required=False)
                hold_if_asked(saver, epoch, step + 1, [m.layout.root for m in active])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - started
        lrs = [member_lrs[-1] for member_lrs in schedule]  # of the epoch's last step, as a trial alone logs
        results = engine.evaluate(test)
        going_on, ending, epoch_metrics = [], [], []
        for i, (m, (test_loss, test_error)) in enumerate(zip(active, results, strict=True)):
            train_loss = sums[i].item() / seen
            if not math.isfinite(train_loss):
                on_end(m.index, TrialDiverged(f"training loss is {train_loss} in epoch {epoch + 1} (lr {m.cfg.lr})"))
                continue
            metrics = {
                "epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss, "test_error": test_error,
                "lr": lrs[i], "images_per_s": images / train_seconds, "resident_share": resident_share(train),
                "tflops": m.parts.flops_per_image * images / train_seconds / 1e12,
                "epoch_seconds": time.perf_counter() - started,
            }  # fmt: skip
            if m.parts.peak_tflops:
                metrics["mfu"] = metrics["tflops"] / m.parts.peak_tflops
            member_compile = engine.compile_seconds if fuse else m.parts.compile_seconds
            if member_compile is not None:
                metrics["compile_seconds"] = member_compile
                m.parts.compile_seconds = None
            m.position.history.append(metrics)
            m.position.epoch, m.position.step = epoch + 1, 0
            epoch_metrics.append((m, metrics))
            (ending if m.position.epoch >= m.cfg.epochs else going_on).append(i)
        engine.compile_seconds = None
        kept = going_on + ending
        active = [active[i] for i in kept]
        engine.keep(kept)
        lrs = [lrs[i] for i in kept]
        sums, seen = torch.zeros(len(active), device=device), 0
        if active:
            _save(saver, engine, active, sums, seen, lrs, device, required=bool(ending))
        for m, metrics in epoch_metrics:
            if m.hooks.epoch:
                m.hooks.epoch(metrics)
        if ending:
            saver.wait()  # the last checkpoint is on disk before a member counts as trained
            done = list(range(len(going_on), len(kept)))
            for i in done:
                _finish(active[i], engine.member_model(i), datasets, on_end)
            active = active[: len(going_on)]
            engine.keep(list(range(len(going_on))))
    saver.wait()


def _save(saver: BackgroundSaver, engine: _Fused | _Sequential, active: list[Member], sums: torch.Tensor, seen: int,
          lrs: list[float], device: torch.device, *, required: bool) -> None:  # fmt: skip
    """Checkpoint every active member at its (common) position, in one background write."""
    for i, m in enumerate(active):
        m.position.loss_sum, m.position.seen = sums[i].clone(), seen  # where the next epoch starts from, too
    if saver.busy and not required:
        return  # it would be skipped: copy no member's state for it
    writes = []
    for i, m in enumerate(active):
        model_state, optimizer_state = engine.states(i, lrs[i])
        writes.append((m.checkpoints, checkpoint_state(m.cfg, model_state, optimizer_state, m.position, device)))
    saver.save(writes, active[0].position.epoch, active[0].position.step, required=required)


def _finish(member: Member, model: networks.Network, datasets: data.Datasets,
            on_end: Callable[[int, Outcome], None]) -> None:  # fmt: skip
    """A trained member's stages and picture; its outcome goes to ``on_end``, whatever it is."""
    parts = dataclasses.replace(member.parts, model=model, compiled=None)
    try:
        outcome = finish(member.cfg, parts, member.position, member.layout, datasets, member.checkpoints.problems,
                         member.hooks)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - this member failed; the group goes on
        outcome = e
    on_end(member.index, outcome)
