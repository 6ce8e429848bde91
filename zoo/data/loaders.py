"""The image DataModule: datasets from ``zoo.data.images``, reproducible order, uint8 batches for on-device augmentation.

Resuming in the middle of an epoch replays exactly the batches the interrupted run had not trained on yet:
the order depends only on (seed, epoch), the shard only on (rank, world size), and the training loader is
``state_dict``-able (Lightning stores its position in the checkpoint and hands it back on ``--ckpt_path``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zoo.data.images import build_dataset, collate_images
from zoo.data.shards import NoSplit
from zoo.train.trainer import UsageError


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a permutation that depends only on (seed, epoch), so a resumed run replays the same order.

    Rank ``r`` of ``world`` takes ``perm[r::world]`` (the permutation padded by wrapping to a multiple of ``world``),
    so at every step the ranks together see the same images as one process with a ``world`` times larger batch.
    It is a ``DistributedSampler`` so that Lightning neither wraps nor reshuffles it under DDP (its wrapper would
    reshuffle with its own seed and never forward ``set_epoch``); Lightning calls ``set_epoch`` at each epoch start.
    ``num_replicas`` / ``rank`` left as None are read from ``torch.distributed`` when the sampler is used, so a
    sampler built before DDP starts still shards.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        # DistributedSampler.__init__ would query torch.distributed now; the shard is resolved at use instead.
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self._replicas, self._rank = num_replicas, rank
        self.drop_last = False
        self.dataset = range(n)
        self._start = 0

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        """World size of the shard."""
        if self._replicas is not None:
            return self._replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:  # type: ignore[override]
        """This process's rank in the shard."""
        rank = self._rank if self._rank is not None else (
            dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        if not 0 <= rank < self.num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {self.num_replicas})")
        return rank

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        """Indices this rank yields per epoch."""
        return math.ceil(self.n / self.num_replicas)

    @property
    def total_size(self) -> int:  # type: ignore[override]
        """Length of the padded global permutation."""
        return self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """Make the next iteration start at this rank's ``count``-th index (resume inside an epoch)."""
        self._start = max(0, int(count))

    def global_order(self) -> list[int]:
        """The permutation of the current epoch across all ranks (padded to a multiple of the world size)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        pad = self.total_size - len(order)
        return order + (order * math.ceil(pad / max(len(order), 1)))[:pad]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.global_order()[self.rank::self.num_replicas][start:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A DataLoader whose position (epoch, batches already trained on) goes into the checkpoint.

    ``progress`` reports the fit loop's (finished epochs, batches trained on in this epoch, batches per epoch): the
    loader cannot count that itself, because Lightning fetches ahead of training. On ``load_state_dict`` the next
    iteration selects the saved epoch's permutation and skips the consumed batches by index, without loading them.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int, int | float]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume: tuple[int, int] | None = None
        self._iter_epoch = 0  # the epoch whose batches the current iterator yields

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: where training stands in the data."""
        epoch, batches = self._iter_epoch, 0
        if self.progress is not None:
            finished, batches, per_epoch = self.progress()
            if finished > epoch:  # the epoch's loop has ended (exhausted, max_steps, should_stop): resume at the next
                epoch, batches = finished, 0
            elif batches >= per_epoch:  # saved after the epoch's last batch, before the loop noticed the end
                epoch, batches = epoch + 1, 0
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration continue from ``state``."""
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self):
        sampler = self.sampler
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if not isinstance(sampler, EpochShuffleSampler):
                raise TypeError(f"cannot resume inside an epoch with a {type(sampler).__name__}; "
                                "use zoo.data.loaders.EpochShuffleSampler")
            # Lightning creates the resumed iterator before it calls set_epoch, so the epoch is set here.
            sampler.set_epoch(epoch)
            sampler.skip_next(batches * (self.batch_size or 1))
        elif self.progress is not None and hasattr(sampler, "set_epoch"):
            # Same reason, for a checkpoint without loader state: at least start the right epoch's order.
            sampler.set_epoch(max(self.progress()[0], int(getattr(sampler, "epoch", 0))))
        self._iter_epoch = int(getattr(sampler, "epoch", 0))
        return super().__iter__()


def fit_progress(trainer: pl.Trainer) -> tuple[int, int, int | float]:
    """(epochs the fit loop has finished, batches trained on in the current epoch, batches per epoch)."""
    loop = trainer.fit_loop
    return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed, \
        trainer.num_training_batches


def resumable_loader(datamodule: pl.LightningDataModule, dataset: Dataset, batch_size: int, train: bool,
                     seed: int = 0, **loader_kwargs: Any) -> DataLoader:
    """The loader every DataModule should return: order from (seed, epoch), this rank's shard, and (for training)
    a position that goes into the checkpoint, so ``--ckpt_path last`` continues mid-epoch with the next batch."""
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochShuffleSampler(len(dataset), seed, shuffle=train, num_replicas=world, rank=rank)
    progress = (lambda: fit_progress(trainer)) if (train and trainer is not None) else None
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, progress=progress, **loader_kwargs)


def collate_with_paths(batch: list[tuple]) -> dict[str, Any]:
    """``collate_images`` plus ``path``: the file of every kept sample (when the dataset gives one), so a file that
    only fails later (``decode: device``) is still reported by its path."""
    out = collate_images(batch)
    if batch and len(batch[0]) > 2:
        out["path"] = [item[2] for item in batch if item[0] is not None]
    return out


class ImageDataModule(pl.LightningDataModule):
    """Images for pretraining and evaluation.

    Args:
        dataset: ``digits`` (embedded, real handwritten digits), ``cifar10:<dir>``, ``cifar100:<dir>`` or
            ``imagefolder:<dir>`` (ImageNet layout) or ``wds:<shards>`` (WebDataset tar shards, see
            ``zoo.data.shards``).
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
            raise UsageError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise UsageError(f"data.num_workers must be >= 0, got {num_workers}")
        if image_size < 1:
            raise UsageError(f"data.image_size must be >= 1, got {image_size}")
        # knobs that would do nothing for this dataset are refused rather than silently ignored
        kind = dataset.partition(":")[0]
        if kind != "digits" and image_size != 32:
            raise UsageError(f"data.image_size={image_size} only sets the size of the embedded digits; {kind} images "
                             "keep their own size (the views' size is model.init_args.image_size): remove it")
        if kind not in ("imagefolder", "wds") and decode != "worker":
            raise UsageError(f"data.decode={decode!r} applies to JPEG folders and shards (imagefolder:, wds:) only; {kind} "
                             "images are decoded already: remove it")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.image_size, self.decode, self.seed = image_size, decode, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _build(self, split: str) -> Dataset:
        return build_dataset(self.dataset, split, decode=self.decode, image_size=self.image_size)

    def check_data(self) -> None:
        """Build the datasets now (``ZooTrainer.fit`` calls this before creating any output folder): a missing or
        malformed dataset folder is one ``UsageError`` line naming ``data.dataset``."""
        if self.train_set is not None:
            return
        try:
            self.train_set = self._build("train")
            try:
                self.val_set = self._build("val")
            except NoSplit:  # wds: shards named without {split}: training only, no validation loop
                self.val_set = None
        except (FileNotFoundError, NotADirectoryError, ValueError) as err:
            self.train_set = self.val_set = None
            raise UsageError(f"data.dataset={self.dataset!r} cannot be read: {err}") from None

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (once) and check the batch against the device count."""
        world = self.trainer.world_size if self.trainer is not None else 1
        self.check_data()
        if len(self.train_set) < self.batch_size * world:
            raise UsageError(f"data.batch_size {self.batch_size} times {world} devices is larger than the "
                             f"{len(self.train_set)} training images of {self.dataset!r}; lower it")

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset (builds the training split if needed)."""
        if self.train_set is None:
            self.train_set = self._build("train")
        return len(self.train_set.classes)

    def _loader(self, ds: Dataset, train: bool) -> DataLoader:
        return resumable_loader(self, ds, self.batch_size, train, self.seed,
                                drop_last=train,  # a last batch of 1 would break batch norm
                                num_workers=self.num_workers, collate_fn=collate_with_paths,
                                pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)
