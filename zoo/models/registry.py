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


def _create_pretrained(name: str, device: str | torch.device | None, trust: bool | None,
                       overrides: dict) -> nn.Module:
    """``create(name, pretrained=True)``: the pretrained table's weights for ``name``, or one line saying what to do."""
    from zoo.weights.pretrained import pretrained_for_arch
    from zoo.weights.pretrained_table import PRETRAINED

    entry = pretrained_for_arch(name)
    if entry is None:
        archs = sorted({e["arch"] for e in PRETRAINED.values()})
        raise ValueError(f"zoo.create({name!r}, pretrained=True): no pretrained weights for {name!r} in the table "
                         f"(it has weights for {', '.join(archs)}: zoo.list_pretrained()). Load your own file with "
                         f"zoo.load_backbone(path_or_url, arch={name!r}), or drop pretrained=True for random init.")
    if overrides:
        raise ValueError(f"zoo.create({name!r}, pretrained=True) builds {entry!r} as published; drop the overrides "
                         f"{sorted(overrides)} (they would change the architecture the weights fit).")
    from zoo.weights.backbone import load_backbone

    model = load_backbone(entry, trust=trust)
    return model.to(device) if device is not None else model


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
        return _create_pretrained(name, device, trust, overrides)
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
