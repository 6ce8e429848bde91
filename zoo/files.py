"""Atomic file writes (checkpoints, reports): a temporary file in the target's folder, fsynced, then ``os.replace``d
over the target, and the folder fsynced so the rename itself is durable.

A crash or an error while writing leaves the previous file (or none) in place, never a truncated one; the new file
gets the permissions the umask gives a freshly created file (``mkstemp``'s own are owner-only).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "atomic_write_text", "RunLock", "LOCK_NAME"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename durable
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    The new file gets the usual permissions of a freshly created file (mkstemp's are owner-only).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


CACHE_ENV = "ZOO_CACHE_DIR"
LEGACY_CACHE_ENV = "ZOO_CACHE"  # the text cache's old name, still read (no warning) when ZOO_CACHE_DIR is unset


def display_path(path: str | os.PathLike) -> str:
    """``path`` as a message should show it: relative to the working folder when inside it (``runs/x/last.ckpt``
    rather than ``/home/me/project/runs/x/last.ckpt``), else as given."""
    path = os.fspath(path)
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def cache_dir(*parts: str) -> Path:
    """byol-zoo's cache folder (``$ZOO_CACHE_DIR``, else the older ``$ZOO_CACHE``, else ``~/.cache/byol-zoo``),
    joined with ``parts`` (e.g. ``cache_dir("features")``). Nothing is created here; a path that cannot become a
    folder (it, or a folder above it, is a file) is refused naming the variable."""
    env = CACHE_ENV if os.environ.get(CACHE_ENV) else LEGACY_CACHE_ENV if os.environ.get(LEGACY_CACHE_ENV) else None
    root = os.environ[env] if env else os.path.join("~", ".cache", "byol-zoo")
    path = Path(root).expanduser().joinpath(*parts)
    check_folder_path(path, f"${env}={root!r}" if env else "the cache folder")
    return path


def check_folder_path(path: str | os.PathLike, what: str,
                      fix: str = "point it at a folder (or leave it unset for the default)") -> None:
    """Raise ``NotADirectoryError`` naming ``what`` (and saying ``fix``) when ``path`` cannot be (or become) a folder:
    it, or the nearest existing path above it, is a file."""
    here = Path(path)
    for candidate in (here, *here.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == here else f"lies under {str(candidate)!r}, which is a file"
                raise NotADirectoryError(f"{what}: {str(here)!r} {where}, not a folder; {fix}")
            return


# ---------------------------------------------------------------------------------------------------- run lock
LOCK_NAME = ".zoo-run.lock"
LOCK_STALE_SECONDS = 600  # a lock from another host not refreshed for this long belongs to a job that is gone
LOCK_REFRESH_SECONDS = 60  # how often a live holder touches its lock file (well inside LOCK_STALE_SECONDS)


def job_identity() -> str:
    """What every process of one launch shares and a requeue of the same scheduler job keeps: the SLURM / LSF job
    id, else torchelastic's run id, else '' (a plain run)."""
    for key in ("SLURM_JOB_ID", "LSB_JOBID"):
        if os.environ.get(key):
            return f"{key}={os.environ[key]}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun's default id is "none": the rendezvous address tells apart
        return (f"torchrun={os.environ['TORCHELASTIC_RUN_ID']}@{os.environ.get('MASTER_ADDR', '')}:"
                f"{os.environ.get('MASTER_PORT', '')}")
    return ""


def _lock_record(text: str) -> dict[str, str]:
    """The fields a lock file holds: its first line is the pid (the format of earlier versions), then key=value."""
    lines = text.splitlines()
    record = {"pid": lines[0].strip() if lines else ""}
    record.update(line.split("=", 1) for line in lines[1:] if "=" in line)
    return {k: v.strip() for k, v in record.items()}


class LockRefused(Exception):
    """The folder is held by another live run (the message names it and says what to do)."""


class RunLock:
    """An exclusive lock on an output folder for a live run: ``<folder>/.zoo-run.lock`` records the pid, host and
    scheduler job and holds an ``flock``.

    On one host the kernel drops the flock when its process dies, so the lock of a killed run is taken over at once.
    A lock written on another host of a shared file system (where the flock may not reach) is live while its holder
    refreshes it (every minute); one not refreshed for 10 minutes, or one left by an earlier start of the same
    scheduler job (a requeue), is taken over. The lock file is opened with ``O_NOFOLLOW``: a symbolic link is
    refused, never followed (it would truncate its target); a folder, a FIFO or a hard link there is refused too."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = os.path.join(os.fspath(folder), LOCK_NAME)
        self.fd: int | None = None
        self._stop: Any = None

    def _open(self) -> int:
        import errno
        import stat

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LockRefused(f"the run lock {self.path} is a symbolic link; remove it (zoo never follows a link "
                                  "there, it would overwrite the link's target)") from None
            if e.errno == errno.EISDIR:
                raise LockRefused(f"the run lock {self.path} is a folder; remove it") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a hard link: writing the lock would overwrite its twin
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else \
                "a hard link to another file (zoo would overwrite that file)"
            raise LockRefused(f"the run lock {self.path} is {what}; remove it")
        return fd

    def holder(self, fd: int) -> dict[str, str]:
        """The record of the lock file behind ``fd`` (pid, host, job, started)."""
        return _lock_record(os.pread(fd, 4096, 0).decode(errors="replace"))

    def _refusal(self, record: dict[str, str], age: float | None = None) -> LockRefused:
        folder = os.path.dirname(self.path)
        pid = record.get("pid") or "?"
        host = record.get("host")
        if age is None or not host:
            return LockRefused(f"another run (pid {pid}) is writing to {folder}; wait for it to end or give this run "
                               "another --trainer.default_root_dir")
        job = f", {record['job']}" if record.get("job") else ""
        return LockRefused(
            f"another run (pid {pid} on host {host}{job}) is writing to {folder} (its lock was refreshed {age:.0f} s "
            f"ago); wait for it to end or give this run another --trainer.default_root_dir. If that job is gone, "
            f"delete {self.path}; a lock from another host not refreshed for {LOCK_STALE_SECONDS // 60} minutes is "
            "taken over by itself")

    def acquire(self) -> "RunLock":
        """Take the lock, or raise ``LockRefused`` naming the live holder."""
        import fcntl
        import socket
        import time

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = self.holder(fd)
                os.close(fd)
                raise self._refusal(record) from None
            try:  # the file may have been removed by the previous holder between our open and our lock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            record = self.holder(fd)
            age = time.time() - os.fstat(fd).st_mtime
            other_host = record.get("host") not in (None, "", host)
            ours = bool(job_identity()) and record.get("job") == job_identity()  # an earlier start of this job
            if other_host and not ours and record.get("pid") and age < LOCK_STALE_SECONDS:
                os.close(fd)  # the flock may not reach across hosts: a fresh lock from elsewhere is live
                raise self._refusal(record, age)
            break
        os.ftruncate(fd, 0)
        text = f"{os.getpid()}\nhost={host}\njob={job_identity()}\nstarted={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
        os.pwrite(fd, text.encode(), 0)
        self.fd = fd
        self._start_refresh()
        return self

    def _start_refresh(self) -> None:
        import threading

        stop = threading.Event()
        fd = self.fd

        def refresh() -> None:
            while not stop.wait(LOCK_REFRESH_SECONDS):
                try:
                    os.utime(fd)
                except OSError:
                    return

        threading.Thread(target=refresh, name="zoo-run-lock", daemon=True).start()
        self._stop = stop

    def release(self) -> None:
        """Remove the lock file and drop the flock."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self.fd is not None:
            try:
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path, follow_symlinks=False)):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def held_by_another(self) -> str | None:
        """For a process that does not take the lock itself (a rank > 0 of an externally launched job): the
        refusal its rank 0 will meet, when a live run of another job holds the folder, else None. Read-only."""
        import fcntl
        import socket
        import time

        if not job_identity():
            return None  # no scheduler job to tell our rank 0's lock from another run's: rank 0 alone decides
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            record = self.holder(fd)
            if record.get("job") == job_identity():
                return None  # our own rank 0 holds it (or an earlier start of this job held it)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return str(self._refusal(record))
            fcntl.flock(fd, fcntl.LOCK_UN)
            age = time.time() - os.fstat(fd).st_mtime
            if record.get("host") not in (None, "", socket.gethostname()) and age < LOCK_STALE_SECONDS:
                return str(self._refusal(record, age))
            return None
        finally:
            os.close(fd)
