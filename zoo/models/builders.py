"""The table of named model builders (name -> builder) and building by name; it imports no family.

Families (``zoo/models/vision.py``, ``zoo/models/lm_configs.py``, ``zoo/models/multimodal.py``) register their
builders here when imported. ``zoo.models.registry`` (``create``, ``available``) imports every family first, so
``zoo.create`` knows every name; a family that builds other models by name (a multimodal pairing) calls ``build``
here, never the registry, which imports it: so no family and the registry import each other.

Builders are plain callables taking keyword overrides and returning an ``nn.Module``.
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch
from torch import nn

__all__ = ["UnknownModelError", "register", "build", "names", "TIMM"]

TIMM = "timm"  # the builder behind every "timm:<name>", not a model of its own
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError, ValueError):
    """A model name the registry does not know. A ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad
    argument value, which is how the CLI recognises a refusal it prints in one line); prints without quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register(name: str, builder: Callable[..., nn.Module] | None = None):
    """Register ``builder`` under ``name``; usable as ``register(name, fn)`` or as a decorator."""

    def _add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return _add(builder) if builder is not None else _add


def names() -> list[str]:
    """Every name registered so far (``timm:<name>`` is accepted too, for any timm model)."""
    return sorted(name for name in _REGISTRY if name != TIMM)


def is_known(name: str) -> bool:
    """Whether ``name`` is registered (or is a ``timm:<name>``)."""
    return name in _REGISTRY or name.startswith(TIMM + ":")


def build(name: str, device: str | torch.device | None = None, **overrides) -> nn.Module:
    """Build the model registered as ``name`` (or ``timm:<name>``) with keyword ``overrides``, on ``device``."""
    if name.startswith(TIMM + ":") and name != TIMM + ":":
        builder = _REGISTRY[TIMM]
        overrides = {"model_name": name[len(TIMM) + 1:], **overrides}
    elif name in _REGISTRY and name != TIMM:
        builder = _REGISTRY[name]
    else:
        close = difflib.get_close_matches(name, names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} See zoo.available() for every name, or use 'timm:<name>'.")
    if device is None:
        return builder(**overrides)
    with torch.device(device):
        return builder(**overrides)
