"""The image DataModule: datasets from ``zoo.data.images``, reproducible order, uint8 batches for on-device augmentation.

Resuming in the middle of an epoch replays exactly the batches the interrupted run had not trained on yet. The order
of an epoch depends only on (seed, epoch); each global batch (``data.batch_size`` x devices x nodes) is a block of
that order, split between the ranks, so the position inside an epoch is a count of GLOBAL samples that means the
same images on any device count with the same global batch. The training loader applies the position when its
first batch is requested, by when the checkpoint has been restored whatever order Lightning builds the loader and
restores the state in (an epoch-based schedule makes it build the loader before the restore, to count
``estimated_stepping_batches``, and then it never hands the loader its saved position: ``ResumeGuard`` keeps it).
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zoo.data.images import build_dataset, collate_images
from zoo.data.positions import saved_samples, take_epoch_skip, take_saved_position
from zoo.data.prefetch import DevicePrefetcher, use_device_prefetch
from zoo.data.workers import name_worker_death
from zoo.data.shards import NoSplit
from zoo.errors import UsageError


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a permutation that depends only on (seed, epoch), so a resumed run replays the same order.

    Global step ``k`` takes the block ``order[k*G:(k+1)*G]`` of the epoch's order, ``G = batch_size x world``, and
    rank ``r`` the sub-block ``[k*G + r*batch_size, k*G + (r+1)*batch_size)``: the ranks of step ``k`` together see
    exactly the images one process with a ``world`` times larger batch sees at step ``k``, in rank order, whatever the
    world size. ``drop_last`` drops the last partial global batch; otherwise it is split evenly between the ranks,
    padded by wrapping (at most ``world - 1`` repeats). With ``batch_size=1`` this is ``order[r::world]``.
    It is a ``DistributedSampler`` so that Lightning neither wraps nor reshuffles it under DDP (its wrapper would
    reshuffle with its own seed and never forward ``set_epoch``); Lightning calls ``set_epoch`` at each epoch start.
    ``num_replicas`` / ``rank`` left as None are read from ``torch.distributed`` when the sampler is used, so a
    sampler built before DDP starts still shards.

    ``mark_padding=True`` yields ``PAD`` (-1) instead of each wrapped repeat: a reader that drops those entries (the
    probe's ``IndexedDataset`` / ``collate_indexed``) sees every image of the epoch exactly once over the ranks, as one
    process does, while every rank still runs the same number of steps (a rank's last batch may come out empty).
    """

    PAD = -1

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None, batch_size: int = 1, drop_last: bool = False,
                 mark_padding: bool = False) -> None:
        # DistributedSampler.__init__ would query torch.distributed now; the shard is resolved at use instead.
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self._replicas, self._rank = num_replicas, rank
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        self.mark_padding = bool(mark_padding)
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
    def global_batch(self) -> int:
        """Samples of one step across all ranks (``batch_size x world``)."""
        return self.batch_size * self.num_replicas

    def _tail(self) -> int:
        """Indices per rank of the last, partial global batch (0 when dropped or absent)."""
        rest = 0 if self.drop_last else self.n % self.global_batch
        return math.ceil(rest / self.num_replicas)

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        """Indices this rank yields per epoch."""
        return self.n // self.global_batch * self.batch_size + self._tail()

    @property
    def total_size(self) -> int:  # type: ignore[override]
        """Indices all ranks yield per epoch (the epoch's order, cut or padded)."""
        return self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """Make the next iteration start at this rank's ``count``-th index (resume inside an epoch)."""
        self._start = max(0, int(count))

    def skip_samples(self, samples: int) -> None:
        """Make the next iteration start after the first ``samples`` GLOBAL samples of the epoch's order (a whole
        number of global batches: the position a checkpoint keeps), on this rank's share."""
        if samples >= self.n:  # the whole epoch
            self.skip_next(self.num_samples)
            return
        steps, partial = divmod(int(samples), self.global_batch)
        if partial:
            raise ValueError(f"{samples} samples is not a whole number of global batches of {self.global_batch}")
        self.skip_next(steps * self.batch_size)

    def global_order(self) -> list[int]:
        """The permutation of the current epoch across all ranks (unpadded)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def rank_indices(self) -> list[int]:
        """This rank's indices of the current epoch, step after step."""
        order, world, b, r = self.global_order(), self.num_replicas, self.batch_size, self.rank
        full = self.n // self.global_batch
        mine = torch.tensor(order[:full * self.global_batch], dtype=torch.long).view(full, world, b)[:, r].flatten()
        out = mine.tolist()
        tail = self._tail()
        if tail:
            rest = order[full * self.global_batch:]
            pad = tail * world - len(rest)
            # wrap, as DistributedSampler pads (or mark the places, for a reader that drops them)
            rest = rest + ([self.PAD] * pad if self.mark_padding else (order * math.ceil(pad / max(len(order), 1)))[:pad])
            out += rest[r * tail:(r + 1) * tail]
        return out

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.rank_indices()[start:])

    def __len__(self) -> int:
        return self.num_samples


def fit_progress(trainer: pl.Trainer) -> tuple[int, int, int | float]:
    """(epochs the fit loop has finished, batches trained on in the current epoch, batches per epoch)."""
    loop = trainer.fit_loop
    return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed, \
        trainer.num_training_batches


def fit_position(trainer: pl.Trainer) -> tuple[int, int]:
    """(epoch, batches of it trained on) where the fit loop stands; an epoch whose batches are all trained on, or
    whose loop has ended (``max_steps``, ``should_stop``), reads as (the next epoch, 0).

    These are the counters Lightning saves in every checkpoint and restores before the first training batch, so a
    position read here at the first batch is the resumed one, in whatever order Lightning built the loader."""
    finished, batches, per_epoch = fit_progress(trainer)
    in_epoch = trainer.fit_loop.epoch_progress.current.started > finished
    if not in_epoch:
        return finished, 0
    if batches >= per_epoch:  # after the epoch's last batch, before the loop noticed the end
        return finished + 1, 0
    return finished, batches


class _PositionedIterator(Iterator):
    """A ``ResumableLoader``'s iterator: the sampler is positioned, and the real iterator created, when the first
    batch is requested. Lightning creates the training iterator while it builds the loader, which an epoch-based
    schedule makes it do before the checkpoint's loop state is restored; by the first batch it is."""

    def __init__(self, loader: "ResumableLoader") -> None:
        self.loader, self.iterator = loader, None

    def __iter__(self) -> "_PositionedIterator":
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._positioned_iter()
        try:
            return next(self.iterator)
        except RuntimeError as err:  # a worker killed by a signal: name the shard / file it was reading
            named = name_worker_death(err, self.loader.dataset)
            if named is None:
                raise
            raise named from err

    def __len__(self) -> int:
        return len(self.loader)


class ResumableLoader(DataLoader):
    """A DataLoader whose position (epoch, GLOBAL samples already trained on) goes into the checkpoint.

    A training loader (``trainer`` given) positions every iteration at the first batch requested, skipping the
    trained-on samples of the epoch's order by index, without loading them: after a restore at the checkpoint's
    position (handed back by Lightning through ``load_state_dict``, or, when Lightning built the loader before
    restoring and so never hands it back, kept by ``ResumeGuard``), otherwise where the fit loop stands
    (``fit_position``). The position it saves, ``{"epoch", "samples",
    "global_batch"}``, counts samples of the whole global batch, so it names the same images on any device count
    with the same global batch; ``zoo.train.resume.ResumeGuard`` checks it against the resumed run's global batch
    (and converts checkpoints that kept per-device ``batches``). A dataset of raw bytes (``decode="device"``) with
    ``decode_device`` a usable GPU is decoded one step ahead there (``zoo.data.prefetch.DevicePrefetcher``), in
    the same order.
    """

    def __init__(self, *args: Any, trainer: pl.Trainer | None = None, decode_device: torch.device | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainer = trainer
        # raw-byte batches are decoded one step ahead on this device when it is a usable GPU (zoo.data.prefetch)
        self.decode_device = decode_device
        self._prefetcher: DevicePrefetcher | None = None
        self._pending: dict[str, int] | None = None  # a position Lightning handed back (load_state_dict)
        self._epoch = 0  # the epoch the current iteration yields

    @property
    def global_batch(self) -> int:
        """Samples per training step across every rank."""
        world = self.sampler.num_replicas if isinstance(self.sampler, EpochShuffleSampler) else 1
        return (self.batch_size or 1) * world

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "samples", "global_batch"}``: where training stands in the data, in global samples."""
        epoch, batches = fit_position(self.trainer) if self.trainer is not None else (self._epoch, 0)
        return {"epoch": int(epoch), "samples": int(batches) * self.global_batch, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration start at ``state`` (applied at its first batch)."""
        self._pending = dict(state)

    def __iter__(self) -> _PositionedIterator:  # type: ignore[override]
        return _PositionedIterator(self)

    def _positioned_iter(self) -> Iterator:
        if self._prefetcher is not None:  # an abandoned iteration's thread must let go of the loader's iterator
            self._prefetcher.close()  # (persistent workers reuse it) before the sampler is positioned again
            self._prefetcher = None
        sampler, pending, self._pending = self.sampler, self._pending, None
        if self.trainer is None:  # not a training loader: the sampler's epoch (or a handed-back one), from its start
            epoch = int(pending["epoch"]) if pending else int(getattr(sampler, "epoch", 0))
            samples = saved_samples(pending, self.global_batch) if pending else 0
        else:
            # The checkpoint's position, handed back by Lightning or (when Lightning built the loader before the
            # restore, and so never hands it back) kept by ResumeGuard; else where the fit loop stands.
            kept = take_saved_position(self.trainer)
            pending = pending if pending is not None else kept
            epoch, batches = fit_position(self.trainer)
            samples = batches * self.global_batch
            if pending is not None:
                epoch, samples = int(pending.get("epoch", epoch)), saved_samples(pending, self.global_batch)
                saved_global = int(pending.get("global_batch") or self.global_batch)
                if samples and saved_global != self.global_batch:
                    if not take_epoch_skip(self.trainer, epoch):
                        raise UsageError(
                            f"cannot continue epoch {epoch} exactly: the checkpoint's data position is {samples} "
                            f"samples at a global batch of {saved_global}, this run's global batch is "
                            f"{self.global_batch} (data.batch_size x devices x nodes); resume with the checkpoint's "
                            "global batch")
                    samples = len(self.dataset)  # the rest of this epoch is skipped (ResumeGuard said so)
        if isinstance(sampler, EpochShuffleSampler):
            sampler.set_epoch(epoch)
            sampler.skip_samples(samples)
        elif samples:
            raise TypeError(f"cannot resume inside an epoch with a {type(sampler).__name__}; "
                            "use zoo.data.loaders.EpochShuffleSampler")
        elif hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self._epoch = epoch
        batches = super().__iter__()
        if use_device_prefetch(self.dataset, self.decode_device):
            batches = self._prefetcher = DevicePrefetcher(batches, self.decode_device)
        return batches


def resumable_loader(datamodule: pl.LightningDataModule, dataset: Dataset, batch_size: int, train: bool,
                     seed: int = 0, drop_last: bool = False, **loader_kwargs: Any) -> DataLoader:
    """The loader every DataModule should return: order from (seed, epoch), global batches split between the ranks,
    and (for training) a position in global samples that goes into the checkpoint, so ``--ckpt_path last``
    continues mid-epoch with the next batch, also on another device count at the same global batch.

    ``drop_last`` drops the last partial GLOBAL batch (when there is a full one), so every rank runs the same number
    of steps, ``len(dataset) // global batch``, whatever the device count."""
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    drop_last = drop_last and len(dataset) >= batch_size * world
    sampler = EpochShuffleSampler(len(dataset), seed, shuffle=train, num_replicas=world, rank=rank,
                                  batch_size=batch_size, drop_last=drop_last)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                           trainer=trainer if train else None, **loader_kwargs)


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

    def check_view_size(self, view_size: int) -> None:
        """Refuse views of another size than the embedded digits are stored at (other datasets: any size).

        The digits are upsampled once to ``data.image_size``; views of another size would resample them again (and
        the probe report would probe at a size the data is not stored at): one size, stated once."""
        if self.dataset.partition(":")[0] == "digits" and view_size != self.image_size:
            raise UsageError(f"data.image_size={self.image_size} but model.image_size={view_size}: the digits "
                             "are stored at the size the views use; set both to the same value (or leave "
                             "data.image_size out: it defaults to 32)")

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
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return resumable_loader(self, ds, self.batch_size, train, self.seed,
                                drop_last=train,  # a last batch of 1 would break batch norm
                                num_workers=self.num_workers, collate_fn=collate_with_paths,
                                pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
                                decode_device=device)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)
