"""ProbeReport: at the end of pretraining, linear-probe the trained encoder beside the same encoder at initialisation."""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


class ProbeReport(pl.Callback):
    """Fast linear probe (``zoo.probe``, frozen features) of the online encoder at fit end vs at initialisation.

    The initial encoder is copied in ``setup`` — before any checkpoint is restored — so a resumed run compares
    against the same random initialisation (same seed). Writes ``<default_root_dir>/probe_report.json``.

    Args:
        epochs: epochs of the linear classifier on cached features.
        lr_grid: base learning rates tried (selected on a held-out part of train).
    """

    def __init__(self, epochs: int = 100, lr_grid: tuple[float, ...] = (0.1, 0.4, 1.6)) -> None:
        self.epochs, self.lr_grid = epochs, tuple(lr_grid)
        self.initial = None
        self.result: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.initial is None:
            self.initial = copy.deepcopy(pl_module.online_encoder).cpu()

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from zoo.probe import ProbeConfig, evaluate

        dm = trainer.datamodule
        size = pl_module.hparams.image_size
        # Parameter-free BN on the features: a random encoder's features have a different scale than a trained one's,
        # and one lr grid must serve both for the comparison to be fair.
        cfg = ProbeConfig(epochs=self.epochs, batch_size=256, lr_grid=self.lr_grid, heldout=0.1, image_size=size,
                          resize=round(size * 256 / 224), feature_norm="batchnorm", cache_dir=None, progress=False,
                          num_workers=0, extract_batch_size=256, device=str(pl_module.device))
        trained = evaluate(pl_module.online_encoder, dm.train_set, dm.val_set, mode="fast", cfg=cfg, data_id=dm.dataset)
        initial = evaluate(self.initial.to(pl_module.device), dm.train_set, dm.val_set, mode="fast", cfg=cfg,
                           data_id=dm.dataset)
        self.result = {"dataset": dm.dataset, "encoder": pl_module.hparams.encoder, "steps": trainer.global_step,
                       "trained_top1": trained["top1"], "random_init_top1": initial["top1"],
                       "gain_points": trained["top1"] - initial["top1"], "trained_top5": trained["top5"],
                       "random_init_top5": initial["top5"]}
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, "probe_report.json"), "w") as f:
            json.dump(self.result, f, indent=2)
        self._print(self.result)

    @staticmethod
    def _print(r: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Linear probe on {r['dataset']} ({r['encoder']}, {r['steps']} BYOL steps)")
        for col in ("encoder weights", "top-1 %", "top-5 %"):
            table.add_column(col, justify="right" if col != "encoder weights" else "left")
        table.add_row("random initialisation", f"{r['random_init_top1']:.2f}", f"{r['random_init_top5']:.2f}")
        table.add_row("BYOL-trained", f"{r['trained_top1']:.2f}", f"{r['trained_top5']:.2f}")
        table.add_row("gain", f"{r['gain_points']:+.2f}", "")
        Console().print(table)
