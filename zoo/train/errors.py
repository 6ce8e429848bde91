"""The two exceptions a run raises for the user, under their historical name: they live in ``zoo.errors`` (below
every layer, so data and weights raise them without importing train); these are the same class objects."""
from __future__ import annotations

from zoo.errors import RunError, UsageError

__all__ = ["RunError", "UsageError"]
