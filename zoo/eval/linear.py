"""The linear classifier of the probe, trained two ways with one recipe (BYOL's linear evaluation):
SGD Nesterov 0.9, no weight decay, lr = base x batch / 256, per-step cosine to 0, zero-initialised layer.

- ``train_heads``: on extracted features (fast mode), every head of a pass (``HeadBank``) in one pass;
- ``zoo.eval.protocol_module.ProtocolHeads``: the same ``HeadBank`` behind the frozen encoder (protocol mode).
Both draw batches from ``EpochShuffleSampler(n, seed)``, so on a centre-crop-only probe they see the same batches.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.train.schedules import warmup_cosine

__all__ = ["scaled_lr", "cosine_factor", "make_optimizer", "ProbeHead", "HeadBank", "train_heads", "train_linear",
           "evaluate_heads", "divergence", "divergence_advice"]


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """lr = base x batch / 256 (BYOL's linear-evaluation rule)."""
    return base_lr * batch_size / 256


def cosine_factor(step: int, total_steps: int) -> float:
    """Cosine decay from 1 to 0 over ``total_steps`` (per step, no warmup)."""
    return warmup_cosine(step, total_steps, 0, 1.0, final=0.0)


def make_optimizer(params, base_lr: float, batch_size: int, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD Nesterov 0.9 without weight decay and its per-step cosine schedule."""
    opt = torch.optim.SGD(params, lr=scaled_lr(base_lr, batch_size), momentum=0.9, nesterov=True, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total_steps))


def zero_linear(num_features: int, num_classes: int) -> nn.Linear:
    """Zero-initialised linear layer: the probe is convex, so this start is as good as any and deterministic."""
    lin = nn.Linear(num_features, num_classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


FEATURE_NORMS = ("none", "batchnorm")


class ProbeHead(nn.Module):
    """The trained part of the probe: a zero-initialised linear layer, optionally after a parameter-free batch norm.

    ``feature_norm="none"`` is BYOL's protocol; ``"batchnorm"`` (BN without affine, as in MAE's linear probe) makes
    the probe insensitive to the feature scale, which matters for untrained or small encoders.
    """

    def __init__(self, num_features: int, num_classes: int, feature_norm: str = "none") -> None:
        super().__init__()
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm={feature_norm!r}: choose one of {FEATURE_NORMS}")
        self.norm = nn.BatchNorm1d(num_features, affine=False) if feature_norm == "batchnorm" else None
        self.linear = zero_linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        if self.norm is not None:
            # a batch of one has no batch statistics: use the running ones
            x = F.batch_norm(x, self.norm.running_mean, self.norm.running_var, None, None,
                             self.training and len(x) > 1, self.norm.momentum, self.norm.eps)
        return self.linear(x)


def _resident(train: Any, device: torch.device) -> torch.Tensor | None:
    """The rows read, copied to a GPU chunk by chunk in their stored dtype when they fit in half its free memory
    (batches are then gathered on the device); None on a CPU, where batches are gathered from the memory map."""
    if device.type != "cuda":
        return None
    need = len(train) * train.dim * train.feats.element_size()
    if need > torch.cuda.mem_get_info(device)[0] // 2:
        return None
    out = torch.empty(len(train), train.dim, dtype=train.feats.dtype, device=device)
    for pos in torch.arange(len(train)).split(train.chunk_rows()):  # never the whole set on the host at once
        out[pos.to(device)] = train.feats[train.rows[pos]].to(device)
    return out


class HeadBank(nn.Module):
    """The heads of one pass, trained together on each batch of features: one ``ProbeHead`` per base lr, in ONE SGD
    optimiser with a param group per head (its own lr; SGD's update is elementwise per tensor, so a head's weights
    equal those of a run of its lr alone, bit for bit) and one cosine schedule.

    ``masked[i]``: head i trains only on the rows the batch's ``fit`` mask keeps (the lr grid: train minus the
    held-out images, which ride along in the same batches for the final heads). A head whose gradient turns non-finite
    is frozen at its last finite weights (its grads dropped from then on) and reported as diverged: a NaN never
    reaches a checkpoint, and the decision is read from the all-reduced gradient, so every DDP rank takes it alike.
    """

    def __init__(self, num_features: int, num_classes: int, base_lrs: Sequence[float],
                 masked: Sequence[bool] | None = None, feature_norm: str = "none") -> None:
        super().__init__()
        self.base_lrs = [float(x) for x in base_lrs]
        self.masked = list(masked) if masked is not None else [False] * len(self.base_lrs)
        if len(self.masked) != len(self.base_lrs):
            raise ValueError(f"{len(self.masked)} masks for {len(self.base_lrs)} heads")
        self.heads = nn.ModuleList(ProbeHead(num_features, num_classes, feature_norm) for _ in self.base_lrs)
        # the step at which each head diverged (-1: never); a buffer, so checkpoints carry it
        self.register_buffer("diverged_at", torch.full((len(self.base_lrs),), -1, dtype=torch.long))
        self.last_losses = torch.zeros(len(self.base_lrs))

    def make_optimizer(self, batch_size: int, total_steps: int
                       ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """SGD Nesterov 0.9, no weight decay, one param group per head at lr = base x ``batch_size`` / 256, and the
        per-step cosine over ``total_steps`` (the same factor for every group)."""
        groups = [{"params": list(h.parameters()), "lr": scaled_lr(lr, batch_size)}
                  for h, lr in zip(self.heads, self.base_lrs)]
        opt = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True, weight_decay=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total_steps))

    def loss(self, x: torch.Tensor, y: torch.Tensor, fit: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the heads' cross-entropies on the batch (each head's gradient is its own loss's, exactly)."""
        losses = []
        for head, masked in zip(self.heads, self.masked):
            xi, yi = (x[fit], y[fit]) if masked and fit is not None else (x, y)
            logits = head(xi)
            # a batch with no row for this head still steps (zero gradient), so every head sees every step alike
            losses.append(F.cross_entropy(logits, yi) if len(yi) else logits.sum() * 0.0)
        stacked = torch.stack(losses)
        self.last_losses = stacked.detach()
        return stacked.sum()

    def drop_diverged(self, step: int) -> None:
        """Between backward and the optimiser step: freeze every head whose gradient is not finite (one host sync)."""
        live = [i for i in range(len(self.heads)) if int(self.diverged_at[i]) < 0]
        if live:
            ok = torch.stack([torch.stack([torch.isfinite(p.grad).all() for p in self.heads[i].parameters()
                                           if p.grad is not None] or [torch.ones((), dtype=torch.bool)]).all()
                              for i in live]).tolist()
            for i, good in zip(live, ok):
                if not good:
                    self.diverged_at[i] = step
        for i, head in enumerate(self.heads):
            if int(self.diverged_at[i]) >= 0:
                for p in head.parameters():
                    p.grad = None  # SGD leaves a parameter without a gradient untouched

    def reason(self, i: int) -> str | None:
        """Why head ``i`` diverged during training (None: it did not, or only ``divergence`` can tell)."""
        step = int(self.diverged_at[i])
        return None if step < 0 else f"non-finite gradient at step {step}"

    def finished(self) -> list[ProbeHead]:
        """The heads on the CPU in eval mode, each with ``last_loss`` and ``diverged_reason`` for ``divergence``."""
        out = []
        for i, head in enumerate(self.heads):
            head.last_loss = float(self.last_losses[i])
            head.diverged_reason = self.reason(i)
            out.append(head.cpu().eval())
        return out


def train_heads(train: Any, num_classes: int, base_lrs: Sequence[float], epochs: int, batch_size: int,
                seed: int = 0, device: str | torch.device = "cpu", feature_norm: str = "none",
                progress: bool = False, desc: str = "linear heads", masked: Sequence[bool] | None = None,
                heldout: torch.Tensor | None = None) -> list[ProbeHead]:
    """Fit one probe head per base lr on ``train`` (``Features``, memory-mapped is fine) in one pass: each batch is
    read once and shared by every head (a ``HeadBank``), so each equals a run of its lr alone. ``heldout`` (bool per
    row of ``train``) leaves those rows out of the heads ``masked`` marks (the lr grid's); the others see them."""
    from zoo.data.loaders import EpochShuffleSampler
    from zoo.progress import track

    device = torch.device(device)
    n = len(train)
    if n == 0:
        raise ValueError("no training features to fit the linear probe on")
    y = train.labels.to(device)
    keep = None if heldout is None else (~heldout.bool()).to(device)
    resident = _resident(train, device)
    bank = HeadBank(train.dim, num_classes, base_lrs, masked, feature_norm).to(device).train()
    steps = math.ceil(n / batch_size)
    opt, sched = bank.make_optimizer(batch_size, epochs * steps)
    sampler = EpochShuffleSampler(n, seed)

    def batches():
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(iter(sampler)))
            yield from order.split(batch_size)

    for step, idx in enumerate(track(batches(), desc, total=epochs * steps, enabled=progress)):
        rows = idx.to(device)
        x = resident[rows].float() if resident is not None else train.gather(idx, device)
        bank.loss(x, y[rows], None if keep is None else keep[rows]).backward()
        bank.drop_diverged(step)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return bank.finished()


def train_linear(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, base_lr: float, epochs: int,
                 batch_size: int, seed: int = 0, device: str | torch.device = "cpu", feature_norm: str = "none"
                 ) -> ProbeHead:
    """One head on in-memory features [N, D] (``train_heads`` with a single lr)."""
    from zoo.eval.store import Features

    train = Features(feats, labels, torch.arange(len(labels)))
    return train_heads(train, num_classes, [base_lr], epochs, batch_size, seed, device, feature_norm)[0]


@torch.no_grad()
def evaluate_heads(heads: Sequence[nn.Module], feats: Any, chunk: int | None = None) -> list[dict[int, float]]:
    """Top-1 / top-5 accuracy (percent) of each trained head on ``Features``, read ``chunk`` rows (default ~16 MiB)
    at a time."""
    hits = torch.zeros(len(heads), 2, dtype=torch.float64)
    labels = feats.labels
    for pos, x in feats.chunks(chunk):
        y = labels[pos]
        for i, head in enumerate(heads):
            logits = head.eval()(x)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            hits[i, 0] += top[:, :1].any(1).sum()
            hits[i, 1] += top.any(1).sum()
    n = max(len(feats), 1)
    return [{1: 100.0 * float(h[0]) / n, 5: 100.0 * float(h[1]) / n} for h in hits]


def divergence(head: nn.Module, last_loss: Any, num_classes: int) -> str | None:
    """Why a trained probe diverged, else None: a NaN/Inf weight, a NaN/Inf final loss, or a final loss above
    2 ln(num_classes) (twice the loss of the zero-initialised head it started from: it got worse, not better)."""
    if getattr(head, "diverged_reason", None):
        return head.diverged_reason
    if any(not bool(torch.isfinite(p).all()) for p in head.parameters()):
        return "weights NaN/Inf"
    if last_loss is None:
        return None
    loss = float(last_loss)
    if not math.isfinite(loss):
        return f"loss {loss}"
    if loss > 2 * math.log(max(num_classes, 2)):
        return f"loss {loss:.3g} > 2 ln({num_classes})"
    return None


def divergence_advice(diverged: dict[str, str], lr_grid: Sequence[float], feature_norm: str, steps: int,
                      picked: float | None = None) -> str | None:
    """One line for the diverged runs of a probe (``diverged``: base lr or "final" -> why): which, the likely cause
    and the flag to change; None when nothing diverged. With ``picked`` (the held-out pick) healthy, a diverged
    grid point is the grid doing its job: the line says the result stands."""
    if not diverged:
        return None
    lrs = [k for k in diverged if k != "final"]
    if picked is not None and "final" not in diverged and all(float(k) != float(picked) for k in lrs):
        return (f"base lr {', '.join(lrs)} diverged ({next(iter(diverged.values()))}); the picked base lr {picked:g} "
                "did not, so the result stands (that grid point only cost its pass)")
    which = ("every lr of the grid" if len(lrs) == len(lr_grid) > 1 else
             f"base lr {', '.join(lrs)}" if lrs else "the final run")
    if lrs and "final" in diverged:
        which += " and the final run"
    lowest = min(float(x) for x in lr_grid)
    lower = f"--lr_grid [{lowest / 100:g},{lowest / 30:g},{lowest / 10:g}]"
    if feature_norm == "none":
        cause, fix = ("a learning rate too high for these un-normalised features (their scale sets the step size)",
                      f"pass --feature_norm batchnorm (scale-free), or a lower grid such as {lower}")
    else:
        cause, fix = "a learning rate too high", f"pass a lower grid such as {lower}"
    if steps < 100:  # a short cosine ends before the loss settles from the first large steps
        fix += f", or more steps (only {steps}: raise --epochs)"
    return f"{which} diverged ({next(iter(diverged.values()))}); likely cause: {cause}; {fix}"
