"""The trials' optimizers, each in its fastest form for the device: Lion, AdamW, SGD."""

from __future__ import annotations

from typing import Any

import torch
from lion_pytorch import Lion
from lion_pytorch.foreach import Lion as ForeachLion

from mlpgrid.grid.spec import TrialConfig


def lion_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, lr: torch.Tensor, weight_decay: Any,
                beta1: float, beta2: float) -> None:  # fmt: skip
    """Lion's update of one tensor (Chen et al. 2023), the arithmetic of lion-pytorch's reference.
    ``lr`` and ``weight_decay`` broadcast over ``p``: scalars for a trial alone, one value per
    member for a fused stack (:mod:`mlpgrid.training.fused`)."""
    p.mul_(1 - lr * weight_decay)
    p.add_(torch.sign(m * beta1 + g * (1 - beta1)) * -lr)
    m.mul_(beta2).add_(g, alpha=1 - beta2)


def adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
                 weight_decay: torch.Tensor, betas: tuple[float, float], eps: float, correction1: torch.Tensor,
                 correction2_sqrt: torch.Tensor) -> None:  # fmt: skip
    """``torch.optim.AdamW``'s update of one tensor, with its bias corrections given; for the
    fused stack, whose hyperparameters are per member (a trial alone uses torch's fused kernel)."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - betas[0])
    v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
    p.add_(-(lr / correction1) * m / (v.sqrt() / correction2_sqrt).add_(eps))


def sgd_update(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, lr: torch.Tensor, weight_decay: torch.Tensor,
               momentum: torch.Tensor) -> None:  # fmt: skip
    """``torch.optim.SGD``'s update of one tensor with L2 weight decay, for the fused stack (a
    trial alone uses torch's fused kernel); a zero buffer makes the first step's buffer the gradient."""
    buf.mul_(momentum).add_(g + weight_decay * p)
    p.add_(buf * -lr)


def _lion_updates(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  lr: torch.Tensor, weight_decay: float, beta1: float, beta2: float) -> None:  # fmt: skip
    for p, g, m in zip(params, grads, exp_avgs, strict=True):
        lion_update(p, g, m, lr, weight_decay, beta1, beta2)


class CompiledLion(torch.optim.Optimizer):
    """Lion whose update of all tensors is one ``torch.compile``'d function.

    Inductor fuses each tensor's update into one pass over weight, gradient and momentum, and
    launches the kernels of every tensor from one call: about a third of the time of
    lion-pytorch's foreach form on a B-12/Wi-1024. State and hyperparameters are
    lion-pytorch's (``exp_avg``; ``lr``, ``betas``, ``weight_decay``), so checkpoints move
    between the two. The learning rate enters as a device tensor, so changing it every step
    recompiles nothing and waits for nothing.
    """

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):  # fmt: skip
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})
        self._update = torch.compile(_lion_updates, dynamic=False, fullgraph=True)
        self._lr: dict[int, torch.Tensor] = {}  # per parameter group

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure: one update per step
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                for p in params:
                    if "exp_avg" not in self.state[p]:
                        self.state[p]["exp_avg"] = torch.zeros_like(p)
                exp_avgs = [self.state[p]["exp_avg"] for p in params]
                self._apply(i, group, params, [p.grad for p in params], exp_avgs)

    @torch.no_grad()
    def compile_now(self) -> None:
        """Compile the update on scratch copies of the parameters, leaving them untouched, so
        the first step does not pay for it (the copies look alike to the compiled code's guards)."""
        for i, group in enumerate(self.param_groups):
            params = [p.detach().clone().requires_grad_(p.requires_grad) for p in group["params"]]
            zeros = [torch.zeros_like(p) for p in params]
            self._apply(i, group, params, zeros, [z.clone() for z in zeros])

    def _apply(self, i: int, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
               exp_avgs: list[torch.Tensor]) -> None:  # fmt: skip
        lr = self._lr.setdefault(i, torch.zeros((), device=params[0].device))
        lr.fill_(group["lr"])
        beta1, beta2 = group["betas"]
        self._update(params, grads, exp_avgs, lr, group["weight_decay"], beta1, beta2)


def make_optimizer(cfg: TrialConfig, params: Any, device: torch.device, compiled: bool) -> torch.optim.Optimizer:
    """The trial's optimizer. On CUDA: fused AdamW and SGD, and Lion compiled when the model is
    (``compiled``) or in lion-pytorch's foreach form; on the CPU, lion-pytorch's reference Lion."""
    cuda = device.type == "cuda"
    if cfg.optimizer == "lion":
        options: dict[str, Any] = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        if not cuda:
            return Lion(params, **options)
        return CompiledLion(params, **options) if compiled else ForeachLion(params, **options)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=cuda)
