"""Entry points other packages declare for ``zoo`` to consult (``zoo`` never names them, not even in a string).

Groups in use: ``byol_zoo.commands`` (``zoo <name>`` subcommands, ``zoo.cli.commands``) and
``byol_zoo.weight_readers`` (file formats ``zoo.load_backbone`` reads through a method package's reader,
``zoo.weights.readers``). A source checkout whose installed metadata predates a new entry point (an editable install
not re-run) also reads the checkout's own ``pyproject.toml``; the checkout wins, since it is the code that runs.

Nothing here imports torch.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = ["DISTRIBUTION", "entry_point_table", "from_checkout", "from_metadata", "load_target"]

DISTRIBUTION = "byol-zoo"


def from_metadata(group: str) -> dict[str, str]:
    """Entry points of ``group`` in the installed distributions' metadata."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=group)}


def from_checkout(group: str) -> dict[str, str]:
    """Entry points of ``group`` declared in the ``pyproject.toml`` of the checkout ``zoo`` was imported from."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # Python 3.10: the installed metadata alone
        return {}

    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data.get("project", {})
    if project.get("name") != DISTRIBUTION:
        return {}
    return dict(project.get("entry-points", {}).get(group, {}))


def entry_point_table(group: str) -> dict[str, str]:
    """``name -> "module:attr"`` of every entry point in ``group``, sorted (installed metadata, overridden by the
    checkout's ``pyproject.toml``)."""
    return dict(sorted({**from_metadata(group), **from_checkout(group)}.items()))


def load_target(target: str) -> Any:
    """The object a ``"module:attr"`` entry point names (the module itself without ``:attr``)."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj
