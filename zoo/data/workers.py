"""Which sample each loader worker is reading, so a worker killed by a signal is named by its shard or file.

A worker that raises is named by the dataset itself (its exception travels back); a worker killed by a signal (the
OOM killer, SIGKILL, a segfault in a decoder) leaves only ``DataLoader worker (pid N) is killed by signal``. Each
worker writes ``(pid, sample)`` into its row of a small shared-memory table before reading a sample and clears it
after; ``name_worker_death`` turns the loader's error into one naming the sample the dead pid was reading.

The error reaches the main process two ways: from the loader's ``next()`` (the training loader names it there,
``zoo.data.loaders``), or from torch's SIGCHLD handler, which raises it wherever the main thread happens to be (inside
a training step, a callback): the trainer names that one on its way out (``name_worker_death_in``).
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch

__all__ = ["BusySlots", "name_worker_death", "name_worker_death_in"]

_SLOTS = 64  # 1 KB; worker ids beyond this share rows (modulo): a name may then be missing, never wrong (the pid is kept)


class BusySlots:
    """A shared ``[slots, 2]`` int64 table: row ``worker id`` holds (pid, sample index being read) or (pid, -1)."""

    def __init__(self) -> None:
        self.table = torch.full((_SLOTS, 2), -1, dtype=torch.int64).share_memory_()
        self._view: Any = None
        self._pid = -1

    def _row(self) -> Any:
        info = torch.utils.data.get_worker_info()
        if info is None:  # the main process reads in place: an error there names itself
            return None
        if self._pid != os.getpid():  # a NumPy view of the shared table, made once per worker process
            self._view, self._pid = self.table.numpy(), os.getpid()
        return self._view[info.id % _SLOTS]

    def enter(self, i: int) -> None:
        """This worker starts reading sample ``i``."""
        row = self._row()
        if row is not None:
            row[0], row[1] = self._pid, i

    def leave(self) -> None:
        """This worker is done with its sample."""
        row = self._row()
        if row is not None:
            row[1] = -1

    def reading(self, pid: int) -> int | None:
        """The sample worker process ``pid`` was reading, if any."""
        rows = self.table.numpy()
        hit = [int(r[1]) for r in rows if int(r[0]) == pid and int(r[1]) >= 0]
        return hit[0] if hit else None

    def __getstate__(self) -> dict:
        return {"table": self.table}  # a spawned worker gets the shared table (torch shares its memory)

    def __setstate__(self, state: dict) -> None:
        self.table, self._view, self._pid = state["table"], None, -1


_PIDS = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)")


def name_worker_death(err: BaseException, dataset: Any) -> RuntimeError | None:
    """The loader's "worker ... killed / exited unexpectedly" error with the sample(s) its dead worker was reading
    (``dataset.where(i)``); None when ``err`` is not such an error or nothing is known."""
    busy = getattr(dataset, "busy", None)
    match = _PIDS.search(str(err))
    if not isinstance(busy, BusySlots) or match is None or "while reading" in str(err):
        return None
    names = []
    for pid in (int(p) for p in match.group(1).replace(" ", "").split(",") if p):
        i = busy.reading(pid)
        if i is not None:
            names.append(dataset.where(i))
    if not names:
        return None
    return RuntimeError(f"{str(err).strip()} while reading {', '.join(names)}; that sample (its shard or file) may "
                        "be what killed it (a decoder crash, or memory: check the system log for the OOM killer)")


def name_worker_death_in(err: BaseException, datasets: Any) -> RuntimeError | None:
    """``name_worker_death`` against each of ``datasets`` (those of the loaders a run had: a subset's parent too)
    until one knows the dead pid; None when none does."""
    for dataset in datasets:
        while dataset is not None:
            named = name_worker_death(err, dataset)
            if named is not None:
                return named
            dataset = getattr(dataset, "dataset", None)  # Subset, IndexedDataset: the reading dataset is inside
    return None
