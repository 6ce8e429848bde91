"""Datamodules shared by every method: images (digits, CIFAR, ImageFolder/ImageNet), text (``zoo.data.text``) and
interleaved image-text sequences (``zoo.data.interleaved``)."""
from zoo.data.images import ImageFolderDataset, build_dataset, collate_images, digits_dataset
from zoo.data.interleaved import InterleavedDataModule
from zoo.data.loaders import EpochShuffleSampler, ImageDataModule

__all__ = ["ImageDataModule", "ImageFolderDataset", "EpochShuffleSampler", "InterleavedDataModule", "build_dataset",
           "collate_images", "digits_dataset"]
