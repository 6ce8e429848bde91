"""``zoo.create`` and ``zoo.available``: every named model, its families imported first.

The table itself (``register``, building by name) is ``zoo.models.builders``, which families import to register
themselves; this module names the families and imports them before the first look-up. Paper numbers live with the
family (``zoo/models/vision.py``, ``zoo/models/lm_configs.py``) as data; this module only looks names up.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from zoo.models.builders import TIMM, UnknownModelError, build, is_known, names, register  # noqa: F401 - re-exported

# Modules whose import registers model families. Listed by name so zoo never imports byol/lm.
_FAMILY_MODULES = ("zoo.models.vision", "zoo.models.lm_configs", "zoo.models.multimodal")
_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _FAMILY_MODULES:
            importlib.import_module(mod)


def available() -> list[str]:
    """Every registered model name (``timm:<name>`` is accepted too, for any timm model)."""
    _ensure_loaded()
    return names()


# create(name, pretrained=True) needs the weights layer, which sits above this one: zoo.weights.create installs its
# loader here when imported (zoo.create, the package face, always imports it), so models never import weights.
_pretrained_loader: Callable[..., nn.Module] | None = None


def set_pretrained_loader(loader: Callable[..., nn.Module]) -> None:
    """Install what ``create(name, pretrained=True)`` calls: ``loader(name, device, trust, overrides)``."""
    global _pretrained_loader
    _pretrained_loader = loader


def create(name: str, device: str | torch.device | None = None, pretrained: bool = False,
           trust: bool | None = None, **overrides) -> nn.Module:
    """Build the model registered as ``name`` (or ``timm:<name>``) with keyword ``overrides``.

    ``device="meta"`` builds without allocating memory (for counting parameters of the big language models).
    ``pretrained=True`` loads the pretrained table's weights for ``name`` (``zoo.list_pretrained()``; downloaded once;
    ``trust=True`` accepts an entry whose sha256 is not yet verified), or says in one line what to pass instead.
    """
    _ensure_loaded()
    if pretrained:
        if not is_known(name):
            build(name)  # the unknown-name error, with the closest names
        if _pretrained_loader is None:
            raise ValueError(f"create({name!r}, pretrained=True) needs the weights layer: call zoo.create (or import "
                             "zoo.weights.create first)")
        return _pretrained_loader(name, device, trust, overrides)
    return build(name, device, **overrides)
