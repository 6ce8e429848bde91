"""Test-only callbacks that inject faults at a chosen step (importable by class path from ``zoo fit`` configs)."""
from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import torch

from zoo.data import ImageDataModule


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
    """Fill the first online conv weight with ``value`` (NaN by default) at step ``step``.

    ``at="start"``: before the step, so its loss is non-finite (``restore=True`` puts the weight back after the step:
    a transient fault, for ``nan_policy: skip``). ``at="end"``: after the step's update, before the checkpoint
    callbacks run, so the weights themselves are bad when a checkpoint is written.
    """

    def __init__(self, step: int, value: float = float("nan"), restore: bool = False, at: str = "start") -> None:
        self.step, self.value, self.restore, self.at = step, value, restore, at
        self.saved: torch.Tensor | None = None

    @staticmethod
    def weight(pl_module) -> torch.Tensor:
        return next(p for n, p in pl_module.named_parameters() if n.startswith("online_encoder"))

    def _poison(self, pl_module) -> None:
        w = self.weight(pl_module)
        self.saved = w.detach().clone()
        with torch.no_grad():
            w.fill_(self.value)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at == "start" and trainer.global_step == self.step:
            self._poison(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at == "end" and trainer.global_step == self.step:
            self._poison(pl_module)
        elif self.restore and self.saved is not None:
            with torch.no_grad():
                self.weight(pl_module).copy_(self.saved)
            self.saved = None


class InterruptAt(pl.Callback):
    """Raise KeyboardInterrupt (Ctrl-C) in the middle of step ``step``, before its update."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class SigtermInValidationAt(pl.Callback):
    """SIGTERM while the validation run after optimizer step ``step`` is in progress (first batch)."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == self.step and not self.sent and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class WaitForSignalAt(pl.Callback):
    """At step ``step``, create ``ready_file`` and wait (up to ``timeout`` s) for a signal from another process."""

    def __init__(self, step: int, ready_file: str, timeout: float = 120.0) -> None:
        self.step, self.ready_file, self.timeout = step, ready_file, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        if trainer.global_step != self.step:
            return
        open(self.ready_file, "w").close()
        end = time.monotonic() + self.timeout
        def signalled() -> bool:  # ZooTrainer defers the signal: it is pending until PreemptionCheckpoint saves
            return trainer.received_sigterm or getattr(trainer._signal_connector, "sigterm_pending", False)

        while not signalled() and time.monotonic() < end:
            time.sleep(0.05)


class BreakBufferAt(pl.Callback):
    """Fill the first batch-norm ``running_var`` with Inf just before the optimizer update of step ``step``: the loss
    of that step is finite, yet the step leaves a non-finite buffer (what a huge learning rate does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            name, buf = next((n, b) for n, b in pl_module.named_buffers() if n.endswith("running_var"))
            buf.fill_(float("inf"))


class SigtermIn(pl.Callback):
    """Send this process SIGTERM from hook ``hook`` at optimizer step ``step`` (once): anywhere a real signal may land
    -- before training (``on_train_start``), at a step's start, inside a step (``on_before_backward``,
    ``on_before_optimizer_step``), at its end from a callback that runs after ``PreemptionCheckpoint``."""

    HOOKS = ("on_train_start", "on_train_batch_start", "on_before_backward", "on_before_optimizer_step",
             "on_train_batch_end", "on_validation_batch_end", "on_train_epoch_start", "on_train_epoch_end",
             "on_save_checkpoint", "on_validation_start", "on_validation_end")

    def __init__(self, hook: str, step: int) -> None:
        if hook not in self.HOOKS:
            raise ValueError(f"hook must be one of {self.HOOKS}, got {hook!r}")
        self.hook, self.step, self.sent = hook, step, False

    def _maybe(self, trainer, name: str) -> None:
        if name == self.hook and trainer.global_step == self.step and not self.sent and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_start(self, trainer, pl_module):
        self._maybe(trainer, "on_train_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe(trainer, "on_train_batch_start")

    def on_before_backward(self, trainer, pl_module, loss):
        self._maybe(trainer, "on_before_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._maybe(trainer, "on_before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._maybe(trainer, "on_train_batch_end")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._maybe(trainer, "on_validation_batch_end")


    def on_train_epoch_start(self, trainer, pl_module):
        self._maybe(trainer, "on_train_epoch_start")

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe(trainer, "on_train_epoch_end")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):  # while a checkpoint is being written
        self._maybe(trainer, "on_save_checkpoint")

    def on_validation_start(self, trainer, pl_module):
        self._maybe(trainer, "on_validation_start")

    def on_validation_end(self, trainer, pl_module):
        self._maybe(trainer, "on_validation_end")


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose items carry their index as a third field (collated into the batch's ``path``)."""

    def __init__(self, ds) -> None:
        self.ds, self.classes = ds, ds.classes

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image, label = self.ds[i][:2]
        return image, label, str(i)


class IndexedDigits(ImageDataModule):
    """``ImageDataModule`` whose batches name the index of every image (``batch["path"]``)."""

    def _build(self, split: str):
        return _Indexed(super()._build(split))


class SeenSamples(pl.Callback):
    """Record the sample indices of every training batch as ``[global step (1-based), [indices]]`` and write them
    to ``folder/seen_rank<r>.json`` at the end of training (or of an interrupted fit)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.seen = folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append([trainer.global_step + 1, [int(p) for p in batch["path"]]])

    def _dump(self, trainer) -> None:
        import json

        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"seen_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.seen, f)

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._dump(trainer)


class SignalAt(pl.Callback):
    """Send this process ``signum`` (SIGUSR1: SLURM's pre-timeout signal) at the end of optimizer step ``step``, on
    rank ``rank`` only (None: every rank, as SLURM signals every task)."""

    def __init__(self, step: int, signum: str = "SIGUSR1", rank: int | None = None) -> None:
        self.step, self.signum, self.rank = step, signal.Signals[signum], rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)
