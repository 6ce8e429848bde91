"""``nan_policy: skip`` for the image-pretraining base: snapshot everything a step can change before its first
micro-batch (parameters, EMA targets, buffers, optimizer state; preallocated, copied with foreach ops), check the
state after the update with one fused finiteness test and one host sync, and roll a bad step back so every rank
skips it together (DDP needs every rank to run backward: the skipped step's loss has an exactly-zero gradient)."""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from zoo.train.trainer import all_ranks

__all__ = ["NanSkipMixin"]


class NanSkipMixin:
    """The snapshot / check / roll-back half of the non-finite-step policy (``zoo.train.ssl.ImagePretraining`` decides
    when a step is skipped; ``_stepped`` says whether this one was)."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """``nan_policy: skip``: copy everything a step can change before its first micro-batch (see ``_snapshot``)."""
        if self.hparams.nan_policy == "skip" and batch_idx % self.trainer.accumulate_grad_batches == 0:
            self._take_snapshot()

    def _state_tensors(self) -> tuple[list[torch.Tensor], list[tuple[int, str]]]:
        """Parameters (online and any EMA target), buffers and the optimizer's tensor state, and the
        (id(param), key) of each optimizer-state tensor."""
        live = [p.detach() for p in self.parameters()] + list(self.buffers())
        keys: list[tuple[Any, str]] = []
        for opt in self.trainer.optimizers:
            for p, st in opt.state.items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        live.append(v)
                        keys.append((id(p), k))
        return live, keys

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        live, keys = self._state_tensors()
        snap = getattr(self, "_snap", None)
        if snap is not None and snap[1] == keys and all(a.shape == b.shape and a.dtype == b.dtype
                                                        for a, b in zip(snap[0], live)):
            torch._foreach_copy_(snap[0], live)  # preallocated: no allocation per step
        else:
            self._snap = ([t.clone() for t in live], keys)
        self._snap_other = [{p: {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                             for p, st in opt.state.items()} for opt in self.trainer.optimizers]

    @torch.no_grad()
    def _restore_snapshot(self) -> None:
        """Put parameters, EMA targets, buffers and optimizer state back to the start of the step."""
        saved, keys = self._snap
        live, now = self._state_tensors()
        n = len(live) - len(now)  # parameters and buffers come first, in a fixed order
        torch._foreach_copy_(live[:n], saved[:n])
        old = dict(zip(keys, saved[n:]))
        for opt, other in zip(self.trainer.optimizers, self._snap_other):
            for p in list(opt.state):
                if p not in other:  # state created by this step (first step of a parameter): remove it
                    del opt.state[p]
            for p, st in other.items():
                opt.state[p].update(st)
        for (p, k), t in zip(now, live[n:]):
            if (p, k) in old:
                t.copy_(old[(p, k)])

    def _check_finite_state(self) -> bool:
        """After the update: are all parameters, buffers and optimizer state finite? One fused check over foreach
        norms, one host sync; a step whose finite loss still drove a weight or a batch-norm variance to Inf (a huge
        lr) is rolled back and counted like a non-finite loss."""
        live, _ = self._state_tensors()
        floats = [t for t in live if t.is_floating_point()]
        norms = torch._foreach_norm(floats)
        ok = all_ranks(self, bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()))
        if not ok:
            self._restore_snapshot()
            self.nonfinite_steps = getattr(self, "nonfinite_steps", 0) + 1
            self.log("train/nonfinite_steps", float(self.nonfinite_steps))
            rank_zero_warn(f"step {self.global_step}: the update made weights, batch-norm statistics or optimizer "
                           f"state non-finite; rolled back and skipped (nan_policy: skip, {self.nonfinite_steps} so far)")
        return ok

    def _skipped_step_loss(self) -> torch.Tensor:
        """A loss whose gradient is exactly zero for every trainable parameter (its value may be NaN).

        Lightning refuses ``None`` from ``training_step`` under DDP, and every rank must run backward for the gradient
        all-reduce; ``on_before_optimizer_step`` then drops the gradients so the optimizer leaves everything as is.
        """
        return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """On a skipped step, remove the (zero) gradients: no weight decay, no momentum, no update at all."""
        if not self._stepped:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
