"""Momentum (EMA) target networks: the cosine tau schedule and the mixin that keeps targets in step with the online
networks (BYOL's target; any method with a slow-moving teacher)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["MomentumMixin", "tau_schedule"]


def tau_schedule(step: int, total_steps: int, base: float) -> float:
    """Target decay ``1 - (1 - base) (cos(pi k / K) + 1) / 2``: ``base`` at step 0, 1 at the last step."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


class MomentumMixin:
    """Adds an EMA target to an ``ImagePretraining`` method: mix it in before the base (``class M(MomentumMixin,
    ImagePretraining)``), define ``momentum_pairs`` and a ``tau_base`` hyper-parameter.

    The base calls ``on_weights_updated`` right after every optimizer step that was not skipped, so the target moves
    from the *new* online weights with the tau of the step just taken, and a checkpoint written by any callback after
    that step already holds this step's EMA.
    """

    hparams: Any
    global_step: int
    trainer: Any

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs; each target's parameters follow its online module's by EMA."""
        raise NotImplementedError(f"{type(self).__name__} mixes in MomentumMixin but does not define momentum_pairs")

    def current_tau(self) -> float:
        """Target decay for the step about to be taken."""
        total = getattr(self, "total_steps", None) or int(self.trainer.estimated_stepping_batches)
        return tau_schedule(self.global_step, total, self.hparams.tau_base)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online, parameters only (batch-norm statistics stay the target's)."""
        for online, target in self.momentum_pairs():
            t, o = list(target.parameters()), list(online.parameters())
            torch._foreach_lerp_(t, o, 1.0 - tau)  # t <- tau * t + (1 - tau) * o, one fused op per pair

    def on_weights_updated(self) -> None:
        """EMA step with the tau of the optimizer step just taken."""
        super().on_weights_updated()  # type: ignore[misc]
        self.update_target(tau_schedule(self.trainer.global_step, self.total_steps, self.hparams.tau_base))

    def fused_step_scalars(self) -> dict[str, float]:
        """``compile="step"``: the tau of the step being taken (``global_step`` counts it only after the update, as
        in the eager ``optimizer_step`` hook)."""
        tau = tau_schedule(self.global_step, self.total_steps, self.hparams.tau_base)
        return {**super().fused_step_scalars(), "tau": tau}  # type: ignore[misc]

    def fused_weights_updated(self, scalars: dict[str, torch.Tensor]) -> None:
        """``compile="step"``: the EMA with tau as a device scalar, traced into the update graph."""
        super().fused_weights_updated(scalars)  # type: ignore[misc]
        weight = 1.0 - scalars["tau"]
        for online, target in self.momentum_pairs():
            for t, o in zip(target.parameters(), online.parameters()):
                t.lerp_(o, weight)

    def step_logs(self) -> dict[str, Any]:
        """The base's per-step logs plus the target decay."""
        return {**super().step_logs(), "train/tau": self.current_tau()}  # type: ignore[misc]
