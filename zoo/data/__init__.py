"""Datamodules shared by every method: images (digits, CIFAR, ImageFolder/ImageNet) and text (``zoo.data.text``)."""
from zoo.data.images import ImageFolderDataset, build_dataset, collate_images, digits_dataset
from zoo.data.loaders import EpochShuffleSampler, ImageDataModule

__all__ = ["ImageDataModule", "ImageFolderDataset", "EpochShuffleSampler", "build_dataset", "collate_images",
           "digits_dataset"]
