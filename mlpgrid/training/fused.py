"""K models of one shape trained as one: weights stacked, one batched kernel per layer.

:class:`StackedMLP` holds K copies of a model's parameters (any of :mod:`mlpgrid.models.networks`),
each stacked along a new first dimension, and computes all K members' logits for one batch with
the model's own forward vectorised over the members (``torch.func.vmap``). Its parameters are
the model's, in the model's order, so a member's weights go to and from an ordinary
``state_dict`` by slicing.

:class:`StackedOptimizer` applies Lion, AdamW or SGD to the stacked parameters with every
member's own learning rate, weight decay and momentum, with the arithmetic of the
optimizers a trial uses alone; a member's state goes to and from that optimizer's ordinary
``state_dict``, so each member's checkpoint is the one it would write alone.

:class:`Fused` is the training loop's engine for fused members (see
:class:`mlpgrid.training.loop.Engine`).

:func:`member_losses` is the loss of each member (its own label smoothing, MixUp as the batch
says), :func:`clip_members` clips each member's gradient norm on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlpgrid import policy
from mlpgrid.data.loader import Batch, Loader
from mlpgrid.grid.spec import TrialConfig
from mlpgrid.models.architecture import ModelConfig
from mlpgrid.models.networks import Network, build
from mlpgrid.training.optim import adamw_update, lion_update, sgd_update
from mlpgrid.training.setup import DataParts, Model
from mlpgrid.training.step import autocast, compile_for_training, soft_target_losses


class StackedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, members: list[Network]):
        super().__init__()
        if not policy.stacks(cfg):
            raise ValueError("batch normalisation keeps statistics per member: it does not stack")
        self.cfg = cfg
        self.names = [name for name, _ in members[0].named_parameters()]
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([dict(m.named_parameters())[name].detach() for m in members]))
            for name in self.names
        )
        self._template = build(cfg).to("meta")  # the computation; its weights come from ``stacked``

    @property
    def members(self) -> int:
        return self.stacked[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> every member's logits (K, B, classes): the MLP's own forward,
        vectorised over the members by ``torch.func.vmap`` (each layer one batched multiply;
        measured faster than hand-written batched matmuls: benchmarks/groups.py)."""
        params = dict(zip(self.names, self.stacked, strict=True))
        return torch.func.vmap(self._member_forward, in_dims=(0, None))(params, x)

    def _member_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self._template, params, (x,))

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s weights as an ordinary MLP ``state_dict``."""
        return {name: p[i].detach().clone() for name, p in zip(self.names, self.stacked, strict=True)}

    def member_model(self, i: int) -> Network:
        model = build(self.cfg).to(self.stacked[0].device)
        model.load_state_dict(self.member_state(i))
        return model

    @torch.no_grad()
    def keep(self, members: list[int]) -> None:
        """Only ``members`` (indices) go on; the others leave the stack.

        The stack gets new parameters rather than new data in the old ones: torch.compile's
        guards see a new shape on a new parameter and compile that graph again, where an old
        parameter given a new shape ran the old graph on it (torch 2.11 on an H200).
        """
        self.stacked = nn.ParameterList(nn.Parameter(p.detach()[members].clone()) for p in self.stacked)


def member_losses(logits: torch.Tensor, batch: Any, label_smoothing: torch.Tensor) -> torch.Tensor:
    """Each member's cross-entropy (K,) with its own label smoothing (K,): as
    ``F.cross_entropy(..., label_smoothing=s)`` of each member alone, MixUp-weighted when mixed
    (:func:`~mlpgrid.training.step.soft_target_losses`, the loss of a compiled trial alone)."""
    per_example = soft_target_losses(logits, batch.labels, batch.mixed_labels, batch.lam, label_smoothing[:, None])
    return per_example.mean(-1)


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) values shaped to broadcast over a stacked tensor ``like`` (K, ...)."""
    return values.view(-1, *[1] * (like.dim() - 1))


@torch.no_grad()
def clip_members(params: Sequence[torch.Tensor], clip: torch.Tensor) -> None:
    """Clip each member's gradient to norm ``clip`` (K,; 0 = no clipping), as
    ``torch.nn.utils.clip_grad_norm_`` does for a trial alone."""
    grads = [_grad(p) for p in params]
    norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    factor = torch.where(clip > 0, (clip / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
    for g in grads:
        g.mul_(_per_member(factor, g))


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None, "a step's backward pass comes first"
    return p.grad


def _update(kind: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: list[list[torch.Tensor]],
            lr: torch.Tensor, weight_decay: torch.Tensor, momentum: torch.Tensor, betas: tuple[float, float],
            eps: float, steps: torch.Tensor) -> None:  # fmt: skip
    """One step of every stacked parameter with the updates of :mod:`mlpgrid.training.optim`;
    hyperparameters (K,) per member, ``steps`` taken (this one included) for AdamW's bias
    corrections."""
    b1, b2 = betas
    if kind == "adamw":
        correction1, correction2_sqrt = 1 - b1**steps, (1 - b2**steps).sqrt()
    for p, g, state in zip(params, grads, states, strict=True):
        lr_, wd = _per_member(lr, p), _per_member(weight_decay, p)
        if kind == "lion":
            lion_update(p, g, state[0], lr_, wd, b1, b2)
        elif kind == "adamw":
            adamw_update(p, g, state[0], state[1], lr_, wd, betas, eps, correction1, correction2_sqrt)
        else:
            sgd_update(p, g, state[0], lr_, wd, _per_member(momentum, p))


class StackedOptimizer:
    """One optimizer (``lion``, ``adamw`` or ``sgd``) over stacked parameters, with per-member
    hyperparameters: ``lr`` is set before each step, ``weight_decay`` and ``momentum`` are fixed.
    ``compiled``: the update of all parameters is one compiled function (as
    :class:`~mlpgrid.training.optim.CompiledLion` is for a compiled trial alone)."""

    SLOTS = {"lion": ("exp_avg",), "adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}

    def __init__(self, kind: str, params: list[nn.Parameter], weight_decay: list[float], momentum: list[float],
                 betas: tuple[float, float], eps: float = 1e-8, *, compiled: bool = False):  # fmt: skip
        self.kind, self.params, self.betas, self.eps = kind, params, betas, eps
        device = params[0].device
        self.weight_decay = torch.tensor(weight_decay, dtype=torch.float32, device=device)
        self.momentum = torch.tensor(momentum, dtype=torch.float32, device=device)
        self.lr = torch.zeros(len(weight_decay), dtype=torch.float32, device=device)
        self.steps = 0
        # The same count on the device, where the update reads it: a copy from the host each
        # step would make the host wait for the device.
        self.steps_on_device = torch.zeros((), dtype=torch.float32, device=device)
        self.started = False  # whether the state holds anything: a step taken, or a member's state loaded
        self.state = [{slot: torch.zeros_like(p) for slot in self.SLOTS[kind]} for p in params]
        self._update = torch.compile(_update, dynamic=False) if compiled else _update

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        self.started = True
        self.steps_on_device += 1
        self._update(self.kind, self.params, [_grad(p) for p in self.params], [list(s.values()) for s in self.state],
                     self.lr, self.weight_decay, self.momentum, self.betas, self.eps, self.steps_on_device)  # fmt: skip

    # --- the members' ordinary optimizer state -----------------------------------------------

    def member_state(self, i: int, template: dict[str, Any]) -> dict[str, Any]:
        """Member ``i``'s state as the ``state_dict`` of the optimizer it uses alone, whose
        ``param_groups`` (its hyperparameters) are given in ``template``."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        if self.started:
            for index, slots in enumerate(self.state):
                if self.kind == "sgd" and self.momentum[i] == 0:
                    continue  # SGD without momentum keeps no state
                state[index] = {name: t[i].detach().clone() for name, t in slots.items()}
                if self.kind == "adamw":
                    state[index]["step"] = torch.tensor(float(self.steps))
        return {"state": state, "param_groups": template["param_groups"]}

    @torch.no_grad()
    def load_member(self, i: int, saved: dict[str, Any]) -> None:
        """Member ``i``'s state from the ``state_dict`` of its own optimizer."""
        for index, slots in enumerate(self.state):
            found = saved["state"].get(index, {})
            for name, t in slots.items():
                t[i] = found.get(name, 0)
            if "step" in found:  # AdamW's, for its bias corrections
                self.steps = int(found["step"])
        self.steps_on_device.fill_(self.steps)
        self.started = self.started or bool(saved["state"])

    def keep(self, members: list[int], params: list[nn.Parameter]) -> None:
        """Only ``members`` (indices) go on, whose stacked parameters are now ``params``."""
        self.params = params
        self.weight_decay, self.momentum, self.lr = (
            t[members].clone() for t in (self.weight_decay, self.momentum, self.lr)
        )
        self.state = [{name: t[members].clone() for name, t in slots.items()} for slots in self.state]


class Fused:
    """Members' weights stacked and stepped at once (:class:`StackedMLP`, :class:`StackedOptimizer`);
    the members' own models (``models``, set up and resumed as alone) hand over their state."""

    def __init__(self, cfgs: list[TrialConfig], models: list[Model], parts: DataParts, compile: bool):
        lead = cfgs[0]
        self.device = parts.device
        self.model = StackedMLP(lead.model_config(), [m.network for m in models])
        betas = models[0].optimizer.param_groups[0].get("betas", (0.9, 0.99))
        self.optimizer = StackedOptimizer(lead.optimizer, list(self.model.stacked), [c.weight_decay for c in cfgs],
                                          [c.momentum for c in cfgs], betas, compiled=compile)  # fmt: skip
        self.templates = []  # each member's optimizer state_dict, for its hyperparameters
        for i, m in enumerate(models):
            saved = m.optimizer.state_dict()
            self.optimizer.load_member(i, saved)
            self.templates.append({"param_groups": saved["param_groups"]})
        self.label_smoothing = self._per_member([c.label_smoothing for c in cfgs])
        self.clip_grads = [c.clip_grad for c in cfgs]  # on the host: asking the device would wait for it
        self.clip = self._per_member(self.clip_grads)
        self.lrs: torch.Tensor | None = None  # (members, steps of the epoch)
        self.batch_size = lead.batch_size
        self.example = (self.batch_size, *parts.image_shape), parts.train.out_dtype  # a full batch's
        self.compiled: nn.Module | None = None
        self.compile_seconds: float | None = None
        if compile:
            # The stack compiles once for each number of members it has (see keep), up to
            # MAX_MEMBERS graphs of each function; torch.compile runs a function eagerly past
            # its recompile limit, and this worker's earlier groups count against it.
            torch.compiler.reset()
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, policy.MAX_MEMBERS)
            self._compile()

    def _compile(self) -> None:
        """Compile the stack for its members now; the seconds it took count until logged."""
        shape, dtype = self.example
        self.compiled, seconds = compile_for_training(self.model, torch.zeros(shape, dtype=dtype, device=self.device))
        self.compile_seconds = (self.compile_seconds or 0.0) + seconds

    def _per_member(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def begin_epoch(self, lrs: list[list[float]]) -> None:
        """Each member's learning rate at every step of the coming epoch, copied to the device
        once (a copy from the host every step would make the host wait for the device each
        step, as would anything read back from it: the step only queues work); the stack in
        training mode."""
        self.lrs = torch.tensor(lrs, dtype=torch.float32).to(self.device)
        self.model.train()

    def step(self, batch: Batch, step: int) -> torch.Tensor:
        assert self.lrs is not None, "begin_epoch() comes before the epoch's steps"
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
        self.model.eval()
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

    def member_model(self, i: int) -> Network:
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
