"""``zoo.create(name, pretrained=True)``: the pretrained table's weights for a registered architecture.

The registry (``zoo.models.registry``) builds architectures and sits below the weights layer; this module installs
the pretrained loader into it on import, so ``create(..., pretrained=True)`` works without models importing weights.
``zoo.create`` (the package face) imports this module first, so it always has the loader.
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.models import registry
from zoo.models.registry import create
from zoo.weights.backbone import load_backbone
from zoo.weights.pretrained import pretrained_for_arch
from zoo.weights.pretrained_table import PRETRAINED

__all__ = ["create", "create_pretrained"]


def create_pretrained(name: str, device: str | torch.device | None, trust: bool | None,
                       overrides: dict) -> nn.Module:
    """``create(name, pretrained=True)``: the pretrained table's weights for ``name``, or one line saying what to do."""
    entry = pretrained_for_arch(name)
    if entry is None:
        archs = sorted({e["arch"] for e in PRETRAINED.values()})
        raise ValueError(f"zoo.create({name!r}, pretrained=True): no pretrained weights for {name!r} in the table "
                         f"(it has weights for {', '.join(archs)}: zoo.list_pretrained()). Load your own file with "
                         f"zoo.load_backbone(path_or_url, arch={name!r}), or drop pretrained=True for random init.")
    if overrides:
        raise ValueError(f"zoo.create({name!r}, pretrained=True) builds {entry!r} as published; drop the overrides "
                         f"{sorted(overrides)} (they would change the architecture the weights fit).")
    model = load_backbone(entry, trust=trust)
    return model.to(device) if device is not None else model


registry.set_pretrained_loader(create_pretrained)
