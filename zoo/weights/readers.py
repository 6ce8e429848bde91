"""Readers of weight files that belong to a method package (e.g. ``byol`` reads the official BYOL ``.pkl``).

A package registers a reader in ``pyproject.toml`` under the entry-point group ``byol_zoo.weight_readers``::

    [project.entry-points."byol_zoo.weight_readers"]
    byol-official = "byol.official:READER"

so ``zoo.load_backbone`` can read the format without ``zoo`` importing the package. A reader is any object with

- ``name``: the format's name (as in ``zoo.weights.pretrained_table``'s ``format``);
- ``encoders``: the encoder names the file holds, the default first (what ``which=`` accepts);
- ``default_padding``: ``"torch"`` or ``"tf_same"`` (the padding the weights were trained with);
- ``claims(path, fmt) -> bool``: whether it reads this file (``fmt`` from ``zoo.weights.safe_load.sniff_format``);
- ``read(path, which, arch, head) -> (state_dict, arch, classifier | None)``: the encoder's torch state dict, its
  architecture (``arch`` when given, else inferred) and, when ``head``, the classifier's ``{"weight", "bias"}``;
  a file it cannot read is a ``ValueError`` naming the file.

Any untrusted pickle a reader opens goes through ``zoo.weights.safe_pickle``'s guarded unpickler.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.plugins import entry_point_table, load_target

__all__ = ["GROUP", "reader_for", "weight_readers"]

GROUP = "byol_zoo.weight_readers"


def weight_readers() -> dict[str, Any]:
    """Every registered reader by entry-point name (imported on first use; a missing package is skipped)."""
    readers = {}
    for name, target in entry_point_table(GROUP).items():
        try:
            readers[name] = load_target(target)
        except ImportError:  # the package that declared it is not installed: its format is simply not readable
            continue
    return readers


def reader_for(path: Path, fmt: str) -> Any | None:
    """The first registered reader (by name) that claims ``path``, or None."""
    return next((r for r in weight_readers().values() if r.claims(path, fmt)), None)
