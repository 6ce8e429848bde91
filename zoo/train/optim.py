"""The optimizer kit every image method shares: LARS, the lr scaling rule, the optimizer spec (lars | sgd | adamw,
base lr, weight decay, exclusions, warmup + cosine) and its parameter groups.

A method never builds an optimizer itself: ``ImagePretraining`` turns its ``OptimizerSpec`` (the method's defaults,
overridden by the ``model.*`` keys a config sets) and the method's ``optimizer_groups()`` into the optimizer and the
per-step schedule here, and ``compile="step"`` runs the same update as tensor ops (``fused_update``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from zoo.errors import UsageError
from zoo.train.schedules import warmup_cosine

__all__ = ["LARS", "OPTIMIZERS", "OptimizerSpec", "build_optimizer", "fused_update", "lars_param_groups",
           "lars_update", "scaled_lr", "split_excluded"]

OPTIMIZERS = ("lars", "sgd", "adamw")


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of BYOL, SimSiam and Barlow Twins: ``base_lr * global_batch / 256``."""
    return base_lr * global_batch / 256.0


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) as in the BYOL and Barlow Twins released code.

    For each parameter not excluded: ``u = g + wd * w``; ``u *= eta * ||w|| / ||u||`` (1 when either norm is 0,
    no clipping); ``m = momentum * m + u``; ``w -= lr * m``. Excluded parameters (biases and batch-norm scale /
    offset, marked by a param group with ``exclude=True``) get neither weight decay nor the trust ratio.

    Args:
        params: parameters or param groups; a group may set ``exclude=True``.
        lr: learning rate (set per step by the schedule).
        momentum: heavy-ball momentum.
        weight_decay: decoupled into the gradient before the trust ratio.
        eta: trust coefficient.
        foreach: multi-tensor (``torch._foreach_*``) update; None picks it for CUDA parameters only. On a GPU a
            ResNet-50 BYOL's ~320 tensors x ~10 small kernels each would cost milliseconds of launch overhead per
            step; on a CPU the per-tensor loop is faster (25.9 vs 33.4 ms for a ResNet-18 BYOL's 16.4M parameters,
            2 threads), since it runs every pass over a tensor while that tensor is in cache.
    """

    def __init__(self, params: Iterable, lr: float = 0.2, momentum: float = 0.9, weight_decay: float = 1.5e-6,
                 eta: float = 1e-3, foreach: bool | None = None) -> None:
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, exclude=False,
                                      foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every parameter with a gradient (no host sync: trust ratios stay on the device)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:  # first step: m = 0 * momentum + u
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            foreach = group.get("foreach")
            if foreach is None:
                foreach = params[0].is_cuda
            if foreach:
                _lars(params, [p.grad for p in params], bufs, group)
            else:  # the same formula on one tensor at a time
                for p, buf in zip(params, bufs):
                    _lars([p], [p.grad], [buf], group)
        return loss


def lars_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], group: dict,
                lr: torch.Tensor) -> None:
    """One LARS update of a param group with the lr as a device scalar (``compile="step"``: no recompile per lr)."""
    _lars(params, grads, bufs, group, lr)


def _lars(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], group: dict,
          lr: torch.Tensor | None = None) -> None:
    """``u = g + wd w``, ``u *= eta ||w|| / ||u||`` (adapted group), ``m = momentum m + u``, ``w -= lr m``."""
    updates = grads
    if not group["exclude"]:
        wd = group["weight_decay"]
        updates = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(updates))
        trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(updates, list(trust.unbind(0)))
    torch._foreach_mul_(bufs, group["momentum"])
    torch._foreach_add_(bufs, updates)
    if lr is None:
        torch._foreach_add_(params, bufs, alpha=-group["lr"])
    else:
        torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))


def _sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], group: dict,
                lr: torch.Tensor) -> None:
    """torch's SGD (momentum, no dampening, no Nesterov) as tensor ops; a zero buffer makes the first step
    ``m = d`` exactly as SGD's ``m = clone(d)``."""
    if group["dampening"] or group["nesterov"] or group["maximize"]:
        raise UsageError("model.compile: step implements plain momentum SGD only (no dampening, Nesterov or maximize)")
    d = torch._foreach_add(grads, params, alpha=group["weight_decay"]) if group["weight_decay"] else grads
    torch._foreach_mul_(bufs, group["momentum"])
    torch._foreach_add_(bufs, d)
    torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))


_FUSED = {"lars": lars_update, "sgd": _sgd_update}


def fused_update(name: str, groups: list[tuple[list, list, list, dict]], lrs: torch.Tensor) -> None:
    """``compile="step"``: the ``name`` optimizer's update of each (params, grads, momentum buffers, group), the lr
    of group ``i`` as the device scalar ``lrs[i]``."""
    update = _FUSED.get(name)
    if update is None:
        raise UsageError(f"model.optimizer={name!r} has no fused update, so model.compile: step is not available for "
                         f"it (only {sorted(_FUSED)}); use model.compile: true (per-view forward) instead")
    for i, (params, grads, bufs, group) in enumerate(groups):
        if params:
            update(params, grads, bufs, group, lrs[i])


def split_excluded(params: Iterable[torch.nn.Parameter]) -> tuple[list, list]:
    """(adapted, excluded) trainable parameters: any 1-D parameter is a bias or a normalisation scale / offset
    in the networks these methods use, and gets neither weight decay nor LARS adaptation."""
    adapted, excluded = [], []
    for p in params:
        if p.requires_grad:
            (excluded if p.ndim <= 1 else adapted).append(p)
    return adapted, excluded


def lars_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> list[dict]:
    """LARS groups of ``named_params``: adapted weights, then excluded biases and norm parameters."""
    adapted, excluded = split_excluded(p for _, p in named_params)
    return [{"params": adapted, "exclude": False}, {"params": excluded, "exclude": True}]


@dataclass(frozen=True)
class OptimizerSpec:
    """How a method is optimised; the ``model.*`` keys of the same names override a method's defaults.

    Args:
        optimizer: ``lars`` | ``sgd`` | ``adamw``.
        base_lr: lr per 256 images; the peak lr is ``base_lr * global_batch / 256``.
        weight_decay: weight decay (LARS: added to the gradient before the trust ratio; AdamW: decoupled).
        momentum: LARS / SGD momentum; AdamW's beta1.
        lars_eta: LARS trust coefficient.
        exclude_bias_norm: biases and normalisation parameters (1-D) get no weight decay and no LARS adaptation.
        excluded_lr_scale: lr multiplier of those excluded parameters (Barlow Twins: 0.0048 / 0.2).
        warmup_epochs: linear lr warmup from 0 in epochs (``warmup_steps`` overrides it).
        warmup_steps: linear lr warmup in optimizer steps, if set.
        final_lr_ratio: the cosine decays to ``final_lr_ratio * peak`` at the last step.
    """

    optimizer: str = "lars"
    base_lr: float = 0.2
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    lars_eta: float = 1e-3
    exclude_bias_norm: bool = True
    excluded_lr_scale: float = 1.0
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None
    final_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        finite = math.isfinite
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"model.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (finite(self.base_lr) and self.base_lr > 0):
            raise UsageError(f"model.base_lr must be positive, got {self.base_lr}")
        if not (finite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"model.weight_decay must be >= 0, got {self.weight_decay}")
        if not (finite(self.momentum) and 0.0 <= self.momentum < 1.0):
            raise UsageError(f"model.momentum must be in [0, 1), got {self.momentum}")
        if not (finite(self.lars_eta) and self.lars_eta > 0):
            raise UsageError(f"model.lars_eta (LARS trust coefficient) must be positive, got {self.lars_eta}")
        if not (finite(self.excluded_lr_scale) and self.excluded_lr_scale >= 0):
            raise UsageError(f"model.excluded_lr_scale must be >= 0, got {self.excluded_lr_scale}")
        if not (finite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise UsageError(f"model.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UsageError(f"model.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (finite(self.final_lr_ratio) and 0.0 <= self.final_lr_ratio <= 1.0):
            raise UsageError(f"model.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The spec's field names (the ``model.*`` keys it owns)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides: Any) -> "OptimizerSpec":
        """This spec with the given (not None) fields replaced, checked again."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def build_optimizer(spec: OptimizerSpec, groups: list[dict], peak_lr: float, total_steps: int, warmup_steps: int
                    ) -> tuple[Optimizer, Callable[[int], float] | list[Callable[[int], float]]]:
    """The optimizer over ``groups`` and its per-group lr factors for ``LambdaLR`` (warmup from 0, then cosine to
    ``final_lr_ratio``; a group with ``constant_after_warmup=True`` stays at its peak after the warmup).

    A group may set ``weight_decay`` (e.g. 0 for a classifier); with ``exclude_bias_norm`` each group is split into
    its adapted weights and its excluded biases / norm parameters (LARS ``exclude=True``, no weight decay, lr times
    ``excluded_lr_scale``), adapted first, in the groups' order.
    """
    out, constant = [], []
    for g in groups:
        g = dict(g)
        keep = bool(g.pop("constant_after_warmup", False))
        params = list(g.pop("params"))
        if spec.exclude_bias_norm:
            adapted, excluded = split_excluded(params)
            parts = [(adapted, {}), (excluded, {"exclude": True, "lr": peak_lr * spec.excluded_lr_scale})]
        else:
            parts = [([p for p in params if p.requires_grad], {})]
        for ps, extra in parts:
            group = {"params": ps, **g, **extra}
            if spec.optimizer == "lars":
                group.setdefault("exclude", False)
            elif group.pop("exclude", False):
                group["weight_decay"] = 0.0  # LARS skips an excluded group's decay by itself; SGD / AdamW are told
            out.append(group)
            constant.append(keep)
    if spec.optimizer == "lars":
        opt: Optimizer = LARS(out, lr=peak_lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                              eta=spec.lars_eta)
    elif spec.optimizer == "sgd":
        opt = torch.optim.SGD(out, lr=peak_lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    else:
        opt = torch.optim.AdamW(out, lr=peak_lr, betas=(spec.momentum, 0.999), weight_decay=spec.weight_decay)

    def decayed(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup_steps, 1.0, final=spec.final_lr_ratio)

    def held(step: int) -> float:  # warmup, then the peak for good: final == peak
        return warmup_cosine(step, total_steps, warmup_steps, 1.0, final=1.0)

    factors = [held if keep else decayed for keep in constant]
    return opt, (decayed if not any(constant) else factors)
