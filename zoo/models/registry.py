"""One table of named models: name -> builder. Families register themselves on import.

Builders are plain callables taking keyword overrides and returning an ``nn.Module``. Paper numbers live with
the family (``zoo/models/vision.py``, ``zoo/models/lm_configs.py``) as data; this module only looks names up.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable

import torch
from torch import nn

class UnknownModelError(KeyError, ValueError):
    """A model name the registry does not know. A ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad
    argument value, which is how the CLI recognises a refusal it prints in one line); prints without quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Modules whose import registers model families. Listed by name so zoo never imports byol/lm.
_FAMILY_MODULES = ("zoo.models.vision", "zoo.models.lm_configs", "zoo.models.multimodal")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_loaded = False


def register(name: str, builder: Callable[..., nn.Module] | None = None):
    """Register ``builder`` under ``name``; usable as ``register(name, fn)`` or as a decorator."""

    def _add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return _add(builder) if builder is not None else _add


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _FAMILY_MODULES:
            importlib.import_module(mod)


_TIMM = "timm"


def available() -> list[str]:
    """Every registered model name (``timm:<name>`` is accepted too, for any timm model)."""
    _ensure_loaded()
    # "timm" is the builder behind every "timm:<name>", not a model of its own.
    return sorted(name for name in _REGISTRY if name != _TIMM)


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
        if name not in _REGISTRY and not name.startswith(_TIMM + ":"):
            create(name)  # the unknown-name error, with the closest names
        if _pretrained_loader is None:
            raise ValueError(f"create({name!r}, pretrained=True) needs the weights layer: call zoo.create (or import "
                             "zoo.weights.create first)")
        return _pretrained_loader(name, device, trust, overrides)
    if name.startswith(_TIMM + ":") and name != _TIMM + ":":
        builder = _REGISTRY[_TIMM]
        overrides = {"model_name": name[len(_TIMM) + 1:], **overrides}
    elif name in _REGISTRY and name != _TIMM:
        builder = _REGISTRY[name]
    else:
        close = difflib.get_close_matches(name, available(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} See zoo.available() for every name, or use 'timm:<name>'.")
    if device is None:
        return builder(**overrides)
    with torch.device(device):
        return builder(**overrides)
