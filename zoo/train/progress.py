"""A progress bar for work outside the Trainer's loops (precomputing teacher targets, extracting features).

    from zoo.train.progress import track
    for batch in track(loader, "teacher targets", total=len(loader)):
        ...

It shows done/total, elapsed time and an ETA on stderr, only on rank 0 and only on a terminal (or when forced), and
leaves one summary line behind. Pure rich; no torch or Lightning import.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK"))


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool | None = None
          ) -> Iterator[T]:
    """Yield ``items`` while drawing ``description  done/total  elapsed  ETA`` (``enabled``: default on a tty)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    show = (sys.stderr.isatty() if enabled is None else enabled) and _rank_zero()
    if not show:
        yield from items
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=sys.stderr)) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
