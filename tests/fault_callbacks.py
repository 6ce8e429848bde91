"""Test-only callbacks that inject faults at a chosen step (importable by class path from ``zoo fit`` configs)."""
from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import torch


class SigtermAt(pl.Callback):
    """Send this process SIGTERM (what a preemptible VM gets) at the end of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class CrashAt(pl.Callback):
    """Die without any chance to save (like SIGKILL / power loss) when step ``step`` is about to start."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise ConnectionAbortedError(f"simulated hard crash before step {self.step}")


class PoisonAt(pl.Callback):
    """Make the loss of step ``step`` non-finite by filling the first online conv weight with ``value``.

    With ``restore=True`` the weight is put back after the step (a transient fault, for ``nan_policy: skip``).
    """

    def __init__(self, step: int, value: float = float("nan"), restore: bool = False) -> None:
        self.step, self.value, self.restore = step, value, restore
        self._saved: torch.Tensor | None = None

    @staticmethod
    def _weight(pl_module) -> torch.Tensor:
        return next(p for n, p in pl_module.named_parameters() if n.startswith("online_encoder"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            w = self._weight(pl_module)
            self._saved = w.detach().clone()
            with torch.no_grad():
                w.fill_(self.value)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.restore and self._saved is not None:
            with torch.no_grad():
                self._weight(pl_module).copy_(self._saved)
            self._saved = None
