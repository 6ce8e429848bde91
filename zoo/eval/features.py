"""Encoders and feature extraction for the probe: any module mapping a batch to [B, D], images or tokens.

An *encoder* is an ``nn.Module`` taking one tensor and returning features [B, D]; a *prepare* callable turns a
collated batch dict into that tensor (image views for vision, token ids for language models). Extracted features
are cached to disk (safetensors) keyed by the encoder's weights, the data and the transform, so repeated runs and
every learning rate of a sweep reuse one pass over the data.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from zoo.weights.safe_load import read_safetensors, write_safetensors

__all__ = ["Features", "IndexedDataset", "collate_indexed", "collate_tokens", "ImagePrepare", "MeanPooledLM",
           "TokenPrepare",
           "extract_features", "weights_fingerprint", "default_cache_dir", "cached_features"]

Prepare = Callable[[dict[str, Any], torch.Generator | None], torch.Tensor]


@dataclass
class Features:
    """Features of one split: ``feats`` [N, D] float32, ``labels`` [N], dataset ``index`` [N], skipped file paths."""

    feats: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    skipped: list[str] = field(default_factory=list)

    def subset(self, rows: torch.Tensor) -> "Features":
        """The rows ``rows`` (positions, not dataset indices)."""
        return Features(self.feats[rows], self.labels[rows], self.index[rows], [])

    def __len__(self) -> int:
        return len(self.labels)


class IndexedDataset(Dataset):
    """Wraps a dataset so each sample also carries its dataset index (to split train/held-out identically
    in every mode, whatever images were skipped)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        path = item[2] if len(item) > 2 else f"#{i}"
        return item[0], item[1], path, i


def collate_indexed(batch: list[tuple]) -> dict[str, Any]:
    """``zoo.data.collate_images`` plus ``index`` (LongTensor of the kept samples' dataset indices)."""
    from zoo.data.images import collate_images

    out = collate_images([item[:3] for item in batch])
    out["index"] = torch.tensor([item[3] for item in batch if item[0] is not None], dtype=torch.long)
    return out


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

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.view(batch["image"], generator=generator)

    def describe(self) -> dict[str, Any]:
        """Identity of the transform, for the feature-cache key."""
        out = {"kind": "image", "size": self.size, "resize": self.resize, "train": self.train,
               "resize_kernel": self.resize_kernel}
        out.update({"crop_sampler": self.crop_sampler} if self.train else {"eval_crop": self.eval_crop})
        return out


def collate_tokens(batch: list[tuple]) -> dict[str, Any]:
    """Token samples ``(ids [T], label, name, index)`` -> ``{'tokens' [B, T], 'label', 'index', 'skipped'}``."""
    return {"tokens": torch.stack([torch.as_tensor(item[0]) for item in batch]),
            "label": torch.tensor([int(item[1]) for item in batch], dtype=torch.long),
            "index": torch.tensor([item[3] for item in batch], dtype=torch.long), "skipped": []}


class TokenPrepare:
    """Batch -> token ids [B, T] for language-model probes (datasets yield ``(ids [T], label)``)."""

    collate = staticmethod(collate_tokens)

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
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


def _progress(total: int, desc: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not enabled,
                    transient=True)
    return prog, prog.add_task(desc, total=total)


def _to_device(v: Any, device: torch.device) -> Any:
    if torch.is_tensor(v):
        return v.to(device, non_blocking=True)
    if isinstance(v, list) and v and torch.is_tensor(v[0]):  # images of different sizes
        return [x.to(device, non_blocking=True) for x in v]
    return v


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, prepare: Prepare, device: torch.device | str = "cpu",
                     desc: str = "features", progress: bool = True, autocast: bool = False) -> Features:
    """One pass of a frozen encoder (eval mode) over ``loader``; counts and names the skipped samples."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    total = len(loader.dataset)  # type: ignore[arg-type]
    feats: torch.Tensor | None = None  # preallocated on the first batch: ImageNet x 2048-d is 10 GB, never twice
    labels = torch.empty(total, dtype=torch.long)
    index = torch.empty(total, dtype=torch.long)
    skipped: list[str] = []
    n = 0
    prog, task = _progress(len(loader), desc, progress)
    try:
        with prog:
            for batch in loader:
                skipped += list(batch.get("skipped", []))
                if len(batch["label"]):
                    batch = {k: _to_device(v, device) for k, v in batch.items()}
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        f = encoder(prepare(batch, None))
                    if feats is None:
                        feats = torch.empty(total, f.shape[1], dtype=torch.float32)
                    b = len(f)
                    feats[n:n + b] = f.float().cpu()
                    labels[n:n + b] = batch["label"].cpu()
                    index[n:n + b] = batch["index"].cpu()
                    n += b
                prog.advance(task)
    finally:
        encoder.train(was_training)
    if feats is None:
        raise ValueError(f"{desc}: no sample could be read ({len(skipped)} skipped, e.g. {skipped[:3]}).")
    return Features(feats[:n], labels[:n], index[:n], skipped)


def cached_features(key: dict[str, Any], cache_dir: str | os.PathLike | None, compute: Callable[[], Features]
                    ) -> tuple[Features, bool]:
    """Return cached features for ``key`` (a JSON-able description) or compute and store them; (features, hit)."""
    if cache_dir is None:
        return compute(), False
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"{digest}.safetensors"
    if path.exists():
        try:
            t, meta = read_safetensors(path)
            skipped = list((meta.get("zoo") or {}).get("skipped", []))
            return Features(t["feats"], t["labels"], t["index"], skipped), True
        except (ValueError, KeyError):
            pass  # a damaged cache entry is recomputed and overwritten
    feats = compute()
    write_safetensors(path, {"feats": feats.feats, "labels": feats.labels, "index": feats.index},
                      {"key": key, "skipped": feats.skipped})  # atomic: a concurrent reader never sees half a file
    return feats, False
