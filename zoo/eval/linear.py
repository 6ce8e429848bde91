"""The linear classifier of the probe, trained two ways with one recipe (BYOL's linear evaluation):
SGD Nesterov 0.9, no weight decay, lr = base x batch / 256, per-step cosine to 0, zero-initialised layer.

- ``train_heads``: on extracted features (fast mode), every lr of the grid in one pass;
- ``LinearProbeModule``: a LightningModule over images with the frozen encoder in inference mode (protocol mode).
Both draw batches from ``EpochShuffleSampler(n, seed)``, so on a centre-crop-only probe they see the same batches.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from zoo.train.schedules import warmup_cosine

__all__ = ["scaled_lr", "cosine_factor", "make_optimizer", "ProbeHead", "train_heads", "train_linear", "evaluate_heads",
           "LinearProbeModule", "divergence", "divergence_advice"]


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


def train_heads(train: Any, num_classes: int, base_lrs: Sequence[float], epochs: int, batch_size: int,
                seed: int = 0, device: str | torch.device = "cpu", feature_norm: str = "none",
                progress: bool = False, desc: str = "linear heads") -> list[ProbeHead]:
    """Fit one probe head per base lr on ``train`` (``Features``, memory-mapped is fine) in one pass: each batch is
    read once and shared by every head; each head has its own optimiser and schedule (the protocol's SGD Nesterov,
    cosine, batch order), so each equals a run of its lr alone: the ops a head sees do not depend on the others."""
    from zoo.data.loaders import EpochShuffleSampler
    from zoo.progress import track

    device = torch.device(device)
    n = len(train)
    if n == 0:
        raise ValueError("no training features to fit the linear probe on")
    y = train.labels.to(device)
    resident = _resident(train, device)
    heads = [ProbeHead(train.dim, num_classes, feature_norm).to(device).train() for _ in base_lrs]
    steps = math.ceil(n / batch_size)
    opts = [make_optimizer(h.parameters(), lr, batch_size, epochs * steps) for h, lr in zip(heads, base_lrs)]
    sampler = EpochShuffleSampler(n, seed)
    losses: list[torch.Tensor] = [torch.zeros(())] * len(heads)

    def batches():
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(iter(sampler)))
            yield from order.split(batch_size)

    for idx in track(batches(), desc, total=epochs * steps, enabled=progress):
        x = resident[idx.to(device)].float() if resident is not None else train.gather(idx, device)
        target = y[idx.to(device)]
        for i, (head, (opt, sched)) in enumerate(zip(heads, opts)):
            loss = F.cross_entropy(head(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses[i] = loss.detach()
    for head, loss in zip(heads, losses):
        head.last_loss = float(loss)  # read by ``divergence``: the probe table flags a diverged lr
    return [h.cpu().eval() for h in heads]


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


class LinearProbeModule(pl.LightningModule):
    """Protocol-mode probe: frozen encoder (batch norm in inference mode, no gradient) + one trained linear layer.

    Args:
        encoder: module mapping the prepared batch to features [B, D].
        num_features, num_classes: sizes of the linear layer.
        base_lr, batch_size: lr = base x global batch / 256 (``batch_size`` is per device).
        epochs: cosine length; ``steps_per_epoch`` is taken from the trainer.
        prepare_train, prepare_test: batch dict -> encoder input (the train and test views).
        seed: seed of the train-view randomness.
        feature_norm: "none" (the paper) or "batchnorm" (see ``ProbeHead``).
    """

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int, base_lr: float, batch_size: int,
                 epochs: int, prepare_train: Callable, prepare_test: Callable, seed: int = 0,
                 feature_norm: str = "none") -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.head = ProbeHead(num_features, num_classes, feature_norm)
        self.base_lr, self.batch_size, self.epochs = base_lr, batch_size, epochs
        self.prepare_train, self.prepare_test, self.seed = prepare_train, prepare_test, seed
        self.result: dict[str, Any] = {}
        self._gen: torch.Generator | None = None
        self._counts = torch.zeros(3)
        # Undecodable files named by the loader (this process's share under DDP).
        self.skipped: dict[str, set[str]] = {"train": set(), "test": set()}

    def train(self, mode: bool = True) -> "LinearProbeModule":
        """Lightning switches modules to train mode each epoch; the encoder stays in inference mode regardless."""
        super().train(mode)
        self.encoder.eval()
        return self

    def _features(self, batch: dict[str, Any], prepare: Callable, gen: torch.Generator | None) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(prepare(batch, gen)).float()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """Cross-entropy of the linear layer on frozen features of the train view."""
        self.skipped["train"].update(batch.get("skipped", []))
        if len(batch["label"]) == 0:
            return None  # every image of this batch was undecodable (counted by the loader)
        if self._gen is None or self._gen.device != self.device:
            self._gen = torch.Generator(device=self.device).manual_seed(self.seed + 7919 * self.global_rank)
        logits = self.head(self._features(batch, self.prepare_train, self._gen))
        loss = F.cross_entropy(logits, batch["label"])
        self.log("probe/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        self.last_loss = loss.detach()  # a tensor: no device sync per step; read once by ``divergence``
        return loss

    def on_validation_epoch_start(self) -> None:
        """Reset the top-1 / top-5 counters."""
        self._counts = torch.zeros(3, device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Count top-1 / top-5 hits on the test view."""
        self.skipped["test"].update(batch.get("skipped", []))
        if len(batch["label"]) == 0:
            return
        logits = self.head(self._features(batch, self.prepare_test, None))
        y = batch["label"]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        self._counts += torch.stack([hit[:, :1].any(1).sum(), hit.any(1).sum(), torch.tensor(len(y), device=y.device)]
                                    ).to(self._counts)

    def on_validation_epoch_end(self) -> None:
        """Sum the counters over devices and keep top-1 / top-5 (percent) in ``self.result``."""
        counts = self.trainer.strategy.reduce(self._counts, reduce_op="sum") if self.trainer.world_size > 1 \
            else self._counts
        n = max(float(counts[2]), 1.0)
        self.result = {"top1": 100.0 * float(counts[0]) / n, "top5": 100.0 * float(counts[1]) / n, "n": int(counts[2])}
        self.log("probe/top1", self.result["top1"], sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD Nesterov on the linear layer only, cosine per step over ``epochs``."""
        steps = self.trainer.estimated_stepping_batches
        global_batch = self.batch_size * self.trainer.world_size
        opt, sched = make_optimizer(self.head.parameters(), self.base_lr, global_batch, int(steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def divergence(head: nn.Module, last_loss: Any, num_classes: int) -> str | None:
    """Why a trained probe diverged, else None: a NaN/Inf weight, a NaN/Inf final loss, or a final loss above
    2 ln(num_classes) (twice the loss of the zero-initialised head it started from: it got worse, not better)."""
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


def divergence_advice(diverged: dict[str, str], lr_grid: Sequence[float], feature_norm: str, steps: int) -> str | None:
    """One line for the diverged runs of a probe (``diverged``: base lr or "final" -> why): which, the likely cause
    and the flag to change; None when nothing diverged."""
    if not diverged:
        return None
    lrs = [k for k in diverged if k != "final"]
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
