"""Progress for long work: a bar on a terminal, whole lines elsewhere (a log file, a pipe, a scheduler's output).

    from zoo.progress import track
    for batch in track(loader, "teacher targets", total=len(loader)):
        ...

Off a terminal a line is written after the first item (so a log shows within seconds that work started), then
whenever ``LINE_SECONDS`` have passed or another tenth of the work is done, whichever comes first, and at the end.
``LinePacer`` holds that rule; the Trainer's step bar (``zoo.train.announce.StepProgressBar``) uses the same one.
Only rank 0 draws. Pure Python and rich; no torch or Lightning import.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

# Off a terminal: at most this long between two lines (a scheduler's log that stays silent for minutes looks hung),
# and at least one line per tenth of the work (short runs still show their course).
LINE_SECONDS = 20.0
LINES = 10


def _rank_zero() -> bool:
    # srun tasks carry no RANK: SLURM_PROCID tells them apart (0 in a one-task job, too)
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


class LinePacer:
    """Decides when a line-mode progress report writes its next line: after the first unit of work, then every
    ``seconds`` or every ``1/lines`` of ``total`` (0: unknown), whichever comes first."""

    def __init__(self, total: int, start: int = 0, lines: int = LINES, seconds: float = LINE_SECONDS) -> None:
        self.total, self.start = int(total), int(start)
        self.lines, self.seconds = max(1, int(lines)), float(seconds)
        self._last_time = time.perf_counter()
        self._next = start + 1  # the first unit of work done: a first line

    def _milestone(self, done: int) -> int:
        if self.total <= 0:
            return done + 100  # no known total: the timer alone paces the lines, with a line per 100 at most
        # the next tenth boundary at least a quarter of a tenth away: a line the timer wrote just before a boundary
        # (step 130 of 660, boundary 132) must not be followed by a near-copy two steps later
        gap = self.total / self.lines / 4
        k = math.floor((done + gap) * self.lines / self.total) + 1
        return max(done + 1, math.ceil(k * self.total / self.lines))

    def due(self, done: int, now: float | None = None) -> bool:
        """Whether a line is due after ``done`` units; if so, the next one is scheduled from here."""
        now = time.perf_counter() if now is None else now
        if done < self._next and now - self._last_time < self.seconds:
            return False
        self._last_time, self._next = now, self._milestone(done)
        return True


class RateClock:
    """Rate and ETA that leave out the first unit of work, which carries one-off costs (workers starting, kernels
    compiling, caches filling): measured from the end of the first unit once a second one is done."""

    def __init__(self, start: int = 0) -> None:
        self.start = int(start)
        self._t0 = time.perf_counter()
        self._first: tuple[int, float] | None = None

    def tick(self, done: int, now: float | None = None) -> None:
        """Record that ``done`` units are finished (call after each)."""
        if self._first is None and done > self.start:
            self._first = (done, time.perf_counter() if now is None else now)

    def rate(self, done: int, now: float | None = None) -> float:
        """Units per second; 0.0 until known."""
        now = time.perf_counter() if now is None else now
        if self._first is not None and done > self._first[0] and now > self._first[1]:
            return (done - self._first[0]) / (now - self._first[1])
        return 0.0

    def elapsed(self, now: float | None = None) -> float:
        """Seconds since the clock started."""
        return (time.perf_counter() if now is None else now) - self._t0


def clock(seconds: float | None) -> str:
    """``HH:MM:SS`` (days shown past 24 h), or ``--:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--:--"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


def progress_line(description: str, done: int, total: int, rate: float, elapsed: float) -> str:
    """``description  done/total  pct  rate/s  elapsed  ETA`` (total 0: unknown)."""
    if total > 0:
        eta = (total - done) / rate if rate > 0 else None
        return (f"{description}  {done}/{total}  {100.0 * done / total:3.0f}%  {rate:.2f}/s  elapsed "
                f"{clock(elapsed)}  ETA {clock(eta)}")
    return f"{description}  {done}  {rate:.2f}/s  elapsed {clock(elapsed)}"


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool | None = None,
          interactive: bool | None = None) -> Iterator[T]:
    """Yield ``items`` while reporting ``description  done/total  elapsed  ETA`` on stderr.

    Args:
        items: what to iterate over.
        description: what the work is, first on each line.
        total: how many items (default ``len(items)`` where it has one).
        enabled: False draws nothing; default True (on rank 0 only).
        interactive: a redrawn bar (True) or whole lines (False); default: whether stderr is a terminal.
    """
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    if enabled is False or not _rank_zero():
        yield from items
        return
    if not (sys.stderr.isatty() if interactive is None else interactive):
        yield from _track_lines(items, description, total or 0)
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


def _track_lines(items: Iterable[T], description: str, total: int) -> Iterator[T]:
    pacer, rate = LinePacer(total), RateClock()
    done, last_written = 0, -1
    for item in items:
        yield item
        done += 1
        rate.tick(done)
        if pacer.due(done):
            sys.stderr.write(progress_line(description, done, total, rate.rate(done), rate.elapsed()) + "\n")
            sys.stderr.flush()
            last_written = done
    if done != last_written:
        sys.stderr.write(progress_line(description, done, total, rate.rate(done), rate.elapsed()) + "\n")
        sys.stderr.flush()
