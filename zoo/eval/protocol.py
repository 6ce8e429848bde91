"""Protocol mode of the probe: the linear layer trained through the frozen encoder on augmented views (Lightning),
one run per base lr of the grid on train minus the held-out images, then one on all of train with the pick."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from zoo.eval.linear import LinearProbeModule, divergence
from zoo.eval.probe_config import ProbeConfig

__all__ = ["run_protocol"]


def run_protocol(encoder: nn.Module, train_ds: Dataset, test_ds: Dataset, num_features: int, num_classes: int,
                 cfg: ProbeConfig, prepare_train: Callable, prepare_test: Callable, out: Path | None,
                 loader: Callable, split: Callable, points: Any, search: Callable, pick: Callable) -> dict[str, Any]:
    """The grid search (``search(score)``: finished points are not rerun, an edge is extended), the pick
    (``pick(grid, diverged)``), the final run on all of train."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zoo.data.loaders import EpochShuffleSampler
    from zoo.train.trainer import build_trainer

    skipped: dict[str, set[str]] = {"train": set(), "test": set()}

    def fit(train_part: Dataset, eval_part: Dataset, lr: float, tag: str) -> dict[str, Any]:
        module = LinearProbeModule(encoder, num_features, num_classes, lr, cfg.batch_size, cfg.epochs,
                                   prepare_train, prepare_test, cfg.seed, cfg.feature_norm)
        kwargs: dict[str, Any] = dict(max_epochs=cfg.epochs, logger=False, num_sanity_val_steps=0,
                                      precision=cfg.precision,
                                      check_val_every_n_epoch=cfg.epochs, enable_progress_bar=cfg.progress,
                                      enable_model_summary=False,
                                      # a checkpoint that never writes: the probe's weights are one linear layer
                                      callbacks=[ModelCheckpoint(save_top_k=0, save_last=False)],
                                      default_root_dir=str((out or Path("runs/probe")) / f"protocol_{tag}"))
        if not torch.cuda.is_available():
            kwargs["accelerator"] = "cpu"
        trainer = build_trainer(**{**kwargs, **cfg.trainer})
        if cfg.progress and trainer.is_global_zero:  # which of the grid's runs the progress lines below belong to
            scored = "held-out training" if tag != "final" else "test"
            print(f"linear probe: base lr {lr:g}, {len(train_part)} training images, scored on {len(eval_part)} "
                  f"{scored} images", file=sys.stderr, flush=True)
        train_loader = loader(train_part, cfg.batch_size, prepare_train, EpochShuffleSampler(len(train_part), cfg.seed))
        lightning_log = logging.getLogger("lightning.pytorch")
        level = lightning_log.level
        lightning_log.setLevel(logging.WARNING)  # no device banner / "fit stopped" lines for every learning rate
        try:
            with warnings.catch_warnings():
                # the frozen encoder is in eval mode on purpose (BN in inference mode); Lightning warns about it
                warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
                trainer.fit(module, train_loader, loader(eval_part, cfg.extract_batch_size, prepare_test))
        finally:
            lightning_log.setLevel(level)
        for split_name in skipped:
            skipped[split_name] |= module.skipped[split_name]
        return {**module.result, "diverged": divergence(module.head, getattr(module, "last_loss", None), num_classes)}

    grid: dict[str, float] = {}
    diverged: dict[str, str] = {}
    extended: list[float] = []
    if len(cfg.lr_grid) > 1:
        tr_idx, ho_idx = split(len(train_ds))

        def score(lrs: list[float]) -> None:
            for lr in lrs:
                res = fit(Subset(train_ds, tr_idx.tolist()), Subset(train_ds, ho_idx.tolist()), lr, f"lr{lr}")
                points.add(lr, res["top1"], res["diverged"])

        grid, diverged, extended = search(score)
    best = pick(grid, diverged) if grid else cfg.lr_grid[0]
    res = fit(train_ds, test_ds, best, "final")
    if res["diverged"]:
        diverged["final"] = res["diverged"]
    return {"top1": res["top1"], "top5": res["top5"], "base_lr": best, "heldout_top1": grid, "skipped": skipped,
            "diverged": diverged, "grid_extended": extended}
