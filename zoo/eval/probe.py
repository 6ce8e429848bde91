"""The one evaluator for every encoder: linear probe (protocol / fast) and kNN.

- protocol: the paper's linear evaluation through the shared Lightning trainer: frozen encoder (BN in inference
  mode), one linear layer, SGD Nesterov 0.9, no weight decay, lr = base x batch / 256 with the base picked on a
  held-out split of train, per-step cosine; train view = random resized crop + flip, test = resize 256 + crop 224.
- fast: features extracted once (cached on disk), the same linear recipe trained on them.
- knn: k in {20, 200}, cosine similarity, votes weighted exp(sim / 0.07).

Encoders are any module mapping a prepared batch to [B, D] (images here; ``MeanPooledLM`` + ``TokenPrepare`` for
language models). Command line: ``zoo probe --backbone SOURCE --data SPEC --mode fast|protocol|knn [--out DIR]``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from zoo.eval.features import (Features, ImagePrepare, IndexedDataset, MeanPooledLM, TokenPrepare, cached_features,
                                collate_indexed, default_cache_dir, extract_features, weights_fingerprint)
from zoo.eval.knn import KNNProbeCallback, knn_evaluate
from zoo.eval.linear import LinearProbeModule, divergence, evaluate_linear, train_linear
from zoo.eval.probe_config import MODES, ProbeConfig

__all__ = ["ProbeConfig", "evaluate", "heldout_split", "load_config", "run_probe", "main", "KNNProbeCallback",
           "MeanPooledLM", "TokenPrepare", "ImagePrepare", "MODES"]



def load_config(path: str | Path | None, **overrides: Any) -> ProbeConfig:
    """A ProbeConfig from a YAML file (keys = field names; unknown keys are an error) plus overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"probe config {str(p)!r} does not exist; see configs/probe/ for examples")
        values = yaml.safe_load(p.read_text()) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(ProbeConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown probe config keys {unknown}; valid keys: {sorted(names)}")
    return ProbeConfig(**values)


def heldout_split(n: int, heldout: float | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices) of ``range(n)``: a seeded random ``heldout`` images (count or fraction;
    None: 10,000 when n >= 100,000, else 10 %)."""
    if heldout is None:
        heldout = 10000 if n >= 100_000 else 0.1
    h = int(round(heldout * n)) if heldout < 1 else int(heldout)
    h = max(1, min(h, n // 2))  # never hold out more than half: the lr would be chosen on a different problem
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    return perm[h:].sort().values, perm[:h].sort().values


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def _num_classes(train: Dataset, labels: torch.Tensor | None) -> int:
    classes = getattr(train, "classes", None)
    if classes:
        return len(classes)
    labels = labels if labels is not None else getattr(train, "labels", None)
    if labels is None:
        raise ValueError(f"cannot tell the number of classes of {type(train).__name__}; give it a `classes` list")
    return int(torch.as_tensor(labels).max().item()) + 1


def _loader(ds: Dataset, batch_size: int, cfg: ProbeConfig, prepare: Any, sampler=None) -> DataLoader:
    # the prepare object knows its batch layout (images or tokens)
    return DataLoader(IndexedDataset(ds), batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=cfg.num_workers, collate_fn=getattr(prepare, "collate", collate_indexed))


def _cap(ds: Dataset, n: int | None) -> Dataset:
    return Subset(ds, range(min(n, len(ds)))) if n is not None and n < len(ds) else ds  # type: ignore[arg-type]


def _features(encoder: nn.Module, ds: Dataset, split: str, prepare: Any, cfg: ProbeConfig, data_id: str
              ) -> tuple[Features, bool]:
    cache = None if cfg.cache_dir in (None, "none", "") else (default_cache_dir() if cfg.cache_dir == "default"
                                                                else cfg.cache_dir)
    key = {"encoder": weights_fingerprint(encoder), "data": data_id, "split": split, "n": len(ds),
           "precision": cfg.precision,
           "prepare": prepare.describe() if hasattr(prepare, "describe") else repr(prepare), "v": 1}
    dev = _device(cfg.device)
    return cached_features(key, cache, lambda: extract_features(
        encoder.to(dev), _loader(ds, cfg.extract_batch_size, cfg, prepare), prepare, dev, f"{split} features",
        cfg.progress, autocast=cfg.precision.startswith("bf16") and dev.type == "cuda"))


def _fast(train: Features, test: Features, num_classes: int, cfg: ProbeConfig, n_train: int) -> dict[str, Any]:
    dev = _device(cfg.device)
    grid: dict[str, float] = {}
    diverged: dict[str, str] = {}
    if len(cfg.lr_grid) > 1:
        # split on dataset indices (not feature rows) so protocol mode holds out exactly the same images
        held_mask = torch.isin(train.index, heldout_split(n_train, cfg.heldout, cfg.seed)[1])
        fit, held = train.subset(torch.nonzero(~held_mask).flatten()), train.subset(torch.nonzero(held_mask).flatten())
        for lr in cfg.lr_grid:
            lin = train_linear(fit.feats, fit.labels, num_classes, lr, cfg.epochs, cfg.batch_size, cfg.seed, dev,
                               cfg.feature_norm)
            grid[str(lr)] = evaluate_linear(lin, held.feats, held.labels)[1]
            why = divergence(lin, getattr(lin, "last_loss", None), num_classes)
            if why:
                diverged[str(lr)] = why
    # a diverged lr is never picked (unless every lr diverged)
    best = max(cfg.lr_grid, key=lambda lr: (str(lr) not in diverged, grid.get(str(lr), 0.0)))
    lin = train_linear(train.feats, train.labels, num_classes, best, cfg.epochs, cfg.batch_size, cfg.seed, dev,
                       cfg.feature_norm)
    why = divergence(lin, getattr(lin, "last_loss", None), num_classes)
    if why:
        diverged["final"] = why
    acc = evaluate_linear(lin, test.feats, test.labels)
    return {"top1": acc[1], "top5": acc[5], "base_lr": best, "heldout_top1": grid, "diverged": diverged}


def _protocol(encoder: nn.Module, train_ds: Dataset, test_ds: Dataset, num_features: int, num_classes: int,
              cfg: ProbeConfig, prepare_train: Callable, prepare_test: Callable, out: Path | None) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zoo.data.loaders import EpochShuffleSampler
    from zoo.train.trainer import build_trainer

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
        train_loader = _loader(train_part, cfg.batch_size, cfg, prepare_train,
                               EpochShuffleSampler(len(train_part), cfg.seed))
        lightning_log = logging.getLogger("lightning.pytorch")
        level = lightning_log.level
        lightning_log.setLevel(logging.WARNING)  # no device banner / "fit stopped" lines for every learning rate
        try:
            with warnings.catch_warnings():
                # the frozen encoder is in eval mode on purpose (BN in inference mode); Lightning warns about it
                warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
                trainer.fit(module, train_loader, _loader(eval_part, cfg.extract_batch_size, cfg, prepare_test))
        finally:
            lightning_log.setLevel(level)
        return {**module.result, "skipped": module.skipped,
                "diverged": divergence(module.head, getattr(module, "last_loss", None), num_classes)}

    grid: dict[str, float] = {}
    diverged: dict[str, str] = {}
    if len(cfg.lr_grid) > 1:
        tr_idx, ho_idx = heldout_split(len(train_ds), cfg.heldout, cfg.seed)
        for lr in cfg.lr_grid:
            res = fit(Subset(train_ds, tr_idx.tolist()), Subset(train_ds, ho_idx.tolist()), lr, f"lr{lr}")
            grid[str(lr)] = res["top1"]
            if res["diverged"]:
                diverged[str(lr)] = res["diverged"]
    best = max(cfg.lr_grid, key=lambda lr: (str(lr) not in diverged, grid.get(str(lr), 0.0)))
    res = fit(train_ds, test_ds, best, "final")
    if res["diverged"]:
        diverged["final"] = res["diverged"]
    return {"top1": res["top1"], "top5": res["top5"], "base_lr": best, "heldout_top1": grid, "skipped": res["skipped"],
            "diverged": diverged}


def evaluate(encoder: nn.Module, train_ds: Dataset, test_ds: Dataset, mode: str = "fast",
             cfg: ProbeConfig | None = None, prepare_train: Callable | None = None,
             prepare_test: Callable | None = None, data_id: str = "dataset", out: str | Path | None = None
             ) -> dict[str, Any]:
    """Evaluate ``encoder`` on (train, test) datasets; returns top1/top5 (percent), counts and timings.

    ``prepare_*`` map a batch dict to the encoder's input; default: the linear-eval image views of ``cfg``.
    """
    cfg = cfg or ProbeConfig()
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    t0 = time.perf_counter()
    train_ds, test_ds = _cap(train_ds, cfg.max_train), _cap(test_ds, cfg.max_test)
    views = dict(eval_crop=cfg.eval_crop, resize_kernel=cfg.resize_kernel, crop_sampler=cfg.crop_sampler)
    prepare_test = prepare_test or ImagePrepare(cfg.image_size, cfg.resize, **views)
    counts: dict[str, Any] = {"train": len(train_ds), "test": len(test_ds)}
    if mode == "protocol":
        if prepare_train is None:
            prepare_train = (prepare_test if cfg.train_augment == "center_crop"
                             else ImagePrepare(cfg.image_size, cfg.resize, train=True, **views))
        num_features = getattr(encoder, "num_features", None) or _probe_dim(encoder, test_ds, prepare_test)
        num_classes = _num_classes(_root(train_ds), None)
        res = _protocol(encoder, train_ds, test_ds, num_features, num_classes, cfg, prepare_train, prepare_test,
                        Path(out) if out else None)
        skipped = res.pop("skipped")
        counts.update(skipped_train=len(skipped["train"]), skipped_test=len(skipped["test"]),
                      skipped_files=sorted(skipped["train"] | skipped["test"])[:50])
        extract_s = 0.0
    else:
        train_f, hit_tr = _features(encoder, train_ds, "train", prepare_test, cfg, data_id)
        test_f, hit_te = _features(encoder, test_ds, "test", prepare_test, cfg, data_id)
        extract_s = time.perf_counter() - t0
        num_classes = _num_classes(_root(train_ds), torch.cat([train_f.labels, test_f.labels]))
        counts.update(skipped_train=len(train_f.skipped), skipped_test=len(test_f.skipped),
                      skipped_files=(train_f.skipped + test_f.skipped)[:50], cache_hit=hit_tr and hit_te)
        if mode == "fast":
            res = _fast(train_f, test_f, num_classes, cfg, len(train_ds))
        else:
            per_k = knn_evaluate(train_f.feats, train_f.labels, test_f.feats, test_f.labels, num_classes,
                                 cfg.knn_k, cfg.knn_temperature)
            first = per_k[str(cfg.knn_k[0])]
            res = {"top1": first["top1"], "top5": first["top5"], "k": cfg.knn_k[0], "knn": per_k}
    if len(cfg.lr_grid) > 1 and mode != "knn":
        counts["heldout"] = int(heldout_split(counts["train"], cfg.heldout, cfg.seed)[1].numel())
    return {**res, "mode": mode, "counts": counts, "num_classes": num_classes,
            "seconds": {"total": time.perf_counter() - t0, "features": extract_s}}


def _root(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


@torch.no_grad()
def _probe_dim(encoder: nn.Module, ds: Dataset, prepare: Callable) -> int:
    batch = getattr(prepare, "collate", collate_indexed)([IndexedDataset(ds)[0]])
    was = encoder.training
    encoder.eval()
    d = encoder(prepare(batch, None)).shape[1]
    encoder.train(was)
    return int(d)


def run_probe(backbone: str, data: str, mode: str = "fast", out: str | Path | None = None,
              cfg: ProbeConfig | None = None, which: str = "online", padding: str | None = None,
              arch: str | None = None) -> dict[str, Any]:
    """Load ``backbone`` (any ``zoo.load_backbone`` source), probe it on ``data``; writes ``out/metrics.json``."""
    from zoo.data.images import build_dataset
    from zoo.weights import load_backbone

    cfg = cfg or ProbeConfig()
    encoder = load_backbone(backbone, which=which, padding=padding, arch=arch)
    train = build_dataset(data, "train", image_size=cfg.data_image_size)
    test = build_dataset(data, "val", image_size=cfg.data_image_size)
    name, _, path = data.partition(":")
    data_id = f"{name}:{Path(path).resolve()}" if path else f"{name}@{cfg.data_image_size}"
    metrics = evaluate(encoder, train, test, mode, cfg, data_id=data_id, out=out)
    metrics = {"top1": metrics.pop("top1"), "top5": metrics.pop("top5"), "mode": mode, "backbone": backbone,
               "dataset": data, "arch": getattr(encoder, "zoo_arch", None), "which": which,
               "padding": getattr(encoder, "zoo_padding", None), **metrics, "config": dataclasses.asdict(cfg)}
    if out is not None and os.environ.get("RANK", "0") == "0":  # under DDP every rank has it; rank 0 writes
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def print_summary(metrics: dict[str, Any]) -> None:
    """A rich table of the headline numbers."""
    from rich.console import Console
    from rich.table import Table

    c = metrics.get("counts", {})
    table = Table(title=f"probe ({metrics['mode']})", show_header=True)
    table.add_column("field")
    table.add_column("value", justify="right", overflow="fold")  # a long path wraps whole, never cut with "..."
    rows = [("backbone", metrics.get("backbone")), ("arch", metrics.get("arch")), ("dataset", metrics.get("dataset")),
            ("top-1 %", f"{metrics['top1']:.2f}"), ("top-5 %", f"{metrics['top5']:.2f}"),
            ("train / test images", f"{c.get('train')} / {c.get('test')}"),
            ("skipped (corrupt) train / test", f"{c.get('skipped_train')} / {c.get('skipped_test')}")]
    diverged = metrics.get("diverged") or {}
    for lr, top1 in (metrics.get("heldout_top1") or {}).items():
        flag = f"  DIVERGED ({diverged[lr]})" if lr in diverged else ""
        rows.append((f"held-out top-1 @ base lr {lr}", f"{top1:.2f}{flag}"))
    if "base_lr" in metrics:
        flag = f"  DIVERGED ({diverged['final']})" if "final" in diverged else ""
        rows.append(("base lr (held-out pick)", f"{metrics['base_lr']:g}{flag}"))
    for k, v in (metrics.get("knn") or {}).items():
        rows.append((f"kNN k={k} top-1 / top-5", f"{v['top1']:.2f} / {v['top5']:.2f}"))
    rows.append(("seconds", f"{metrics['seconds']['total']:.1f}"))
    if metrics.get("recipe"):  # which settings: the end-of-fit report and `zoo probe` may use different ones
        rows.append(("recipe", metrics["recipe"]))
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)


from zoo.eval.probe_cli import main  # noqa: E402 - the command line lives apart so --help needs no torch
