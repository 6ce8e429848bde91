"""Resuming in the middle of an epoch on another device count: the data position in global samples, checked.

A training loader's position (``zoo.data.loaders.ResumableLoader``) is ``{"epoch", "samples", "global_batch"}``:
samples of the epoch's order already trained on, counted over every rank. The order of an epoch and the split of each
global batch between the ranks (``EpochShuffleSampler``) make that count name the same images on any device count with
the same global batch (``data.batch_size`` x devices x nodes), so such a resume continues from the next global sample.
With another global batch the epoch cannot continue exactly (the position falls inside another run's steps, and the
loop counters count steps of the old size): ``ResumeGuard`` refuses it in one line, or, when asked
(``ZOO_RESUME_AT_NEXT_EPOCH=1`` or ``ResumeGuard(next_epoch=True)``), skips the rest of that epoch.
"""
from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from zoo.data.positions import keep_saved_position, saved_samples, skip_rest_of_epoch
from zoo.data.positions import take_epoch_skip, take_saved_position  # noqa: F401 - re-exported (the loader's side)
from zoo.errors import UsageError

NEXT_EPOCH_ENV = "ZOO_RESUME_AT_NEXT_EPOCH"


def loader_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The training loaders' saved positions in ``checkpoint`` (the list itself: editing it edits the checkpoint)."""
    states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
    return [s for s in states if isinstance(s, dict)] if isinstance(states, list) else []


def _global(geometry: dict[str, int] | None) -> int | None:
    if not geometry:
        return None
    return int(geometry.get("global_batch") or int(geometry["batch_size"]) * int(geometry["world_size"]))


class ResumeGuard(Callback):
    """Check a mid-epoch checkpoint's data position against this run's global batch.

    The checkpoint records the per-device batch size and device count (``KEY``); positions that counted per-device
    batches are converted to global samples with them (in place, before Lightning restores the loops), and the
    position is kept for the training loader, which Lightning never hands it when it built the loader before the
    restore (an epoch-based schedule: ``estimated_stepping_batches``). At the same
    global batch the resume goes ahead on any device count or per-device batch, and continues from the next global
    sample; at an epoch boundary it always does. With another global batch it is refused in one line naming the new
    and the saved values, unless ``next_epoch`` (or ``ZOO_RESUME_AT_NEXT_EPOCH=1``): then the rest of that epoch is
    skipped, said in one line, and training continues from the start of the next epoch.

    Args:
        next_epoch: with another global batch, skip the rest of the saved epoch instead of refusing.
    """

    KEY = "zoo_data_geometry"

    def __init__(self, next_epoch: bool = False) -> None:
        self.next_epoch = next_epoch

    @staticmethod
    def _geometry(trainer: pl.Trainer) -> dict[str, int] | None:
        batch = getattr(trainer.datamodule, "batch_size", None)
        if batch is None:
            return None
        world = int(trainer.world_size)
        return {"batch_size": int(batch), "world_size": world, "global_batch": int(batch) * world}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        geometry = self._geometry(trainer)
        if geometry is not None:
            checkpoint[self.KEY] = geometry

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved, now = checkpoint.get(self.KEY), self._geometry(trainer)
        old_global = _global(saved) or _global(now)
        for state in loader_states(checkpoint):
            if "samples" not in state and "batches" in state and old_global:
                state["samples"] = saved_samples(state, old_global)
                state["global_batch"] = old_global
                del state["batches"]
        states = loader_states(checkpoint)
        if len(states) == 1:
            keep_saved_position(trainer, states[0])
        position = next((s for s in states if s.get("samples")), None)
        if position is None or now is None:
            return  # at an epoch boundary the position means the same images whatever the batch
        old_global = int(position.get("global_batch") or old_global)
        if old_global == now["global_batch"]:
            return  # same global batch: continues from the same global sample on any device count
        epoch, samples = int(position.get("epoch", 0)), int(position["samples"])
        if self.next_epoch or os.environ.get(NEXT_EPOCH_ENV, "") not in ("", "0"):
            rank_zero_warn(f"resuming with a global batch of {now['global_batch']}, not the checkpoint's {old_global}: "
                           f"epoch {epoch} cannot continue exactly, so its remaining samples (after {samples}) are "
                           f"skipped and training continues from the start of epoch {epoch + 1}")
            skip_rest_of_epoch(trainer, epoch)
            return
        raise UsageError(self._refusal(epoch, samples, old_global, saved, now))

    @staticmethod
    def _refusal(epoch: int, samples: int, old_global: int, saved: dict[str, int] | None,
                 now: dict[str, int]) -> str:
        changed, where = [], f"{samples} samples into the epoch at a global batch of {old_global}"
        if saved:
            if int(saved["batch_size"]) != now["batch_size"]:
                changed.append(f"data.batch_size is {now['batch_size']} but the checkpoint was saved with "
                               f"{saved['batch_size']}")
            if int(saved["world_size"]) != now["world_size"]:
                changed.append(f"this run has {now['world_size']} device(s) but the checkpoint was saved with "
                               f"{saved['world_size']}")
            where = (f"{samples // old_global} batches of {saved['batch_size']} images on {saved['world_size']} "
                     f"device(s) ({where})")
        head = "; ".join(changed) or f"this run's global batch is {now['global_batch']}, the checkpoint's {old_global}"
        return (f"cannot resume in the middle of epoch {epoch}: {head}. Its position is {where}, which a global batch "
                f"of {now['global_batch']} (data.batch_size x devices x nodes) cannot continue exactly; resume with a "
                f"global batch of {old_global}, or set {NEXT_EPOCH_ENV}=1 to skip the rest of epoch {epoch} and "
                f"continue from the start of epoch {epoch + 1}")
