"""Weighted kNN classification on features (cosine similarity, votes exp(sim / T)) and a Lightning callback
that runs it every N epochs during pretraining."""
from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["knn_scores", "topk_accuracy", "knn_evaluate", "knn_evaluate_store", "KNNProbeCallback"]


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [N_test, C]: sum over the k most cosine-similar training samples of exp(sim / T) per class."""
    if len(train_feats) == 0:
        raise ValueError("kNN needs at least one training feature")
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)
    out = []
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start:start + chunk].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels.to(bank.device)[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k (k capped at the number of classes)."""
    labels = labels.to(scores.device)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    n = max(len(labels), 1)
    return {k: 100.0 * hit[:, :min(k, scores.shape[1])].any(1).sum().item() / n for k in ks}


def knn_evaluate(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: Sequence[int] = (20, 200),
                 temperature: float = 0.07) -> dict[str, dict[str, float]]:
    """{str(k): {'top1', 'top5'}} for each k."""
    res = {}
    for k in ks:
        acc = topk_accuracy(knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature), test_labels)
        res[str(k)] = {"top1": acc[1], "top5": acc[5]}
    return res


@torch.no_grad()
def knn_evaluate_store(train: Any, test: Any, num_classes: int, ks: Sequence[int] = (20, 200),
                       temperature: float = 0.07, device: torch.device | str = "cpu", bank_chunk: int | None = None,
                       query_chunk: int = 4096) -> dict[str, dict[str, float]]:
    """``knn_evaluate`` over ``Features`` (memory-mapped is fine) on ``device``: the bank is read once, ``bank_chunk``
    rows at a time, each chunk's similarities to every query (``query_chunk`` queries per matmul) merged into a
    running top-max(k); every k of ``ks`` is scored from that one pass."""
    if len(train) == 0:
        raise ValueError("kNN needs at least one training feature")
    device = torch.device(device)
    kmax = min(max(ks), len(train))
    queries = torch.cat([F.normalize(x, dim=1) for _, x in test.chunks(query_chunk)]).to(device) if len(test) \
        else torch.zeros(0, train.dim, device=device)
    train_labels = train.labels.to(device)
    top_sim = torch.full((len(queries), 0), float("-inf"), device=device)
    top_idx = torch.zeros((len(queries), 0), dtype=torch.long, device=device)
    for pos, x in train.chunks(bank_chunk):  # default ~16 MiB of the bank at a time
        bank = F.normalize(x.to(device), dim=1)
        for q0 in range(0, len(queries), query_chunk):
            sim = queries[q0:q0 + query_chunk] @ bank.T
            cand_sim = torch.cat([top_sim[q0:q0 + query_chunk], sim], 1)
            cand_idx = torch.cat([top_idx[q0:q0 + query_chunk], pos.to(device).expand(len(sim), -1)], 1)
            v, j = cand_sim.topk(min(kmax, cand_sim.shape[1]), dim=1)
            if q0 == 0:
                new_sim = torch.empty(len(queries), v.shape[1], device=device)
                new_idx = torch.empty(len(queries), v.shape[1], dtype=torch.long, device=device)
            new_sim[q0:q0 + query_chunk], new_idx[q0:q0 + query_chunk] = v, cand_idx.gather(1, j)
        if len(queries):
            top_sim, top_idx = new_sim, new_idx
    res = {}
    for k in ks:
        kk = min(k, kmax)  # topk is sorted: the first kk of the top-kmax are the top-kk
        votes = torch.zeros(len(queries), num_classes, device=device)
        votes.scatter_add_(1, train_labels[top_idx[:, :kk]], (top_sim[:, :kk] / temperature).exp())
        acc = topk_accuracy(votes, test.labels.to(device))
        res[str(k)] = {"top1": acc[1], "top5": acc[5]}
    return res


class KNNProbeCallback(pl.Callback):
    """kNN accuracy of the encoder every ``every_n_epochs`` epochs during pretraining (logged as ``knn/top1``...).

    Args:
        every_n_epochs: run after every N-th training epoch.
        k: neighbours; the first is logged as ``knn/top1``/``knn/top5``, others as ``knn/top1_k<k>``.
        data: dataset spec for ``zoo.data.build_dataset`` ("digits", "imagefolder:/root", ...); its ``train`` split is
            the memory bank and ``val`` the queries. Or pass ``train_dataset``/``val_dataset`` objects.
        encoder_attr: attribute of the LightningModule holding the encoder; None: the one the module declares (its
            ``encoder_attr``: the trained encoder of a ``zoo.train.ssl.ImagePretraining`` method), else its first
            child module whose name ends in ``encoder``.
        size, resize: the linear-eval test view applied to every image.
        eval_crop, resize_kernel: that view's order and resampling (``zoo.eval.features.ImagePrepare``; defaults:
            the BYOL authors' central square and TF2 bicubic).
        max_train, max_val: use N samples of each split, evenly spaced (every class of a class-sorted folder is
            kept); the defaults (20,000 / 10,000) keep the monitor to ~0.6% of an ImageNet BYOL epoch's compute
            (30,000 forward passes against 1.28M x 2 views x (online forward+backward + target forward)); None: all.
        num_workers: loader processes decoding images (None: min(8, CPU count)).
    """

    def __init__(self, every_n_epochs: int = 1, k: int | Sequence[int] = 20, temperature: float = 0.07,
                 data: str | None = None, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
                 encoder_attr: str | None = None, size: int = 224, resize: int | None = 256,
                 batch_size: int = 256, num_workers: int | None = None, max_train: int | None = 20_000,
                 max_val: int | None = 10_000, image_size: int = 32, eval_crop: str = "official",
                 resize_kernel: str = "tf_bicubic") -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if data is None and (train_dataset is None or val_dataset is None):
            raise ValueError("KNNProbeCallback needs data='<spec>' or both train_dataset and val_dataset")
        self.every_n_epochs, self.temperature = every_n_epochs, temperature
        self.ks = [k] if isinstance(k, int) else list(k)
        self.data, self.encoder_attr, self.size, self.resize = data, encoder_attr, size, resize
        import os

        workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.batch_size, self.num_workers, self.image_size = batch_size, workers, image_size
        self.max_train, self.max_val = max_train, max_val
        self.eval_crop, self.resize_kernel = eval_crop, resize_kernel
        self._train, self._val = train_dataset, val_dataset
        self.history: list[dict[str, Any]] = []

    def _datasets(self) -> tuple[Dataset, Dataset]:
        if self._train is None or self._val is None:
            from zoo.data.images import build_dataset

            self._train = build_dataset(self.data, "train", image_size=self.image_size)
            self._val = build_dataset(self.data, "val", image_size=self.image_size)
        # evenly spaced, not the first n: an ImageFolder is sorted by class, its first 20,000 images are ~16 classes
        cap = lambda ds, n: ds if n is None or n >= len(ds) else Subset(  # noqa: E731
            ds, [i * len(ds) // n for i in range(n)])
        return cap(self._train, self.max_train), cap(self._val, self.max_val)

    def _encoder(self, pl_module: pl.LightningModule) -> nn.Module:
        # the module's declared encoder; a module declaring none: its first ``*encoder`` child (registration order,
        # the trained encoder first -- the rule ``zoo.weights.backbone`` applies to checkpoints without a contract)
        attr = self.encoder_attr or getattr(pl_module, "encoder_attr", None) or next(
            (n for n, _ in pl_module.named_children() if n.endswith("encoder")), None)
        enc = getattr(pl_module, attr, None) if isinstance(attr, str) else None
        if not isinstance(enc, nn.Module):
            what = (f"module attribute {attr!r}" if isinstance(attr, str)
                    else "encoder (no encoder_attr, no *encoder child)")
            raise AttributeError(f"KNNProbeCallback: {type(pl_module).__name__} has no {what}; "
                                 f"set encoder_attr to the encoder's name.")
        return enc

    def _features(self, encoder: nn.Module, ds: Dataset, trainer: pl.Trainer, pl_module: pl.LightningModule):
        from zoo.eval.features import ImagePrepare, IndexedDataset, collate_indexed, extract_features

        world, rank = trainer.world_size, trainer.global_rank
        n = len(ds)  # type: ignore[arg-type]
        per = -(-n // world)
        # Each rank embeds its own shard (padded by repeating the last index so all_gather sees equal sizes).
        idx = [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]
        loader = DataLoader(IndexedDataset(Subset(ds, idx)), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=collate_indexed)
        prepare = ImagePrepare(self.size, self.resize, eval_crop=self.eval_crop, resize_kernel=self.resize_kernel)
        f = extract_features(encoder, loader, prepare, pl_module.device,
                             desc="knn features", progress=False)
        if world == 1:
            return f.feats[f.rows], f.labels
        if len(f.labels) != per:
            raise ValueError("KNNProbeCallback with several devices needs a dataset without undecodable images")
        feats = pl_module.all_gather(f.feats.to(pl_module.device)).reshape(world * per, -1)[:n]
        labels = pl_module.all_gather(f.labels.to(pl_module.device)).reshape(-1)[:n]
        return feats, labels

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the kNN monitor when the epoch number is a multiple of ``every_n_epochs``."""
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        enc = self._encoder(pl_module)
        train_ds, val_ds = self._datasets()
        num_classes = len(getattr(self._train, "classes", [])) or None
        tf, ty = self._features(enc, train_ds, trainer, pl_module)
        vf, vy = self._features(enc, val_ds, trainer, pl_module)
        num_classes = num_classes or int(max(ty.max(), vy.max()).item()) + 1
        res = knn_evaluate(tf, ty, vf, vy, num_classes, self.ks, self.temperature)
        for i, k in enumerate(self.ks):
            suffix = "" if i == 0 else f"_k{k}"
            pl_module.log(f"knn/top1{suffix}", res[str(k)]["top1"], rank_zero_only=True)
            pl_module.log(f"knn/top5{suffix}", res[str(k)]["top5"], rank_zero_only=True)
        self.history.append({"epoch": trainer.current_epoch, **res})
