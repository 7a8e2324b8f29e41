"""The trials' optimizers, each in its fastest form for the device: Lion, AdamW, SGD."""

from __future__ import annotations

from typing import Any

import torch
from lion_pytorch import Lion
from lion_pytorch.foreach import Lion as ForeachLion

from mlpgrid.grid.spec import TrialConfig


def _lion_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 lr: torch.Tensor, weight_decay: float, beta1: float, beta2: float) -> None:  # fmt: skip
    """Lion's update (Chen et al. 2023), the arithmetic of lion-pytorch's reference."""
    for p, g, m in zip(params, grads, exp_avgs, strict=True):
        p.mul_(1 - lr * weight_decay)
        p.sub_(lr * torch.sign(m * beta1 + g * (1 - beta1)))
        m.mul_(beta2).add_(g, alpha=1 - beta2)


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
        self._update = torch.compile(_lion_update, dynamic=False, fullgraph=True)
        self._lr: dict[int, torch.Tensor] = {}  # per parameter group

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
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
        options = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        if not cuda:
            return Lion(params, **options)
        return CompiledLion(params, **options) if compiled else ForeachLion(params, **options)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=cuda)
