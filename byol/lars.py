"""LARS as in BYOL's released code: weight decay added to the gradient, then the trust ratio, then momentum."""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) with BYOL's conventions.

    For each parameter not excluded: ``u = g + wd * w``; ``u *= eta * ||w|| / ||u||`` (1 when either norm is 0,
    no clipping); ``m = momentum * m + u``; ``w -= lr * m``. Excluded parameters (biases and batch-norm scale /
    offset, marked by a param group with ``exclude=True``) get neither weight decay nor the trust ratio.

    Args:
        params: parameters or param groups; a group may set ``exclude=True``.
        lr: learning rate (set per step by the schedule).
        momentum: heavy-ball momentum.
        weight_decay: decoupled into the gradient before the trust ratio.
        eta: trust coefficient.
    """

    def __init__(self, params: Iterable, lr: float = 0.2, momentum: float = 0.9, weight_decay: float = 1.5e-6,
                 eta: float = 1e-3) -> None:
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if not group["exclude"]:
                    u = u.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else u.clone()
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    u = u.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(u)
                p.add_(buf, alpha=-group["lr"])
        return loss


def lars_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> list[dict]:
    """Split parameters into adapted (weights of convs / linears) and excluded (biases, norm scales and offsets).

    Any 1-D parameter is a bias or a normalisation parameter in the networks BYOL uses.
    """
    adapted, excluded = [], []
    for _, p in named_params:
        if p.requires_grad:
            (excluded if p.ndim <= 1 else adapted).append(p)
    return [{"params": adapted, "exclude": False}, {"params": excluded, "exclude": True}]
