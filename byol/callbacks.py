"""ProbeReport: at the end of pretraining, linear-probe the trained encoder beside the same encoder at initialisation."""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


class ProbeReport(pl.Callback):
    """kNN and linear probes (``zoo.eval.probe``, frozen features) of the online encoder at fit end vs at initialisation.

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
        from zoo.eval.probe import ProbeConfig, evaluate

        dm = trainer.datamodule
        size = pl_module.hparams.image_size
        # Two scale-free probes: the kNN monitor peers use (k=20, cosine, exp(sim/0.07) votes) and a linear probe on
        # batch-normalised features (a random encoder's features have another scale than a trained one's, and one lr
        # grid must serve both). The kNN result is the headline: on digits a linear probe saturates for both.
        common = dict(image_size=size, resize=round(size * 256 / 224), cache_dir=None, progress=False, num_workers=0,
                      extract_batch_size=256, device=str(pl_module.device))
        knn = ProbeConfig(knn_k=(20,), **common)
        linear = ProbeConfig(epochs=self.epochs, batch_size=256, lr_grid=self.lr_grid, heldout=0.1,
                             feature_norm="batchnorm", **common)
        scores = {}
        for tag, enc in (("trained", pl_module.online_encoder), ("random_init", self.initial.to(pl_module.device))):
            was_training = enc.training
            scores[f"{tag}_knn_top1"] = evaluate(enc, dm.train_set, dm.val_set, mode="knn", cfg=knn)["top1"]
            scores[f"{tag}_linear_top1"] = evaluate(enc, dm.train_set, dm.val_set, mode="fast", cfg=linear)["top1"]
            enc.train(was_training)
        self.result = {"dataset": dm.dataset, "encoder": pl_module.hparams.encoder, "steps": trainer.global_step,
                       **scores, "gain_knn_points": scores["trained_knn_top1"] - scores["random_init_knn_top1"],
                       "gain_linear_points": scores["trained_linear_top1"] - scores["random_init_linear_top1"]}
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, "probe_report.json"), "w") as f:
            json.dump(self.result, f, indent=2)
        self._print(self.result)

    @staticmethod
    def _print(r: dict[str, Any]) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Probes on {r['dataset']} val ({r['encoder']}, {r['steps']} BYOL steps)")
        for col in ("encoder weights", "kNN top-1 %", "linear top-1 %"):
            table.add_column(col, justify="right" if col != "encoder weights" else "left")
        table.add_row("random initialisation", f"{r['random_init_knn_top1']:.2f}", f"{r['random_init_linear_top1']:.2f}")
        table.add_row("BYOL-trained", f"{r['trained_knn_top1']:.2f}", f"{r['trained_linear_top1']:.2f}")
        table.add_row("gain (points)", f"{r['gain_knn_points']:+.2f}", f"{r['gain_linear_points']:+.2f}")
        Console().print(table)
