"""BYOL's pure pieces: the regression loss and the learning-rate schedule (no state; the scaling rule is the kit's
``zoo.train.optim.scaled_lr``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.train.momentum import tau_schedule  # re-exported: the target decay lives with the EMA mixin
from zoo.train.optim import scaled_lr  # re-exported: the rule every method shares
from zoo.train.schedules import warmup_cosine

__all__ = ["byol_loss", "lr_schedule", "regression_loss", "scaled_lr", "tau_schedule"]


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||normalize(p) - normalize(z)||^2 = 2 - 2 cos(p, z)`` in [0, 4]; ``z`` gets no gradient.

    Computed in float32 so bf16 autocast does not round the cosine near 1 (where the loss lives late in training).
    """
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)  # stop-gradient: the target only provides regression targets
    return 2.0 - 2.0 * (p * z).sum(dim=-1)


def byol_loss(q1: torch.Tensor, q2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The symmetric BYOL loss: q1 predicts z2 and q2 predicts z1, summed, mean over the batch (range [0, 8])."""
    return (regression_loss(q1, z2) + regression_loss(q2, z1)).mean()


def lr_schedule(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` (BYOL, per step)."""
    return warmup_cosine(step, total_steps, warmup_steps, peak_lr, final=0.0, warmup_start="zero")
