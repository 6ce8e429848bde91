"""``compile="step"``: the whole image-pretraining step as two compiled graphs, without a host sync in ``skip`` mode.

Graph 1 (``WholeStep.forward``): both augmented views from per-sample parameter tensors, the method's online and
target forwards, its loss, the online classifier, top-1 and a finite flag; AOTAutograd compiles its backward too.
Between the graphs ``manual_backward`` runs the backward through the strategy (DDP all-reduces the gradients there).
Graph 2 (``WholeStep.update``): the method's optimizer update (LARS, SGD) as ``foreach``-style tensor ops with the
learning rates as a device tensor, then its ``on_weights_updated`` work (the EMA, tau as a tensor), and a finite flag
over the new state. Graph 3 (``WholeStep.restore``, ``nan_policy: skip`` only): every parameter, buffer and optimizer
state tensor is put back to the step's snapshot where the flag says the step was not finite (``torch.where``, no
branch), so a bad step leaves no trace and the host never has to look at the flag.

Host syncs per step: ``skip`` 0 (the skipped-step count is a device tensor, read once per epoch); ``stop`` 1 (raising
needs the host to see the flag; it is the same check as the eager step). Everything else the host needs (the lr and
tau of the step, the seeds of the views) is a pure function of the step number, so no value flows back from the
device. The views' parameters are drawn eagerly from the per-step generator (a handful of tiny ops), then enter
graph 1 as fixed-shape tensors, so changing draws never recompile.

Shapes: the graphs are compiled for the first training batch's shape. The training loader drops the last partial
batch (``drop_last``), so every batch of a run has that shape; a batch that still differs (undecodable JPEGs removed,
a list of variable-size images) runs the very same functions eagerly, counted in ``eager_steps``, instead of
recompiling.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["WholeStep", "masked_restore", "all_finite"]


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool: every element of every floating tensor is finite (max of |x| per tensor: no overflow of a sum)."""
    peaks = [t.detach().abs().amax().float() for t in tensors if t.is_floating_point() and t.numel()]
    if not peaks:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(peaks)).all()


def masked_restore(ok: torch.Tensor, live: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """``live <- live if ok else saved``, tensor by tensor, without a host-side branch on ``ok``."""
    with torch.no_grad():
        for t, s in zip(live, saved):
            t.copy_(torch.where(ok, t, s))


class WholeStep:
    """The compiled (and, for odd batches, eager) functions of one module's whole training step.

    Args:
        forward: ``(images, view_params, labels) -> (total, loss, cls_loss, top1, finite)``.
        update: ``(groups, lrs, scalars) -> finite flag of the new state``; mutates parameters and optimizer state.
        compile: compile the functions (False runs the same code eagerly: the reference of the equivalence test).
    """

    def __init__(self, forward: Callable, update: Callable, compile: bool = True) -> None:
        self.eager_forward, self.eager_update = forward, update
        if compile:
            self.forward = torch.compile(forward, fullgraph=True)
            self.update = torch.compile(update, fullgraph=True)
            self.restore = torch.compile(masked_restore, fullgraph=True)
        else:
            self.forward, self.update, self.restore = forward, update, masked_restore
        self.shape: tuple | None = None  # (shape, dtype) of the batch the graphs are compiled for
        self.eager_steps = 0

    def functions(self, images: Any) -> tuple[Callable, Callable]:
        """(forward, update) for this batch: the compiled ones for the compiled shape, the eager ones otherwise."""
        key = (tuple(images.shape), images.dtype) if torch.is_tensor(images) else None
        if self.shape is None and key is not None:
            self.shape = key
        if key is not None and key == self.shape:
            return self.forward, self.update
        self.eager_steps += 1
        return self.eager_forward, self.eager_update
