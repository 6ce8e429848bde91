"""Protocol mode's LightningModule: the frozen encoder once per batch, every head of a pass behind it (``HeadBank``).

One forward of the frozen encoder (inference mode, no gradient, bf16 autocast on CUDA: ``frozen_autocast``) per batch
feeds every head: the lr grid's (which leave the held-out images out) and the final ones (all of train). The heads
share ONE SGD optimiser with a param group per head, so Lightning's own machinery checkpoints and restores them: the
shared trainer's ``last.ckpt`` at every epoch end and on SIGTERM / SIGUSR1 (``zoo.train.trainer.PreemptionCheckpoint``),
the training loader's position (``zoo.data.loaders.ResumableLoader``), the schedule and the heads. The train view's
randomness is a pure function of (seed, step), so no generator state is saved and a resumed run draws exactly the
views of an uninterrupted one. The encoder's weights are left out of the checkpoint (they never change; the probe's
identity already names their hash).

Over N data-parallel ranks (``--devices N``) the result is that of one device with the N-times batch: each rank
encodes its share of the global batch (the sampler's padding places come out empty, so no image counts twice), its
views drawn as rows of the global batch (``rows=(offset, total)``: the same random numbers one device draws), then the
features, labels and indices are gathered and EVERY rank trains the heads on the whole global batch. That matters:
the batch-norm statistics of ``feature_norm: batchnorm`` and the mean over the grid heads' non-held-out rows are those
of the global batch, not of a rank's share (a per-rank mean, averaged by DDP, is another estimator and another
result). DDP's averaging of the ranks' identical gradients is then exact for 2 or 4 ranks and within a rounding
otherwise. Validation is split without padding and its hit counters summed. A ``prepare_train`` without a ``rows``
parameter gets a generator seeded by (seed, step, rank) instead: right, but not the views of one device.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from zoo.eval.features import decode_on_device
from zoo.eval.linear import HeadBank
from zoo.train.distributed import all_gather_rows, gather_sizes, rows_of, takes_rows

__all__ = ["ProtocolHeads"]


class ProtocolHeads(pl.LightningModule):
    """Frozen encoder + the heads of one pass.

    Args:
        encoder: module mapping the prepared batch to features [B, D].
        num_features, num_classes: sizes of the linear layers.
        grid_lrs: base lrs of the grid heads (trained without the ``heldout`` dataset indices, scored on them).
        final_lrs: base lrs of the final heads (all of train, scored on the test set).
        batch_size: per device; lr = base x global batch / 256.
        epochs: cosine length (steps per epoch from the trainer).
        prepare_train, prepare_test: batch dict -> encoder input (the train and test views).
        seed: seed of the train-view randomness.
        feature_norm: "none" (the paper) or "batchnorm" (see ``ProbeHead``).
        heldout: dataset indices held out of the grid heads' training (None without a grid).
        autocast: bf16 autocast of the frozen forward (``frozen_autocast`` decides: CUDA only).
    """

    def __init__(self, encoder: nn.Module, num_features: int, num_classes: int, grid_lrs: Sequence[float],
                 final_lrs: Sequence[float], batch_size: int, epochs: int, prepare_train: Callable,
                 prepare_test: Callable, seed: int = 0, feature_norm: str = "none",
                 heldout: torch.Tensor | None = None, autocast: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        # inference mode from the start: Lightning keeps each submodule's mode, so one built in train mode would run
        # (and move its batch-norm statistics) in train mode through the first epoch
        self.encoder.requires_grad_(False).eval()
        self.grid_lrs, self.final_lrs = list(grid_lrs), list(final_lrs)
        self.bank = HeadBank(num_features, num_classes, self.grid_lrs + self.final_lrs,
                             [True] * len(self.grid_lrs) + [False] * len(self.final_lrs), feature_norm)
        self.batch_size, self.epochs, self.seed, self.autocast = batch_size, epochs, seed, autocast
        self.prepare_train, self.prepare_test = prepare_train, prepare_test
        self.register_buffer("heldout", torch.as_tensor(heldout if heldout is not None else [], dtype=torch.long),
                             persistent=False)
        self.num_classes = num_classes
        self.strict_loading = False  # the checkpoint leaves the frozen encoder out
        # the validation loaders, in order: "heldout" (grid heads) when there is a grid, then "test" (final heads)
        self.val_parts = (["heldout"] if self.grid_lrs else []) + ["test"]
        self.result: dict[str, list[dict[str, float]]] = {}
        self._counts = torch.zeros(0)
        self._gen: torch.Generator | None = None
        self._rows_kw = takes_rows(prepare_train)  # the view can draw its rows of a global batch
        # Undecodable files named by the loader: this process's share under DDP, until a validation end unites them.
        self.skipped: dict[str, set[str]] = {"train": set(), "test": set()}

    def train(self, mode: bool = True) -> "ProtocolHeads":
        """Lightning switches modules to train mode each epoch; the encoder stays in inference mode regardless."""
        super().train(mode)
        self.encoder.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """The encoder stays in inference mode whatever switched modes before."""
        self.encoder.eval()

    def _generator(self) -> torch.Generator:
        """The train-view generator, re-seeded from (seed, step) (every rank alike: each draws its rows of the global
        batch), or (seed, step, rank) for a prepare that cannot draw rows: nothing to save for an exact resume."""
        if self._gen is None or self._gen.device != self.device:
            self._gen = torch.Generator(device=self.device)
        rank = 0 if self._rows_kw else self.global_rank
        return self._gen.manual_seed(((self.seed * 1_000_003 + self.global_step) * 65_537 + rank) % (1 << 63))

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Raw JPEG bytes are decoded here, on the device they were moved to (nvjpeg on a GPU)."""
        return decode_on_device(batch, self.device)

    def _features(self, batch: dict[str, Any], prepare: Callable, gen: torch.Generator | None,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
        if len(batch["label"]) == 0:  # every image of the batch was undecodable (or padding): no forward
            return torch.zeros(0, self.bank.heads[0].linear.in_features, device=self.device)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            views = prepare(batch, gen, rows=rows) if rows is not None else prepare(batch, gen)
            return self.encoder(views).float()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The heads' summed cross-entropy on one shared forward of the train view (of the global batch under DDP,
        see the module's docstring); a batch with no image still steps every head."""
        self.skipped["train"].update(batch.get("skipped", []))
        y, index = batch["label"].to(self.device), batch["index"].to(self.device)
        sizes = gather_sizes(len(y), self.device) if self.trainer.world_size > 1 else [len(y)]
        rows = rows_of(sizes, self.global_rank) if self._rows_kw else None
        x = self._features(batch, self.prepare_train, self._generator(), rows)
        x, y, index = (all_gather_rows(t, sizes) for t in (x, y, index))
        fit = ~torch.isin(index, self.heldout) if self.grid_lrs else None
        loss = self.bank.loss(x, y, fit)
        self.log("probe/loss", loss, prog_bar=True, batch_size=max(len(y), 1))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Freeze the heads whose (all-reduced) gradient is not finite, before they take the step."""
        self.bank.drop_diverged(self.global_step)

    def on_validation_epoch_start(self) -> None:
        """Reset the top-1 / top-5 counters of every (loader, head)."""
        self._counts = torch.zeros(len(self.val_parts), len(self.bank.heads), 3, device=self.device,
                                   dtype=torch.float64)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Count top-1 / top-5 hits of the heads this loader scores (grid heads: held-out; final heads: test)."""
        part = self.val_parts[dataloader_idx]
        self.skipped["test" if part == "test" else "train"].update(batch.get("skipped", []))
        if len(batch["label"]) == 0:
            return
        x = self._features(batch, self.prepare_test, None)
        y = batch["label"]
        g = len(self.grid_lrs)
        heads = range(g) if part == "heldout" else range(g, len(self.bank.heads))
        for i in heads:
            top = self.bank.heads[i](x).topk(min(5, self.num_classes), dim=1).indices == y[:, None]
            self._counts[dataloader_idx, i] += torch.stack(
                [top[:, :1].any(1).sum(), top.any(1).sum(), torch.tensor(len(y), device=y.device)]).to(self._counts)

    def on_validation_epoch_end(self) -> None:
        """Sum the counters over devices; ``self.result[part]``: top-1 / top-5 (percent) per head it scores."""
        counts = self._counts
        if self.trainer.world_size > 1:  # the hits of every rank's share, and every rank's skipped files
            counts = self.trainer.strategy.reduce(self._counts, reduce_op="sum")
            shares: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(shares, self.skipped)
            self.skipped = {part: set().union(*(share[part] for share in shares)) for part in self.skipped}
        g = len(self.grid_lrs)
        self.result = {}
        for j, part in enumerate(self.val_parts):
            heads = range(g) if part == "heldout" else range(g, len(self.bank.heads))
            self.result[part] = [{"top1": 100.0 * float(counts[j, i, 0]) / max(float(counts[j, i, 2]), 1.0),
                                  "top5": 100.0 * float(counts[j, i, 1]) / max(float(counts[j, i, 2]), 1.0)}
                                 for i in heads]

    def configure_optimizers(self) -> dict[str, Any]:
        """One SGD Nesterov optimiser (a param group per head) and the per-step cosine over ``epochs``."""
        steps = int(self.trainer.estimated_stepping_batches)
        opt, sched = self.bank.make_optimizer(self.batch_size * self.trainer.world_size, steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen encoder out: it never changes, and it can be 100x the heads."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("encoder.")}
        checkpoint["zoo_probe_pass"] = {"grid_lrs": self.grid_lrs, "final_lrs": self.final_lrs}
