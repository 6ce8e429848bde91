"""A progress bar for work outside the Trainer's loops (precomputing teacher targets, extracting features).

    from zoo.train.progress import track
    for batch in track(loader, "teacher targets", total=len(loader)):
        ...

It shows done/total, elapsed time and an ETA on stderr, only on rank 0 and only on a terminal (or when forced), and
leaves one summary line behind. Forced on (``enabled=True``) off a terminal (a pipe, a log file) it writes whole lines
instead: one after the first item, then one every ``interval`` seconds or every tenth of the run, whichever comes
first, and a last one. Pure rich; no torch or Lightning import.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK"))


def _clock(seconds: float | None) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds is not None else "--:--:--"


def progress_line(description: str, done: int, total: int | None, seconds: float) -> str:
    """``description  done/total  pct  rate/s  elapsed  ETA`` (the line-mode text of ``track``)."""
    rate = done / seconds if seconds > 0 else 0.0
    if total:
        eta = (total - done) / rate if rate > 0 else None
        return (f"{description}  {done}/{total}  {100.0 * done / total:3.0f}%  {rate:.2f}/s  elapsed "
                f"{_clock(seconds)}  ETA {_clock(eta)}")
    return f"{description}  {done}  {rate:.2f}/s  elapsed {_clock(seconds)}"


def _lines(items: Iterable[T], description: str, total: int | None, interval: float, lines: int) -> Iterator[T]:
    """Line mode: first item, then every ``interval`` s or every 1/``lines`` of ``total``, then the end."""
    start = last = time.perf_counter()
    done, next_mark = 0, 1
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if done >= next_mark or now - last >= interval:
            if not (total and done >= total):  # the last item's line is written once, below
                sys.stderr.write(progress_line(description, done, total, now - start) + "\n")
                sys.stderr.flush()
            last = now
            # the next tenth of the run (every 100 items when the total is unknown)
            next_mark = (math.floor(done * lines / total) + 1) * total / lines if total else done + 100
    sys.stderr.write(progress_line(description, done, total, time.perf_counter() - start) + "\n")
    sys.stderr.flush()


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool | None = None,
          interval: float = 15.0, lines: int = 10) -> Iterator[T]:
    """Yield ``items`` while drawing ``description  done/total  elapsed  ETA`` (``enabled``: default on a tty; forced
    on off a terminal: a line every ``interval`` seconds or every 1/``lines`` of the run, whichever comes first)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    show = (sys.stderr.isatty() if enabled is None else enabled) and _rank_zero()
    if not show:
        yield from items
        return
    if not sys.stderr.isatty():
        yield from _lines(items, description, total, interval, lines)
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
