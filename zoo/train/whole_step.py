"""``compile="step"``: the whole image-pretraining step as two compiled graphs, without a host sync in ``skip`` mode.

Graph 1 (``WholeStep.forward``): both augmented views from per-sample parameter tensors, the method's
forwards, its loss, the linear classifier, top-1 and a finite flag; AOTAutograd compiles its backward too.
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
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from augment.params import ViewParams
from zoo.train.trainer import check_finite_loss

__all__ = ["WholeStep", "WholeStepMixin", "masked_restore", "all_finite"]


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
        backend: the ``torch.compile`` backend (a name or a callable, e.g. a graph-counting one in
            ``bench/graph_breaks.py``).
        fullgraph: a graph break is an error (the training default); False lets a profiler count the breaks instead.
    """

    def __init__(self, forward: Callable, update: Callable, compile: bool = True, backend: str | Callable = "inductor",
                 fullgraph: bool = True) -> None:
        self.eager_forward, self.eager_update = forward, update
        if compile:
            self.forward, self.update, self.restore = (torch.compile(f, fullgraph=fullgraph, backend=backend)
                                                       for f in (forward, update, masked_restore))
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


class WholeStepMixin:
    """The ``compile="step"`` training step of ``zoo.train.ssl.ImagePretraining`` (kept here to keep that file short);
    it uses the base's hooks (``view_params``, ``apply_views``, ``fused_*``) and its snapshot of the step's start."""

    def compiled_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """The whole training step of ``compile="step"`` (``zoo.train.whole_step``): the bench's entry point too.

        Same draws, loss, logs, lr/tau schedules, skip/stop semantics and checkpoint content as the eager step; the
        optimizer is stepped through Lightning with the gradients already consumed, so ``global_step``, the loops'
        progress and the strategy's hooks count the step as usual.
        """
        opt, sched = self.optimizers(), self.lr_schedulers()
        labels, images = batch["label"], batch["image"]
        opt.zero_grad(set_to_none=True)
        enough, rows = self._global_rows(len(labels))
        if not enough:
            rank_zero_warn(f"skipping step {self.global_step}: fewer than 2 decodable images in the batch")
            opt.step()  # no gradients: counts the step and changes nothing, as the eager skip
            sched.step()
            return None
        if self._whole_step is None:
            self._whole_step = WholeStep(self._step_forward, self._step_update)
        forward, update = self._whole_step.functions(images)
        params = self.view_params(images, self._generator(batch_idx), **rows)
        total, loss, cls_loss, top1, ok = forward(images, params, labels)
        skip = self.hparams.nan_policy == "skip"
        if not skip:
            check_finite_loss(self, total, "stop")  # raises: the one host sync of a "stop" step
        self.manual_backward(total)  # the strategy's backward: DDP all-reduces the gradients here
        raw = opt.optimizer
        lrs = self._device_scalars("lrs", [g["lr"] for g in raw.param_groups])
        values = self.fused_step_scalars()
        scalars = {k: self._device_scalars(k, [v])[0] for k, v in values.items()}
        groups = [(ps, [p.grad for p in ps], [raw.state[p]["momentum_buffer"] for p in ps],
                   {k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")})
                  for g in raw.param_groups for ps in [[p for p in g["params"] if p.grad is not None]]]
        ok_state = update(groups, lrs, scalars)
        logs = {"train/loss": loss, "train/cls_loss": cls_loss, f"train/{self.metric_prefix}_top1": top1,
                **self.step_logs()}
        if skip:  # no host sync: the flag selects, per tensor, the new state or the snapshot of the step's start
            ok = ok & ok_state
            if self.trainer.world_size > 1:  # all ranks keep or drop the step together
                flag = ok.to(torch.int32)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                ok = flag.bool()
            live, _ = self._state_tensors()
            self._whole_step.restore(ok, live, self._snap[0])
            self._nonfinite = self._nonfinite + (~ok).to(self._nonfinite.dtype)
            logs["train/nonfinite_steps"] = self._nonfinite
        self.log_dict(logs, prog_bar=True, sync_dist=False)
        opt.zero_grad(set_to_none=True)
        opt.step()  # gradients consumed: the optimizer changes nothing, Lightning counts the step
        sched.step()
        return total.detach()

    def _device_scalars(self, name: str, values: list[float]) -> torch.Tensor:
        """A preallocated float32 device tensor filled with ``values`` (fill_ launches a kernel; no host sync)."""
        bufs = self.__dict__.setdefault("_scalar_bufs", {})
        t = bufs.get(name)
        if t is None or t.device != self.device or len(t) != len(values):
            t = bufs[name] = torch.zeros(len(values), device=self.device)
        for i, v in enumerate(values):
            t[i].fill_(v)
        return t

    def _step_forward(self, images: Any, params: list[ViewParams], labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Graph 1: views, forwards, loss, classifier; (total, loss, cls_loss, top1, finite flag)."""
        with torch.no_grad():
            views = self.apply_views(images, params)
        if self._use_channels_last():
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        loss, h1 = self.compute_loss(self.forward_views(views))
        logits = self.probe_classifier(h1.detach())  # stop-gradient: the probe must not shape the encoder
        cls_loss = F.cross_entropy(logits.float(), labels)
        total = loss + cls_loss
        top1 = (logits.argmax(-1) == labels).float().mean()
        return total, loss.detach(), cls_loss.detach(), top1, torch.isfinite(total.detach())

    def _step_update(self, groups: list[tuple[list, list, list, dict]], lrs: torch.Tensor,
                     scalars: dict[str, torch.Tensor]) -> torch.Tensor:
        """Graph 2: optimizer update and EMA; the new state's finite flag (``skip``: ``_check_finite_state``)."""
        with torch.no_grad():
            self.fused_optimizer_update(groups, lrs)
            self.fused_weights_updated(scalars)
            if self.hparams.nan_policy != "skip":
                return torch.ones((), dtype=torch.bool, device=lrs.device)
            return all_finite(list(self.parameters()) + list(self.buffers()) + [b for g in groups for b in g[2]])
