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
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_text"]


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


def check_folder_path(path: str | os.PathLike, what: str) -> None:
    """Raise ``NotADirectoryError`` naming ``what`` when ``path`` cannot be (or become) a folder: it, or the nearest
    existing path above it, is a file."""
    here = Path(path)
    for candidate in (here, *here.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == here else f"lies under {str(candidate)!r}, which is a file"
                raise NotADirectoryError(f"{what}: {str(here)!r} {where}, not a folder; point it at a folder "
                                         "(or leave it unset for the default)")
            return
