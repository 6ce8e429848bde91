"""Encoders and feature extraction for the probe: any module mapping a batch to [B, D], images or tokens.

An *encoder* is an ``nn.Module`` taking one tensor and returning features [B, D]; a *prepare* callable turns a
collated batch dict into that tensor (image views for vision, token ids for language models). Extracted features
are written to a memory-mapped store (``zoo.eval.store``) keyed by the encoder's weights, the data and the transform,
so repeated runs and every learning rate of a sweep reuse one pass over the data. Raw file bytes are decoded on the
device (``decode_on_device``); the frozen forward autocasts to bf16 on CUDA only (``frozen_autocast``).
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from zoo.eval.store import Features, FeatureStore

__all__ = ["Features", "IndexedDataset", "collate_indexed", "collate_tokens", "ImagePrepare", "MeanPooledLM",
           "TokenPrepare", "decode_on_device", "frozen_autocast",
           "extract_features", "extract_to_store", "weights_fingerprint", "default_cache_dir", "skipped_line",
           "quiet_decode_log"]

Prepare = Callable[[dict[str, Any], torch.Generator | None], torch.Tensor]


PADDING = (None, -1, None, -1)  # the item of a padding place: dropped by ``collate_indexed``


class IndexedDataset(Dataset):
    """Wraps a dataset so each sample also carries its dataset index (to split train/held-out identically
    in every mode, whatever images were skipped)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple:
        if i < 0:  # a sampler's padding place (``EpochShuffleSampler(mark_padding=True)``): nothing is read
            return PADDING
        item = self.dataset[i]
        path = item[2] if len(item) > 2 else f"#{i}"
        return item[0], item[1], path, i


def collate_indexed(batch: list[tuple]) -> dict[str, Any]:
    """``zoo.data.collate_images`` plus ``index`` (LongTensor of the kept samples' dataset indices); padding places
    leave the batch unseen (they are neither images nor skipped files)."""
    from zoo.data.images import collate_images

    batch = [item for item in batch if item[3] >= 0]  # identity is lost when a loader worker pickles the item
    out = collate_images([item[:3] for item in batch])
    kept = [item for item in batch if item[0] is not None]
    out["index"] = torch.tensor([item[3] for item in kept], dtype=torch.long)
    out["path"] = [str(item[2]) for item in kept]  # names a file that only the device decoder finds bad
    return out


def decode_on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch of raw file bytes (``decode="device"`` datasets) decoded on ``device`` (nvjpeg on a GPU, the CPU
    decoder elsewhere); undecodable files leave the batch (label, index) and join ``skipped`` by name."""
    images = batch.get("image")
    if not (isinstance(images, list) and images and images[0].dim() == 1):
        return batch
    from augment.decode import decode_batch

    decoded, bad = decode_batch(images, device)
    out = dict(batch, image=decoded)
    if bad:
        keep = [i for i in range(len(images)) if i not in set(bad)]
        names = batch.get("path") or [f"#{int(j)}" for j in batch["index"].tolist()]
        out["skipped"] = list(batch.get("skipped", [])) + [names[i] for i in sorted(bad)]
        sel = torch.tensor(keep, dtype=torch.long)
        out["label"] = batch["label"][sel.to(batch["label"].device)]
        out["index"] = batch["index"][sel.to(batch["index"].device)]
        out["path"] = [names[i] for i in keep]
    return out


def frozen_autocast(device: torch.device | str, precision: str) -> bool:
    """Whether the frozen encoder's forward runs under bf16 autocast: on CUDA only (``auto`` or ``bf16-*``), never on
    a CPU (CPU bf16 autocast is slower than fp32 on most hosts and would change the CPU figures)."""
    return torch.device(device).type == "cuda" and precision in ("auto", "bf16-mixed", "bf16-true", "bf16")


class ImagePrepare:
    """Batch -> normalised image tensor: the linear-eval test view (by default the BYOL authors' central
    ``size / resize`` square resized to ``size``; ``eval_crop="resize_then_crop"``: short side to ``resize`` then
    centre crop) or, with ``train=True``, random resized crop + flip (``augment``'s presets). ``resize_kernel`` and
    ``crop_sampler``: see ``augment.presets``."""

    collate = staticmethod(collate_indexed)

    def __init__(self, size: int = 224, resize: int | None = 256, train: bool = False, eval_crop: str = "official",
                 resize_kernel: str = "tf_bicubic", crop_sampler: str = "official") -> None:
        from augment import LinearEvalTest, LinearEvalTrain

        self.size, self.resize, self.train = size, resize, train
        self.eval_crop, self.resize_kernel, self.crop_sampler = eval_crop, resize_kernel, crop_sampler
        self.view = (LinearEvalTrain(size, resize_kernel=resize_kernel, crop_sampler=crop_sampler) if train else
                     LinearEvalTest(size, resize, resize_kernel=resize_kernel, eval_crop=eval_crop))

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The view of the batch's images; ``rows=(offset, total)``: the batch is those rows of a global batch split
        between ranks, and draws the random view of them that one device would (``augment.params``)."""
        return self.view(batch["image"], generator=generator, rows=rows)

    def describe(self) -> dict[str, Any]:
        """Identity of the transform, for the feature-cache key."""
        out = {"kind": "image", "size": self.size, "resize": self.resize, "train": self.train,
               "resize_kernel": self.resize_kernel}
        out.update({"crop_sampler": self.crop_sampler} if self.train else {"eval_crop": self.eval_crop})
        return out


def collate_tokens(batch: list[tuple]) -> dict[str, Any]:
    """Token samples ``(ids [T], label, name, index)`` -> ``{'tokens' [B, T], 'label', 'index', 'skipped'}``;
    padding places are dropped, as by ``collate_indexed``."""
    batch = [item for item in batch if item[3] >= 0]
    tokens = [torch.as_tensor(item[0]) for item in batch]
    return {"tokens": torch.stack(tokens) if tokens else torch.zeros(0, 0, dtype=torch.long),
            "label": torch.tensor([int(item[1]) for item in batch], dtype=torch.long),
            "index": torch.tensor([item[3] for item in batch], dtype=torch.long), "skipped": []}


class TokenPrepare:
    """Batch -> token ids [B, T] for language-model probes (datasets yield ``(ids [T], label)``)."""

    collate = staticmethod(collate_tokens)

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
        return batch["tokens"]

    def describe(self) -> dict[str, Any]:
        """Identity of the transform, for the feature-cache key."""
        return {"kind": "tokens"}


class MeanPooledLM(nn.Module):
    """A language model as a probe encoder: final hidden states (``return_hidden=True``) averaged over the
    non-padding tokens. Works with ``zoo.models.transformer.Transformer`` or anything returning (logits, hidden)."""

    def __init__(self, model: nn.Module, pad_id: int | None = None) -> None:
        super().__init__()
        self.model, self.pad_id = model, pad_id
        cfg = getattr(model, "config", None)
        self.num_features = int(getattr(cfg, "d_model", 0) or getattr(cfg, "hidden_size", 0) or 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features [B, D]."""
        out = self.model(tokens, return_hidden=True)
        hidden = out[1] if isinstance(out, tuple) else out
        if self.pad_id is None:
            return hidden.float().mean(1)
        mask = (tokens != self.pad_id).unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).float()


def weights_fingerprint(model: nn.Module) -> str:
    """Short hash of every parameter and buffer (shape, sum, sum of squares): changes whenever the weights do."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            tf = t.detach().double() if t.is_floating_point() else t.detach().to(torch.float64)
            h.update(f"{name}{tuple(t.shape)}{tf.sum().item():.10e}{tf.square().sum().item():.10e}".encode())
    h.update(type(model).__name__.encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``features`` in byol-zoo's cache folder (``zoo.files.cache_dir``: ``$ZOO_CACHE_DIR`` or ``~/.cache/byol-zoo``)."""
    from zoo.files import cache_dir

    return cache_dir("features")


def _to_device(v: Any, device: torch.device) -> Any:
    if torch.is_tensor(v):
        return v.to(device, non_blocking=True)
    if isinstance(v, list) and v and torch.is_tensor(v[0]):  # images of different sizes
        return [x.to(device, non_blocking=True) for x in v]
    return v


class _QuietDecode(logging.Filter):
    """Drops augment.decode's per-batch "skipped ... at batch indices" lines: the probe names the files instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("decode_batch: skipped")


@contextmanager
def quiet_decode_log() -> Iterator[None]:
    """While extracting, name skipped files (``skipped_line``) instead of logging batch indices (workers fork with
    the filter in place)."""
    log, filt = logging.getLogger("augment.decode"), _QuietDecode()
    log.addFilter(filt)
    try:
        yield
    finally:
        log.removeFilter(filt)


def skipped_line(where: str, paths: list[str]) -> str:
    """The line ``zoo fit`` writes for undecodable images (first ten paths named), for one split of the probe."""
    shown = ", ".join(paths[:10])
    return f"{where}: skipped {len(paths)} undecodable images: {shown}" + (" ..." if len(paths) > 10 else "")


def _batches(encoder: nn.Module, loader: DataLoader, prepare: Prepare, device: torch.device, desc: str,
             progress: bool, autocast: bool) -> Iterator[tuple[int, dict[str, Any], torch.Tensor | None]]:
    """(number of samples in the batch, batch, features or None) for each batch, encoder frozen in eval mode."""
    from zoo.progress import track

    was_training = encoder.training
    encoder.eval()
    try:
        with quiet_decode_log():
            for batch in track(loader, desc, total=len(loader), enabled=progress):
                size = len(batch["label"]) + len(batch.get("skipped", []))
                if not len(batch["label"]):
                    yield size, batch, None
                    continue
                moved = decode_on_device({k: _to_device(v, device) for k, v in batch.items()}, device)
                if not len(moved["label"]):
                    yield size, moved, None
                    continue
                batch = moved
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    f = encoder(prepare(moved, None))
                yield size, batch, f.float().cpu()
    finally:
        encoder.train(was_training)


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, prepare: Prepare, device: torch.device | str = "cpu",
                     desc: str = "features", progress: bool = True, autocast: bool = False) -> Features:
    """One pass of a frozen encoder (eval mode) over ``loader``, in memory (the pretraining kNN monitor's small sets;
    the probe writes to a ``FeatureStore`` with ``extract_to_store``); counts and names the skipped samples."""
    device = torch.device(device)
    total = len(loader.dataset)  # type: ignore[arg-type]
    feats: torch.Tensor | None = None  # preallocated on the first batch, never twice
    labels = torch.full((total,), -1, dtype=torch.long)
    read = torch.zeros(total, dtype=torch.bool)
    skipped: list[str] = []
    for _, batch, f in _batches(encoder, loader, prepare, device, desc, progress, autocast):
        skipped += list(batch.get("skipped", []))
        if f is None:
            continue
        if feats is None:
            feats = torch.zeros(total, f.shape[1], dtype=torch.float32)
        idx = batch["index"].cpu()
        feats[idx], labels[idx], read[idx] = f, batch["label"].cpu(), True
    if feats is None:
        raise ValueError(f"{desc}: no sample could be read ({len(skipped)} skipped, e.g. {skipped[:3]}).")
    return Features(feats, labels, torch.nonzero(read).flatten(), skipped)


@torch.no_grad()
def extract_to_store(encoder: nn.Module, ds: Dataset, make_loader: Callable[[Dataset], DataLoader],
                     prepare: Prepare, device: torch.device, store: FeatureStore, desc: str, progress: bool = True,
                     autocast: bool = False, rank: int = 0, world: int = 1) -> int:
    """Extract the shards of ``store`` not yet written (this rank's: shard i goes to rank i % world), shard by shard;
    returns how many shards were already there. ``make_loader`` builds the (sequential) loader of a dataset."""
    if not store.exists:
        store.create(_feature_dim(encoder, ds, prepare, device))
    done = set(store.done())
    pending = [i for i in range(store.num_shards()) if i not in done and i % world == rank]
    positions = [r for i in pending for r in range(*store.shard_range(i))]
    if not positions:
        return len(done)
    open_shards: dict[int, dict[str, Any]] = {}
    pos = 0  # samples of ``positions`` consumed: the loader is sequential, so batch b covers the next ``size`` ones
    loader = make_loader(Subset(ds, positions))
    for size, batch, f in _batches(encoder, loader, prepare, device, desc, progress, autocast):
        kept = {int(j): k for k, j in enumerate(batch["index"].tolist())}  # subset position -> row of the batch
        batch_labels = batch["label"].tolist()  # one transfer, not one per row
        names = iter(batch.get("skipped", []))
        for j in range(pos, pos + size):
            row = positions[j]
            i = row // store.shard_rows
            start, end = store.shard_range(i)
            sh = open_shards.get(i)
            if sh is None:
                sh = open_shards[i] = {"feats": torch.zeros(end - start, store.dim), "left": end - start,
                                       "labels": torch.full((end - start,), -1, dtype=torch.long),
                                       "read": torch.zeros(end - start, dtype=torch.bool), "skipped": []}
            if j in kept:
                sh["feats"][row - start] = f[kept[j]]
                sh["labels"][row - start] = batch_labels[kept[j]]
                sh["read"][row - start] = True
            else:
                sh["skipped"].append(next(names, f"#{row}"))
            sh["left"] -= 1
            if not sh["left"]:
                store.write_shard(i, sh["feats"], sh["labels"], sh["read"], sh["skipped"])
                del open_shards[i]
        pos += size
    return len(done)


def _feature_dim(encoder: nn.Module, ds: Dataset, prepare: Prepare, device: torch.device) -> int:
    """The encoder's feature size: ``num_features`` or one forward of the first readable sample."""
    d = getattr(encoder, "num_features", None)
    if d:
        return int(d)
    collate = getattr(prepare, "collate", collate_indexed)
    was = encoder.training
    encoder.eval()
    try:
        for i in range(len(ds)):  # type: ignore[arg-type]
            batch = collate([IndexedDataset(ds)[i]])
            if len(batch["label"]):
                with torch.no_grad():
                    moved = decode_on_device({k: _to_device(v, device) for k, v in batch.items()}, device)
                    if len(moved["label"]):
                        return int(encoder(prepare(moved, None)).shape[1])
    finally:
        encoder.train(was)
    raise ValueError(f"no sample of the {len(ds)} could be read")  # type: ignore[arg-type]
