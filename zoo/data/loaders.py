"""The image DataModule: datasets from ``zoo.data.images``, reproducible order, uint8 batches for on-device augmentation."""
from __future__ import annotations

from typing import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from zoo.data.images import build_dataset, collate_images


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run replays the same data order.

    Lightning calls ``set_epoch`` at each epoch start (and wraps this sampler for DDP).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ImageDataModule(pl.LightningDataModule):
    """Images for pretraining and evaluation.

    Args:
        dataset: ``digits`` (embedded, real handwritten digits), ``cifar10:<dir>``, ``cifar100:<dir>`` or
            ``imagefolder:<dir>`` (ImageNet layout).
        batch_size: per-device batch size (the global batch is this times devices times nodes).
        num_workers: loader worker processes.
        image_size: side of the embedded digits after upsampling (other datasets keep their own size).
        decode: ``worker`` (CPU decode in the workers) or ``device`` (raw JPEG bytes, decoded after transfer).
        seed: data-order seed.
    """

    def __init__(self, dataset: str = "digits", batch_size: int = 256, num_workers: int = 4, image_size: int = 32,
                 decode: str = "worker", seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.image_size, self.decode, self.seed = image_size, decode, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _build(self, split: str) -> Dataset:
        return build_dataset(self.dataset, split, decode=self.decode, image_size=self.image_size)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (once) and check the batch against the device count."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.train_set is None:
            self.train_set = self._build("train")
            self.val_set = self._build("val")
        if self.trainer is not None and self.batch_size * world < world:
            raise ValueError(f"data.batch_size {self.batch_size} is smaller than the {world} devices")
        if len(self.train_set) < self.batch_size:
            raise ValueError(f"data.batch_size {self.batch_size} is larger than the {len(self.train_set)} training "
                             f"images of {self.dataset!r}; lower it")

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset (builds the training split if needed)."""
        if self.train_set is None:
            self.train_set = self._build("train")
        return len(self.train_set.classes)

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(ds), self.seed, shuffle=train),
                          drop_last=train,  # a last batch of 1 would break batch norm
                          num_workers=self.num_workers, collate_fn=collate_images,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
