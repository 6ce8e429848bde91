"""The one evaluator for every encoder: linear probe (protocol / fast) and kNN.

- protocol: the paper's linear evaluation through the shared Lightning trainer: frozen encoder (BN in inference
  mode), one linear layer, SGD Nesterov 0.9, no weight decay, lr = base x batch / 256 with the base picked on a
  held-out split of train, per-step cosine; train view = random resized crop + flip, test = resize 256 + crop 224;
  every head of the grid and every final head in one pass of the frozen encoder (``zoo.eval.grid``), checkpointed
  and resumable (``zoo.eval.protocol``).
- fast: features extracted once into a memory-mapped store on disk (``zoo.eval.store``; cached by content; split over
  ``--devices`` by ``zoo.eval.distributed``), the same linear recipe and the same passes trained on them
  (``train_heads``).
- knn: k in {20, 200}, cosine similarity, votes weighted exp(sim / 0.07), every k in one pass over the bank.

Encoders are any module mapping a prepared batch to [B, D] (images here; ``MeanPooledLM`` + ``TokenPrepare`` for
language models). Command line: ``zoo probe --backbone SOURCE --data SPEC --mode fast|protocol|knn [--out DIR]``.
Whatever the probe changes of a configured value to fit the data or the machine (loader workers, batch size,
held-out count, the lr grid's range) it says in one ``probe:`` line on stderr and lists in ``notices``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from zoo.eval.features import (ImagePrepare, IndexedDataset, MeanPooledLM, TokenPrepare, collate_indexed,
                                default_cache_dir, extract_to_store, frozen_autocast, quiet_decode_log,
                                skipped_line, _feature_dim)
from zoo.eval.distributed import cpu_count, is_main_process  # noqa: F401 - cpu_count re-exported (tests, bench)
from zoo.eval.knn import KNNProbeCallback, knn_evaluate_store
from zoo.eval.grid import PassResult, search_and_final
from zoo.eval.linear import divergence, divergence_advice, evaluate_heads, train_heads
from zoo.eval.probe_config import MODES, ProbeConfig
from zoo.eval.rundir import IDENTITY_IGNORED, GridPoints, claim, identity, markdown_report
from zoo.eval.store import Features, FeatureStore, dataset_fingerprint, feature_dtype, weights_sha256
import zoo.weights  # noqa: E402,F401 - `zoo.weights.load_backbone` stays reachable once the probe is imported

__all__ = ["ProbeConfig", "evaluate", "heldout_split", "load_config", "run_probe", "main", "KNNProbeCallback",
           "MeanPooledLM", "TokenPrepare", "ImagePrepare", "MODES"]

GRID_EXTENSIONS = 3  # at most this many lrs are added beyond an edge of the grid that scored best (fast mode)


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


def heldout_count(n: int, heldout: float | None) -> tuple[int, int]:
    """(images asked for, images held out) of ``n``: ``heldout`` is a count (>= 1) or a fraction; None: 10,000 when
    n >= 100,000, else 10 %; never more than half (the lr would be chosen on another problem), never none."""
    if heldout is None:
        heldout = 10000 if n >= 100_000 else 0.1
    asked = int(round(heldout * n)) if heldout < 1 else int(heldout)
    return asked, max(1, min(asked, n // 2))


def heldout_split(n: int, heldout: float | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices) of ``range(n)``: a seeded random ``heldout_count(n, heldout)`` images."""
    h = heldout_count(n, heldout)[1]
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


class _Notices:
    """The probe's one-line announcements (a configured value changed, a resume, advice), printed once on rank 0."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._keys: set[str] = set()

    def say(self, line: str, key: str | None = None) -> None:
        if (key or line) in self._keys:
            return
        self._keys.add(key or line)
        self.lines.append(line)
        if is_main_process():
            print(f"probe: {line}", file=sys.stderr, flush=True)


def _cap(ds: Dataset, n: int | None) -> Dataset:
    return Subset(ds, range(min(n, len(ds)))) if n is not None and n < len(ds) else ds  # type: ignore[arg-type]


def _root(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


class _Run:
    """One evaluation's effective settings: ``cfg`` fitted to the data and the machine, every change announced."""

    def __init__(self, cfg: ProbeConfig, mode: str, n_train: int, notices: _Notices) -> None:
        self.notices, self.device = notices, _device(cfg.device)
        if cfg.devices * cfg.num_nodes > 1:
            from zoo.eval.distributed import check_devices

            check_devices(cfg.devices, cfg.num_nodes, self.device)
        workers = min(cfg.num_workers, cpu_count())
        if workers < cfg.num_workers:
            notices.say(f"num_workers: {cfg.num_workers} -> {workers} (this process may use {cpu_count()} CPUs)")
        # "auto": bf16 autocast of the frozen forward on CUDA, fp32 on a CPU (the feature cache is keyed by the result)
        precision = ("bf16-mixed" if frozen_autocast(self.device, "auto") else "32-true") if cfg.precision == "auto" \
            else cfg.precision
        changes: dict[str, Any] = {"num_workers": workers, "precision": precision}
        grid = len(cfg.lr_grid) > 1 and mode != "knn"
        if grid:
            asked, held = heldout_count(n_train, cfg.heldout)
            if held != asked:
                notices.say(f"heldout: {cfg.heldout:g} -> {held} (at most half of the {n_train} training images, at "
                            "least one, so the lr is chosen on nearly the same problem)")
        n_fit = n_train - (heldout_count(n_train, cfg.heldout)[1] if grid else 0)
        if mode != "knn" and 0 < n_fit < cfg.batch_size:
            notices.say(f"batch_size: {cfg.batch_size} -> {n_fit} (only {n_fit} training images"
                        f"{' besides the held-out ones' if grid else ''}; lr = base x {n_fit}/256)")
            changes["batch_size"] = n_fit
        self.cfg = dataclasses.replace(cfg, **changes)

    def loader(self, ds: Dataset, batch_size: int, prepare: Any, sampler=None, trainer=None) -> DataLoader:
        """A loader of ``ds`` (sequential unless ``sampler``) with at most one worker per batch; with ``trainer``, a
        training loader whose position goes into the trainer's checkpoints (``ResumableLoader``)."""
        from zoo.data.loaders import ResumableLoader

        batches = max(1, math.ceil(len(ds) / batch_size))  # type: ignore[arg-type]
        workers = min(self.cfg.num_workers, batches)
        if workers < self.cfg.num_workers:
            self.notices.say(f"num_workers: {self.cfg.num_workers} -> {workers} for a loader of {batches} "
                             f"batch{'es' if batches > 1 else ''} (one worker per batch at most)", key="workers-data")
        # the prepare object knows its batch layout (images or tokens)
        kwargs = dict(batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=getattr(prepare, "collate", collate_indexed))
        if trainer is not None:
            return ResumableLoader(IndexedDataset(ds), trainer=trainer, **kwargs)
        return DataLoader(IndexedDataset(ds), **kwargs)


def _features(encoder: nn.Module, ds: Dataset, split: str, prepare: Any, run: _Run, key: dict[str, Any],
              out: Path | None, scratch: Path) -> tuple[Features, bool]:
    """The split's features from the store its ``key`` names (resumed if partial), extracting what is missing."""
    cfg = run.cfg
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    cache = None if cfg.cache_dir in (None, "none", "") else (default_cache_dir() if cfg.cache_dir == "default"
                                                                else Path(cfg.cache_dir).expanduser())
    root = cache / digest / split if cache else (out / "features" / split if out else scratch / split)
    store = FeatureStore(root, key, len(ds), feature_dtype(cfg.feature_dtype, run.device), cfg.shard_rows)
    if store.stale is not None:
        run.notices.say(f"{root} held features of another encoder, data or view: extracting them again")
        store.clear()
    done, total = len(store.done()), store.num_shards()
    hit = store.exists and done == total
    if not hit:
        if done:
            run.notices.say(f"resuming {split} features in {root}: {done} of {total} shards already extracted")
        try:
            if cfg.devices * cfg.num_nodes > 1:
                _extract_split(encoder, ds, split, prepare, run, store)
            else:
                extract_to_store(encoder.to(run.device), ds, lambda d: run.loader(d, cfg.extract_batch_size, prepare),
                                 prepare, run.device, store, f"{split} features", cfg.progress,
                                 autocast=frozen_autocast(run.device, cfg.precision))
        except OSError as err:
            raise ValueError(f"writing {split} features to {root} failed ({err.strerror or err}); the "
                             f"{len(store.done())} finished shards are kept: free space (or pass another "
                             "--cache_dir) and rerun to resume") from err
    feats = store.load()
    if feats.skipped:
        run.notices.say(skipped_line(f"{split} features", feats.skipped))
    if len(feats) == 0:
        raise ValueError(f"{split}: no sample could be read ({len(feats.skipped)} skipped, e.g. {feats.skipped[:3]})")
    return feats, hit


def _extract_split(encoder: nn.Module, ds: Dataset, split: str, prepare: Any, run: _Run, store: FeatureStore
                   ) -> None:
    """The store's missing shards extracted by ``devices x num_nodes`` ranks (``zoo.eval.distributed``)."""
    import torch.distributed as dist

    from zoo.eval.distributed import extract_split, launched_rank

    cfg = run.cfg
    launched = launched_rank()
    if launched is not None and not dist.is_initialized():
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo", init_method="env://")
    if not store.exists and (launched is None or launched[0] == 0):  # laid out once, before any rank writes
        store.create(_feature_dim(encoder, ds, prepare, torch.device("cpu")))
    if launched is not None:
        dist.barrier()
        store = FeatureStore(store.root, store.key, store.n, store.dtype, store.requested_shard_rows)
    workers = max(0, cfg.num_workers // cfg.devices)
    extract_split({"encoder": encoder.cpu(), "dataset": ds, "prepare": prepare,
                   "collate": getattr(prepare, "collate", collate_indexed), "device": str(run.device),
                   "root": str(store.root), "key": store.key, "n": store.n, "dtype": store.dtype,
                   "shard_rows": store.shard_rows, "batch_size": cfg.extract_batch_size, "num_workers": workers,
                   "autocast": frozen_autocast(run.device, cfg.precision), "desc": f"{split} features",
                   "progress": cfg.progress, "devices": cfg.devices}, cfg.devices)


def _fast(train: Features, test: Features, num_classes: int, run: _Run, n_train: int, points: GridPoints
          ) -> dict[str, Any]:
    cfg, dev = run.cfg, run.device
    head_args = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, device=dev,
                     feature_norm=cfg.feature_norm, progress=cfg.progress)
    # split on dataset indices (not feature rows) so protocol mode holds out exactly the same images
    held_mask = torch.isin(train.index, heldout_split(n_train, cfg.heldout, cfg.seed)[1]) \
        if len(cfg.lr_grid) > 1 else None

    def run_pass(grid_lrs: list[float], final_lrs: list[float]) -> PassResult:
        lrs = grid_lrs + final_lrs
        what = "held-out grid and final heads" if grid_lrs else "final head on all of train"
        heads = train_heads(train, num_classes, lrs, masked=[True] * len(grid_lrs) + [False] * len(final_lrs),
                            heldout=held_mask if grid_lrs else None,
                            desc=f"linear heads, base lr {'/'.join(map(str, sorted(set(lrs))))} ({what})",
                            **head_args)
        held = train.subset(torch.nonzero(held_mask).flatten()) if grid_lrs else None
        grid_acc = evaluate_heads(heads[:len(grid_lrs)], held) if grid_lrs else []
        final_acc = evaluate_heads(heads[len(grid_lrs):], test)
        g = len(grid_lrs)
        return {"grid": {lr: (acc[1], divergence(h, h.last_loss, num_classes))
                         for lr, h, acc in zip(grid_lrs, heads[:g], grid_acc)},
                "final": {lr: {"top1": acc[1], "top5": acc[5], "diverged": divergence(h, h.last_loss, num_classes)}
                          for lr, h, acc in zip(final_lrs, heads[g:], final_acc)}}

    return search_and_final(cfg, points, run.notices, run_pass)


def _check_classes(train: Dataset, test: Dataset) -> None:
    a, b = getattr(_root(train), "classes", None), getattr(_root(test), "classes", None)
    if a and b and list(a) != list(b):
        only = sorted(set(b) - set(a))[:3] or sorted(set(a) - set(b))[:3]
        raise ValueError(f"the val split's classes differ from train's ({len(b)} vs {len(a)} classes, e.g. {only}"
                         " in one only): give both splits the same class folders")


def evaluate(encoder: nn.Module, train_ds: Dataset, test_ds: Dataset, mode: str = "fast",
             cfg: ProbeConfig | None = None, prepare_train: Callable | None = None,
             prepare_test: Callable | None = None, data_id: str = "dataset", out: str | Path | None = None
             ) -> dict[str, Any]:
    """Evaluate ``encoder`` on (train, test) datasets; returns top1/top5 (percent), counts and timings.

    ``prepare_*`` map a batch dict to the encoder's input; default: the linear-eval image views of ``cfg``. With
    ``out``, finished lr-grid points (and, without a cache, the features) are kept there and resumed.
    """
    cfg = cfg or ProbeConfig()
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    t0 = time.perf_counter()
    train_ds, test_ds = _cap(train_ds, cfg.max_train), _cap(test_ds, cfg.max_test)
    _check_classes(train_ds, test_ds)
    notices = _Notices()
    run = _Run(cfg, mode, len(train_ds), notices)
    cfg = run.cfg
    out = Path(out) if out is not None else None
    views = dict(eval_crop=cfg.eval_crop, resize_kernel=cfg.resize_kernel, crop_sampler=cfg.crop_sampler)
    prepare_test = prepare_test or ImagePrepare(cfg.image_size, cfg.resize, **views)
    enc_hash = weights_sha256(encoder)
    data_fp = {"train": dataset_fingerprint(train_ds), "test": dataset_fingerprint(test_ds)}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in IDENTITY_IGNORED}
    points = GridPoints(out, {"mode": mode, "settings": settings, "encoder": enc_hash, "data": data_fp["train"]})
    counts: dict[str, Any] = {"train": len(train_ds), "test": len(test_ds)}
    if mode == "protocol":
        from zoo.eval.protocol import run_protocol

        if prepare_train is None:
            prepare_train = (prepare_test if cfg.train_augment == "center_crop"
                             else ImagePrepare(cfg.image_size, cfg.resize, train=True, **views))
        num_features = _feature_dim(encoder, test_ds, prepare_test, torch.device("cpu"))
        num_classes = _num_classes(_root(train_ds), None)
        with quiet_decode_log():  # skipped files are named below, once, not as batch indices per batch
            res = run_protocol(encoder, train_ds, test_ds, num_features, num_classes, cfg, prepare_train,
                               prepare_test, out, run.loader, lambda n: heldout_split(n, cfg.heldout, cfg.seed),
                               points, notices, run.device)
        skipped = res.pop("skipped")
        for split in ("train", "test"):
            if skipped[split]:
                notices.say(skipped_line(f"protocol {split} images", sorted(skipped[split])))
        counts.update(skipped_train=len(skipped["train"]), skipped_test=len(skipped["test"]),
                      skipped_files=sorted(skipped["train"] | skipped["test"])[:50])
        extract_s = 0.0
    else:
        with tempfile.TemporaryDirectory(prefix="zoo-probe-") as scratch:
            feats = {}
            hits = []
            for split, ds in (("train", train_ds), ("test", test_ds)):
                key = {"encoder": enc_hash, "data": data_fp[split], "split": split, "precision": cfg.precision,
                       "dtype": feature_dtype(cfg.feature_dtype, run.device),
                       "prepare": prepare_test.describe() if hasattr(prepare_test, "describe") else repr(prepare_test),
                       "v": 2}
                feats[split], hit = _features(encoder, ds, split, prepare_test, run, key, out, Path(scratch))
                hits.append(hit)
            train_f, test_f = feats["train"], feats["test"]
            extract_s = time.perf_counter() - t0
            num_classes = _num_classes(_root(train_ds), torch.cat([train_f.labels, test_f.labels]))
            counts.update(skipped_train=len(train_f.skipped), skipped_test=len(test_f.skipped),
                          skipped_files=(train_f.skipped + test_f.skipped)[:50], cache_hit=all(hits))
            if mode == "fast":
                res = _fast(train_f, test_f, num_classes, run, len(train_ds), points)
            else:
                per_k = knn_evaluate_store(train_f, test_f, num_classes, cfg.knn_k, cfg.knn_temperature, run.device)
                first = per_k[str(cfg.knn_k[0])]
                res = {"top1": first["top1"], "top5": first["top5"], "k": cfg.knn_k[0], "knn": per_k}
            del train_f, test_f, feats  # the memory maps, before their scratch folder goes
    if len(cfg.lr_grid) > 1 and mode != "knn":
        counts["heldout"] = heldout_count(counts["train"], cfg.heldout)[1]
    if mode != "knn":
        steps = cfg.epochs * math.ceil(max(counts["train"] - counts.get("heldout", 0), 1) / cfg.batch_size)
        advice = divergence_advice(res["diverged"], cfg.lr_grid, cfg.feature_norm, steps, res.get("base_lr"))
        if advice:
            notices.say(advice)
            res["advice"] = advice
    return {**res, "mode": mode, "counts": counts, "num_classes": num_classes, "encoder_sha256": enc_hash,
            "notices": notices.lines, "effective": {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers},
            "seconds": {"total": time.perf_counter() - t0, "features": extract_s}}


def run_probe(backbone: str, data: str, mode: str = "fast", out: str | Path | None = None,
              cfg: ProbeConfig | None = None, which: str | None = None, padding: str | None = None,
              arch: str | None = None, overwrite: bool = False, recipe: str | None = None) -> dict[str, Any]:
    """Load ``backbone`` (any ``zoo.load_backbone`` source), probe it on ``data``; writes ``out/metrics.json`` and
    ``out/metrics.md``. Rerunning into the same ``out`` resumes; another probe's ``out`` is refused unless
    ``overwrite``."""
    from zoo.data.images import build_dataset
    from zoo.weights import load_backbone

    cfg = cfg or ProbeConfig()
    encoder = load_backbone(backbone, which=which, padding=padding, arch=arch)
    which = getattr(encoder, "zoo_which", which)  # the encoder the source declared first, when which is None
    tool = {"backbone": backbone, "data": data, "mode": mode, "which": which, "padding": padding, "arch": arch}
    if out is not None and is_main_process():  # the other ranks never claim: --overwrite would clear rank 0's files
        if claim(out, identity(tool, dataclasses.asdict(cfg)), overwrite):
            print(f"probe: resuming the probe in {out} (same arguments; --overwrite starts over)", file=sys.stderr)
    # on a GPU the loader hands over the files' bytes and the batch is decoded there (nvjpeg); on a CPU the loader
    # workers decode in parallel
    decode = "device" if _device(cfg.device).type == "cuda" else "worker"
    train = build_dataset(data, "train", decode=decode, image_size=cfg.data_image_size)
    test = build_dataset(data, "val", decode=decode, image_size=cfg.data_image_size)
    metrics = evaluate(encoder, train, test, mode, cfg, out=out)
    metrics = {"top1": metrics.pop("top1"), "top5": metrics.pop("top5"), "mode": mode, "backbone": backbone,
               "dataset": data, "arch": getattr(encoder, "zoo_arch", None), "which": which,
               "padding": getattr(encoder, "zoo_padding", None), **metrics, "config": dataclasses.asdict(cfg)}
    if recipe:
        metrics["recipe"] = recipe
    if out is not None and is_main_process():  # under DDP every rank has it; rank 0 writes
        from zoo.files import atomic_write_text

        atomic_write_text(Path(out) / "metrics.json", json.dumps(metrics, indent=2, default=str))
        atomic_write_text(Path(out) / "metrics.md", markdown_report(metrics))
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

