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

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from zoo.eval.features import (Features, ImagePrepare, IndexedDataset, MeanPooledLM, TokenPrepare, cached_features,
                                collate_indexed, default_cache_dir, extract_features, weights_fingerprint)
from zoo.eval.knn import KNNProbeCallback, knn_evaluate
from zoo.eval.linear import LinearProbeModule, evaluate_linear, train_linear

__all__ = ["ProbeConfig", "evaluate", "heldout_split", "load_config", "run_probe", "main", "KNNProbeCallback",
           "MeanPooledLM", "TokenPrepare", "ImagePrepare", "MODES"]

MODES = ("fast", "protocol", "knn")


@dataclass
class ProbeConfig:
    """Every knob of the evaluator; ``configs/probe/*.yaml`` hold presets (ImageNet: the paper's numbers)."""

    epochs: int = 80
    batch_size: int = 1024
    lr_grid: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8)  # base lr candidates (x batch / 256); our grid, not the paper's
    # images held out of train to pick the lr (>= 1: a count, < 1: a fraction); None: 10,000 (the paper's ImageNet
    # split) for sets of 100k images or more, else 10 %
    heldout: float | None = None
    image_size: int = 224
    resize: int | None = 256
    train_augment: str = "random_resized_crop"  # or "center_crop" (the centre-crop-only probe)
    # the BYOL authors' views by default (augment.presets): eval view = central image_size/resize square resized
    # (eval_crop "official") or short side -> resize then centre crop ("resize_then_crop"); TF2 bicubic
    # ("tf_bicubic") or PyTorch's ("torch_bicubic"); train crop sampler "official" (one draw) or "torchvision"
    eval_crop: str = "official"
    resize_kernel: str = "tf_bicubic"
    crop_sampler: str = "official"
    feature_norm: str = "none"  # "none": the paper's probe; "batchnorm": parameter-free BN before the linear layer
    knn_k: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07
    num_workers: int = 4
    extract_batch_size: int = 256
    cache_dir: str | None = "default"  # "default" -> $ZOO_CACHE_DIR or ~/.cache/byol-zoo/features; null: no cache
    seed: int = 0
    max_train: int | None = None  # use only the first N training images (quick looks)
    max_test: int | None = None
    data_image_size: int = 32  # side of the embedded digits
    device: str = "auto"
    # "32-true" or "bf16-mixed": protocol trainer precision and, when bf16, autocast during fast/kNN extraction too,
    # so the modes stay comparable
    precision: str = "32-true"
    progress: bool = True
    trainer: dict[str, Any] = field(default_factory=dict)  # overrides for zoo.train.trainer.build_trainer (protocol)

    def __post_init__(self) -> None:
        self.lr_grid = tuple(float(x) for x in self.lr_grid)
        self.knn_k = tuple(int(x) for x in self.knn_k)
        if not self.lr_grid:
            raise ValueError("lr_grid must hold at least one base learning rate")
        if self.train_augment not in ("random_resized_crop", "center_crop"):
            raise ValueError(f"train_augment={self.train_augment!r}: use random_resized_crop or center_crop")
        from augment.presets import EvalPreset

        EvalPreset(eval_crop=self.eval_crop, resize_kernel=self.resize_kernel, crop_sampler=self.crop_sampler)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")


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
    if len(cfg.lr_grid) > 1:
        # split on dataset indices (not feature rows) so protocol mode holds out exactly the same images
        held_mask = torch.isin(train.index, heldout_split(n_train, cfg.heldout, cfg.seed)[1])
        fit, held = train.subset(torch.nonzero(~held_mask).flatten()), train.subset(torch.nonzero(held_mask).flatten())
        for lr in cfg.lr_grid:
            lin = train_linear(fit.feats, fit.labels, num_classes, lr, cfg.epochs, cfg.batch_size, cfg.seed, dev,
                               cfg.feature_norm)
            grid[str(lr)] = evaluate_linear(lin, held.feats, held.labels)[1]
    best = max(cfg.lr_grid, key=lambda lr: grid.get(str(lr), 0.0))
    lin = train_linear(train.feats, train.labels, num_classes, best, cfg.epochs, cfg.batch_size, cfg.seed, dev,
                       cfg.feature_norm)
    acc = evaluate_linear(lin, test.feats, test.labels)
    return {"top1": acc[1], "top5": acc[5], "base_lr": best, "heldout_top1": grid}


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
        train_loader = _loader(train_part, cfg.batch_size, cfg, prepare_train,
                               EpochShuffleSampler(len(train_part), cfg.seed))
        with warnings.catch_warnings():
            # the frozen encoder is in eval mode on purpose (BN in inference mode); Lightning warns about it
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            trainer.fit(module, train_loader, _loader(eval_part, cfg.extract_batch_size, cfg, prepare_test))
        return {**module.result, "skipped": module.skipped}

    grid: dict[str, float] = {}
    if len(cfg.lr_grid) > 1:
        tr_idx, ho_idx = heldout_split(len(train_ds), cfg.heldout, cfg.seed)
        for lr in cfg.lr_grid:
            grid[str(lr)] = fit(Subset(train_ds, tr_idx.tolist()), Subset(train_ds, ho_idx.tolist()), lr,
                                f"lr{lr}")["top1"]
    best = max(cfg.lr_grid, key=lambda lr: grid.get(str(lr), 0.0))
    res = fit(train_ds, test_ds, best, "final")
    return {"top1": res["top1"], "top5": res["top5"], "base_lr": best, "heldout_top1": grid, "skipped": res["skipped"]}


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


# Datasets of 32-pixel images are probed at their own size (no 224 upscaling).
_SMALL_IMAGE_DATA = ("digits", "cifar10", "cifar100")


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
    table.add_column("value", justify="right")
    rows = [("backbone", metrics.get("backbone")), ("arch", metrics.get("arch")), ("dataset", metrics.get("dataset")),
            ("top-1 %", f"{metrics['top1']:.2f}"), ("top-5 %", f"{metrics['top5']:.2f}"),
            ("train / test images", f"{c.get('train')} / {c.get('test')}"),
            ("skipped (corrupt) train / test", f"{c.get('skipped_train')} / {c.get('skipped_test')}")]
    if "base_lr" in metrics:
        rows.append(("base lr (held-out pick)", f"{metrics['base_lr']:g}"))
    for k, v in (metrics.get("knn") or {}).items():
        rows.append((f"kNN k={k} top-1 / top-5", f"{v['top1']:.2f} / {v['top5']:.2f}"))
    rows.append(("seconds", f"{metrics['seconds']['total']:.1f}"))
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """Linear probe (fast or protocol) or kNN evaluation of any backbone on an image dataset.

    ``zoo probe --backbone SOURCE --data SPEC --mode fast|protocol|knn [--out DIR] [--config YAML] ...``.
    """
    ap = argparse.ArgumentParser(prog="zoo probe", description="Linear probe / kNN evaluation of a backbone.")
    ap.add_argument("--backbone", required=True, help="our .ckpt / export .safetensors / .pth / official .pkl / "
                                                      "random:<arch>")
    ap.add_argument("--data", required=True, help="digits | cifar10:<dir> | cifar100:<dir> | imagefolder:<dir>")
    ap.add_argument("--mode", default="fast", choices=MODES)
    ap.add_argument("--out", default=None, help="folder for metrics.json")
    ap.add_argument("--config", default=None, help="YAML of ProbeConfig keys (configs/probe/*.yaml)")
    ap.add_argument("--which", default="online", choices=("online", "target"))
    ap.add_argument("--padding", default=None, choices=("torch", "tf_same"))
    ap.add_argument("--arch", default=None, help="architecture for plain state dicts (e.g. resnet50, timm:<name>)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float, nargs="+", help="base learning-rate grid")
    ap.add_argument("--k", type=int, nargs="+", help="kNN neighbour counts")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--resize", type=int)
    ap.add_argument("--train-augment", choices=("random_resized_crop", "center_crop"))
    ap.add_argument("--eval-crop", choices=("official", "resize_then_crop"))
    ap.add_argument("--resize-kernel", choices=("tf_bicubic", "torch_bicubic"))
    ap.add_argument("--crop-sampler", choices=("official", "torchvision"))
    ap.add_argument("--heldout", type=float)
    ap.add_argument("--feature-norm", choices=("none", "batchnorm"))
    ap.add_argument("--cache-dir", default=None, help="feature cache folder ('none' disables)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--devices", default=None, help="protocol mode: trainer devices (DDP when > 1)")
    ap.add_argument("--num-workers", type=int)
    ap.add_argument("--max-train", type=int)
    ap.add_argument("--max-test", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--precision", choices=("32-true", "bf16-mixed"))
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    small = a.data.partition(":")[0] in _SMALL_IMAGE_DATA
    try:
        overrides = dict(epochs=a.epochs, batch_size=a.batch_size, lr_grid=a.lr, knn_k=a.k, resize=a.resize,
                         image_size=a.image_size, train_augment=a.train_augment, heldout=a.heldout,
                         eval_crop=a.eval_crop, resize_kernel=a.resize_kernel, crop_sampler=a.crop_sampler,
                         feature_norm=a.feature_norm, cache_dir=a.cache_dir, device=a.device,
                         num_workers=a.num_workers, max_train=a.max_train, max_test=a.max_test, seed=a.seed,
                         precision=a.precision, progress=False if a.no_progress else None)
        if a.devices is not None:
            overrides["trainer"] = {"devices": int(a.devices) if a.devices.isdigit() else a.devices}
        config = a.config
        preset = Path(__file__).resolve().parents[1] / "configs" / "probe" / "digits_linear.yaml"
        if config is None and a.data == "digits" and preset.exists():  # the embedded demo's preset (repo checkout)
            config = preset
        cfg = load_config(config, **overrides)
        if small and config is None:  # 32-pixel datasets: probe at their own size unless told otherwise
            cfg.image_size = a.image_size or 32
            cfg.resize = a.resize or cfg.image_size
            cfg.data_image_size = cfg.image_size
        metrics = run_probe(a.backbone, a.data, a.mode, a.out, cfg, a.which, a.padding, a.arch)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"zoo probe: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    print_summary(metrics)
    if a.out:
        print(f"wrote {Path(a.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
