"""Weights in and out: ``load_backbone`` (any image-encoder file), Lightning checkpoints, Hugging Face, exports.

The loaders live in submodules (``zoo.weights.backbone`` holds ``load_backbone``); the names below are imported on
first use, so importing a light submodule (``zoo.weights.export`` for ``zoo export --help``) needs no torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_backbone", "load_into", "BackboneWithHead", "UnsafeFileError", "EXPORT_FORMAT"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from zoo.weights import backbone

        return getattr(backbone, name)
    raise AttributeError(f"module 'zoo.weights' has no attribute {name!r}")
