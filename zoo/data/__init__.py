"""Datamodules shared by every method: images (digits, CIFAR, ImageFolder/ImageNet, WebDataset shards), text
(``zoo.data.text``) and interleaved image-text sequences (``zoo.data.interleaved``).

The names below are imported on first use, so ``zoo data --help`` (``zoo.data.pack_cli``) imports no torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"ImageFolderDataset": "zoo.data.images", "build_dataset": "zoo.data.images",
            "collate_images": "zoo.data.images", "digits_dataset": "zoo.data.images",
            "InterleavedDataModule": "zoo.data.interleaved", "EpochShuffleSampler": "zoo.data.loaders",
            "ImageDataModule": "zoo.data.loaders"}

__all__ = ["ImageDataModule", "ImageFolderDataset", "EpochShuffleSampler", "InterleavedDataModule", "build_dataset",
           "collate_images", "digits_dataset"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zoo.data' has no attribute {name!r}")
