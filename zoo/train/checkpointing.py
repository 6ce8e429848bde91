"""Checkpoint writing shared by every run: the atomic writer (``AtomicCheckpointIO``), the periodic ``last.ckpt``
(``RootCheckpoint``: every epoch end and every ``every_minutes``), what a run finds in its folder at the start
(``existing_checkpoints``) and the leftovers of killed writers it removes (``cleanup_stale_temp_files``)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from zoo.files import atomic_path
from zoo.errors import RunError

CHECKPOINT_EVERY_MINUTES = 30.0  # the default time between two periodic last.ckpt saves (trainer.checkpoint_every_minutes)


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, or torch's zip writer failing to write (``[enforce fail at inline_container.cc] ... file write
    failed``), which is what a full disk looks like through ``torch.save``."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "file write failed" in text
                                              or "No space left" in text)


def failed_sharded_save(exc: BaseException, tmp: Path, path: Path, rank0: bool) -> BaseException:
    """What a sharded save that failed (on any rank) raises: its temporary folder is removed (by rank 0; the previous
    ``last.ckpt`` was never touched) and a full disk becomes one ``RunError`` line saying the previous one is kept."""
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    # DCP's CheckpointException carries each rank's failure as text: look at the whole chain and its wording
    if any(_is_disk_full(c) or "No space left" in str(c) or "Disk quota" in str(c) for c in chain):
        return RunError(f"no space left on device writing {os.fspath(path)}; the previous checkpoint is kept. Free "
                        "some space and resume with --ckpt_path last")
    return exc


def checkpoint_folders(trainer: pl.Trainer) -> set[str]:
    """The folders the run's checkpoint callbacks write to (``<default_root_dir>/checkpoints`` by default)."""
    return {c.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
            for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)}


def cleanup_stale_temp_files(trainer: pl.Trainer) -> None:
    """Remove what a writer killed mid-write left in the checkpoint folders: ``.<name>.ckpt.*.tmp`` files and the
    ``.<name>.ckpt.<token>.tmp`` / ``.old`` folders of a sharded save (only called while this run holds the folder's
    ``RunLock``, so no live writer owns them)."""
    for folder in checkpoint_folders(trainer):
        if not os.path.isdir(folder):
            continue
        restore_interrupted_renames(folder)
        for tmp in [*Path(folder).glob(".*.ckpt.*.tmp"), *Path(folder).glob(".*.ckpt.*.old")]:
            try:
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
            except OSError:
                pass


def restore_interrupted_renames(folder: str) -> None:
    """A sharded save killed between moving ``last.ckpt`` aside (``.last.ckpt.<token>.old``) and renaming the new
    folder in: put the previous checkpoint back, so the cleanup that follows never deletes the only good one."""
    for old in Path(folder).glob(".*.ckpt.*.old"):
        name = old.name[1:].split(".ckpt.", 1)[0] + ".ckpt"
        target = Path(folder) / name
        if not os.path.lexists(target):
            try:
                old.rename(target)
            except OSError:
                pass


def existing_checkpoints(trainer: pl.Trainer) -> list[str]:
    """``last.ckpt`` files of the checkpoint callbacks (a finished or interrupted run in this folder)."""
    # exists, not isfile: the last.ckpt of a sharded (fsdp2) run is a folder
    return sorted(p for p in (os.path.join(f, "last.ckpt") for f in checkpoint_folders(trainer))
                  if os.path.lexists(p))


def remove_checkpoint(path: str) -> None:
    """Delete a ``last.ckpt``: a file, a link, or the folder of a sharded run."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def first_nonfinite(state_dict: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor in ``state_dict`` holding a NaN or Inf, else None."""
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a kill mid-write never truncates last.ckpt.

    Checkpoints whose weights hold NaN/Inf are refused, so a numerical fault never replaces the last good file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        bad = first_nonfinite(checkpoint.get("state_dict", {}))
        if bad is not None:
            # A NaN/Inf weight would make this file useless; refusing keeps the previous good one in place.
            raise FloatingPointError(f"refusing to write checkpoint {os.fspath(path)!r}: weight {bad!r} is NaN/Inf "
                                     f"(step {checkpoint.get('global_step')}); the previous checkpoint is kept. "
                                     "Lower the learning rate or resume from the kept checkpoint.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except BaseException as e:
            if _is_disk_full(e):
                raise RunError(f"no space left on device writing {os.fspath(path)}; the previous checkpoint is kept. "
                               "Free some space and resume with --ckpt_path last") from None
            raise

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` whatever the caller asks: a pickle that would run code raises
        ``UnsafeFileError`` naming what it tried to import, and nothing is executed."""
        from zoo.weights.safe_load import safe_torch_load

        return safe_torch_load(path, map_location=map_location or "cpu")


class RootCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose default folder is ``<default_root_dir>/checkpoints`` (not a per-version log folder),
    so ``--ckpt_path last`` and ``<root>/checkpoints/last.ckpt`` always name the same file; with ``save_last`` it
    keeps ``last.ckpt`` current at the last training batch of every epoch, every ``every_minutes`` of training and at
    the end of training, also with ``save_top_k=0``.

    Lightning's ModelCheckpoint writes "last" only right after a top-k save, so with ``save_top_k=0`` and no
    ``every_n_train_steps`` it wrote ``last.ckpt`` only when training ended: a crash lost the whole run. Its own
    ``train_time_interval`` excludes ``every_n_train_steps`` and ``every_n_epochs``; this timer combines with both.

    Args:
        every_minutes: minutes of training between two saves of ``last.ckpt`` at a batch end (None or 0: only at
            epoch ends and on ``every_n_train_steps``). The timer restarts at every save.
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False,
                 every_minutes: float | None = CHECKPOINT_EVERY_MINUTES, **kwargs: Any) -> None:
        # No last-v1.ckpt: a resumed run (whose last.ckpt was written by the preemption save) keeps writing last.ckpt.
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)
        if every_minutes is not None and not every_minutes >= 0:
            raise ValueError(f"every_minutes must be >= 0 (0: no timed saves), got {every_minutes}")
        self.every_minutes = every_minutes or None
        self._zoo_clock: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._zoo_clock = time.monotonic()
        # a resumed run starts from a checkpoint of this very step: nothing new to save before a step is taken
        self._last_global_step_saved = trainer.global_step

    def _save_last_if_due(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._zoo_clock = time.monotonic()  # any save of last.ckpt restarts the timer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The epoch's save is taken at its last batch end, not in on_train_epoch_end: a checkpoint written there
        # resumes with other data than the straight run's (tested), one written at the last batch end resumes exactly
        # (the loop state PreemptionCheckpoint saves in). Validation after it does not change the training state.
        last_batch = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        n = self._every_n_epochs or 1  # every_n_train_steps alone still keeps last.ckpt current at epoch ends
        due = last_batch and (trainer.current_epoch + 1) % n == 0
        if not due and self.every_minutes and self._zoo_clock is not None:
            if trainer.world_size == 1 or trainer.global_step % 16 == 0:
                # rank 0's clock decides for every rank (a save is collective); under DDP the broadcast is made
                # every 16 steps, not at every batch
                due = bool(trainer.strategy.broadcast(time.monotonic() - self._zoo_clock >= 60.0 * self.every_minutes))
        if due:
            self._save_last_if_due(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save ``last.ckpt`` at the end of training unless it already holds this step (Lightning's own end save
        happens only when nothing was saved before)."""
        self._save_last_if_due(trainer)

    def use_root(self, trainer: pl.Trainer) -> None:
        """Point an unset ``dirpath`` at ``<trainer.default_root_dir>/checkpoints``.

        ``ZooTrainer`` calls this when it is built: ``ckpt_path="last"`` is resolved before any callback's ``setup``,
        and with no folder yet it would look in a new log-version folder and silently start from scratch."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.use_root(trainer)  # a plain Lightning Trainer reaches here without ZooTrainer's __init__
        super().setup(trainer, pl_module, stage)
