"""The two exceptions a run raises for the user (no torch here, so the CLI can use them before importing it)."""
from __future__ import annotations


class UsageError(ValueError):
    """A run refused before it starts (impossible value, busy or occupied folder, mismatched resume): ``zoo fit``
    prints the one-line message and exits with status 2, without a traceback."""


class RunError(OSError):
    """A run that stopped on an outside condition (disk full): ``zoo fit`` prints the one line and exits 1."""
