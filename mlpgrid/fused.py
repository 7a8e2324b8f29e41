"""K models of one shape trained as one: weights stacked, one batched matmul per layer.

:class:`StackedMLP` holds K copies of an :class:`~mlpgrid.models.MLP`'s parameters, each
stacked along a new first dimension, and computes all K members' logits for one batch: the
first layer as one matrix multiply of the batch with every member's embedding side by side,
the later ones as batched multiplies (``torch.baddbmm``). Its parameters are the MLP's, in the
MLP's order, so a member's weights go to and from an ordinary MLP ``state_dict`` by slicing.

:class:`StackedOptimizer` applies Lion, AdamW or SGD to the stacked parameters with every
member's own learning rate, weight decay and momentum, with the arithmetic of the
optimizers a trial uses alone; a member's state goes to and from that optimizer's ordinary
``state_dict``, so each member's checkpoint is the one it would write alone.

:func:`member_losses` is the loss of each member (its own label smoothing, MixUp as the batch
says), :func:`clip_members` clips each member's gradient norm on its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlpgrid.models import MLP, MLPConfig


class StackedMLP(nn.Module):
    def __init__(self, cfg: MLPConfig, members: list[MLP]):
        super().__init__()
        if cfg.norm == "batchnorm":
            raise ValueError("batch normalisation keeps statistics per member: it does not stack")
        self.cfg = cfg
        self.names = [name for name, _ in members[0].named_parameters()]
        self.stacked = nn.ParameterList(
            nn.Parameter(torch.stack([dict(m.named_parameters())[name].detach() for m in members]))
            for name in self.names
        )
        self._index = {name: i for i, name in enumerate(self.names)}

    @property
    def members(self) -> int:
        return self.stacked[0].shape[0]

    def _p(self, name: str) -> torch.Tensor:
        return self.stacked[self._index[name]]

    def _linear(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """``z`` (K, B, in) through each member's own ``name`` layer: (K, B, out)."""
        weight, bias = self._p(f"{name}.weight"), self._p(f"{name}.bias")
        return torch.baddbmm(bias[:, None, :], z, weight.transpose(1, 2))

    def _norm(self, block: int, z: torch.Tensor) -> torch.Tensor:
        if self.cfg.norm == "none":
            return z
        weight, bias = self._p(f"blocks.{block}.norm.weight"), self._p(f"blocks.{block}.norm.bias")
        return F.layer_norm(z, (self.cfg.width,)) * weight[:, None, :] + bias[:, None, :]

    def _block(self, block: int, z: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        act = F.gelu if cfg.activation == "gelu" else F.relu
        x = self._norm(block, z) if cfg.norm_position == "pre" else z
        out = act(self._linear(f"blocks.{block}.fn.0", x))
        if cfg.expansion:
            out = self._linear(f"blocks.{block}.fn.3", out)
        out = z + out if cfg.skip else out
        return out if cfg.norm_position == "pre" else self._norm(block, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> every member's logits (K, B, classes)."""
        k, m = self.members, self.cfg.width
        weight, bias = self._p("embed.weight"), self._p("embed.bias")
        z = F.linear(x.flatten(1), weight.reshape(k * m, -1), bias.reshape(k * m))  # (B, K*m): one multiply
        z = z.view(len(x), k, m).transpose(0, 1)
        for block in range(self.cfg.depth):
            z = self._block(block, z)
        return self._linear("head", z)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s weights as an ordinary MLP ``state_dict``."""
        return {name: p[i].detach().clone() for name, p in zip(self.names, self.stacked, strict=True)}

    def member_model(self, i: int) -> MLP:
        model = MLP(self.cfg).to(self.stacked[0].device)
        model.load_state_dict(self.member_state(i))
        return model

    @torch.no_grad()
    def keep(self, members: list[int]) -> None:
        """Only ``members`` (indices) go on; the others leave the stack."""
        for p in self.stacked:
            p.data = p.data[members].clone()


def member_losses(logits: torch.Tensor, batch: Any, label_smoothing: torch.Tensor) -> torch.Tensor:
    """Each member's cross-entropy (K,) with its own label smoothing (K,): as
    ``F.cross_entropy(..., label_smoothing=s)`` of each member alone, MixUp-weighted when mixed."""
    logp = logits.float().log_softmax(-1)  # (K, B, C)
    smooth = -logp.mean(-1).mean(-1)  # what label smoothing spreads over the classes

    def loss(labels: torch.Tensor) -> torch.Tensor:
        nll = -logp.gather(-1, labels.expand(len(logp), -1)[..., None]).squeeze(-1).mean(-1)
        return (1 - label_smoothing) * nll + label_smoothing * smooth

    if batch.lam is None:
        return loss(batch.labels)
    return batch.lam * loss(batch.labels) + (1 - batch.lam) * loss(batch.mixed_labels)


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) values shaped to broadcast over a stacked tensor ``like`` (K, ...)."""
    return values.view(-1, *[1] * (like.dim() - 1))


@torch.no_grad()
def clip_members(params: list[torch.Tensor], clip: torch.Tensor) -> None:
    """Clip each member's gradient to norm ``clip`` (K,; 0 = no clipping), as
    ``torch.nn.utils.clip_grad_norm_`` does for a trial alone."""
    norm = torch.stack([p.grad.flatten(1).pow(2).sum(1) for p in params]).sum(0).sqrt()
    factor = torch.where(clip > 0, (clip / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
    for p in params:
        p.grad.mul_(_per_member(factor, p.grad))


class StackedOptimizer:
    """One optimizer (``lion``, ``adamw`` or ``sgd``) over stacked parameters, with per-member
    hyperparameters: ``lr`` is set before each step, ``weight_decay`` and ``momentum`` are fixed."""

    def __init__(self, kind: str, params: list[nn.Parameter], weight_decay: list[float], momentum: list[float],
                 betas: tuple[float, float], eps: float = 1e-8):  # fmt: skip
        self.kind, self.params, self.betas, self.eps = kind, params, betas, eps
        device = params[0].device
        self.weight_decay = torch.tensor(weight_decay, dtype=torch.float32, device=device)
        self.momentum = torch.tensor(momentum, dtype=torch.float32, device=device)
        self.lr = torch.zeros(len(weight_decay), dtype=torch.float32, device=device)
        self.steps = 0
        slots = {"lion": ("exp_avg",), "adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}[kind]
        self.state = [{slot: torch.zeros_like(p) for slot in slots} for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = self.betas
        for p, state in zip(self.params, self.state, strict=True):
            g, lr, wd = p.grad, _per_member(self.lr, p), _per_member(self.weight_decay, p)
            if self.kind == "lion":  # lion-pytorch's update
                m = state["exp_avg"]
                p.mul_(1 - lr * wd)
                p.add_(torch.sign(m * b1 + g * (1 - b1)) * -lr)
                m.mul_(b2).add_(g, alpha=1 - b2)
            elif self.kind == "adamw":  # torch.optim.AdamW's update
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / (1 - b2**self.steps) ** 0.5).add_(self.eps)
                p.add_(-(lr / (1 - b1**self.steps)) * m / denom)
            else:  # torch.optim.SGD's update, L2 weight decay
                d = g + wd * p
                buf = state["momentum_buffer"]
                buf.copy_(d if self.steps == 1 else buf * _per_member(self.momentum, p) + d)
                p.add_(buf * -lr)

    # --- the members' ordinary optimizer state -----------------------------------------------

    def member_state(self, i: int, template: dict[str, Any]) -> dict[str, Any]:
        """Member ``i``'s state as the ``state_dict`` of the optimizer it uses alone, whose
        ``param_groups`` (its hyperparameters) are given in ``template``."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        if self.steps:
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
            if "step" in found:
                self.steps = int(found["step"])
        if saved["state"] and self.kind != "adamw":
            self.steps = max(self.steps, 1)

    def keep(self, members: list[int]) -> None:
        self.weight_decay, self.momentum, self.lr = (
            t[members].clone() for t in (self.weight_decay, self.momentum, self.lr)
        )
        self.state = [{name: t[members].clone() for name, t in slots.items()} for slots in self.state]
