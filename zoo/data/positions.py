"""Where a training loader resumes: the marks the resume check (``zoo.train.resume.ResumeGuard``, above this layer)
leaves for a trainer's training loader (``zoo.data.loaders.ResumableLoader``), and the saved position in global samples.

The data layer owns this hand-over, so the loader reads it without importing train: ResumeGuard writes, the loader
takes. Keyed weakly by the trainer, so a finished trainer leaves nothing behind.
"""
from __future__ import annotations

import weakref
from typing import Any

# trainer -> the epoch whose remaining samples its training loader skips (set by ResumeGuard, taken by the loader)
_EPOCH_SKIPS: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
# trainer -> the checkpoint's loader position: Lightning hands it to the loader only when it builds the loader after
# the restore (not for an epoch-based schedule, whose length it counts on the loader before restoring)
_SAVED_POSITIONS: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


def skip_rest_of_epoch(trainer: Any, epoch: int) -> None:
    """Make ``trainer``'s training loader yield nothing more of ``epoch`` (the fit loop then starts the next one)."""
    _EPOCH_SKIPS[trainer] = int(epoch)


def take_epoch_skip(trainer: Any, epoch: int) -> bool:
    """Whether the rest of ``epoch`` is to be skipped (once: the mark is removed)."""
    if _EPOCH_SKIPS.get(trainer) != epoch:
        return False
    del _EPOCH_SKIPS[trainer]
    return True


def keep_saved_position(trainer: Any, state: dict[str, Any]) -> None:
    """Keep the checkpoint's training-loader position for ``trainer``'s next training iteration."""
    _SAVED_POSITIONS[trainer] = dict(state)


def take_saved_position(trainer: Any) -> dict[str, Any] | None:
    """The kept position (once: it is removed), or None."""
    return _SAVED_POSITIONS.pop(trainer, None)


def saved_samples(state: dict[str, Any], global_batch: int) -> int:
    """Global samples into its epoch of a saved loader position; a position that kept per-device ``batches``
    (checkpoints written before positions counted samples) is taken at ``global_batch``."""
    if "samples" in state:
        return int(state["samples"])
    return int(state.get("batches", 0)) * int(global_batch)
