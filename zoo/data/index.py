"""The file index of an image folder: built once with ``os.scandir``, kept as NumPy arrays, cached on disk.

Listing ImageNet (1.28M files) with one ``stat`` per file costs ~30 s per process and, on a shared file system, one
metadata operation per file per rank. Here:

* **No per-file stat.** ``os.scandir`` returns the entries with their type (``d_type``), so ``DirEntry.is_file()``
  needs no system call for regular files; only a symlink (or a file system that reports no type) costs one stat, as
  ``Path.is_file`` would. The rules are the old listing's: regular files and symlinks to files, directly in a class
  folder, whose ``Path.suffix`` (lower-cased) is an image extension; hidden files included; sorted by name.
* **Arrays, not Python objects.** The relative paths are one ``uint8`` blob (``os.fsencode``, so undecodable names
  round-trip) with ``int64`` offsets, plus an ``int32`` folder id per file: ~8 B + the name per sample, and a forked
  loader worker reading them touches no reference counts, so its pages stay shared (a list of ``Path`` objects is
  copied page by page into every worker as the epoch touches it). File sizes are *not* stored: they need the
  ``stat`` this avoids, and nothing reads them.
* **Built once, shared.** The arrays are written to ``cache_dir('index')/<key>.zidx`` (``$ZOO_CACHE_DIR`` moves it)
  atomically, by the one process that holds the key's file lock; the other ranks wait on that lock, then
  memory-map the file (its pages are shared by every process on the node). Workers started by spawn re-map it.
* **Invalidation.** The key hashes the folder's real path and, for the split folder and each sub-folder: name,
  device, inode and ``st_mtime_ns`` (one stat per folder, ~1,000 for ImageNet). Adding, removing or renaming a file
  changes its folder's mtime, so a new key. Editing a file's bytes in place does not (the listing is unchanged; the
  reader sees the new bytes). An index is not written when a folder changed less than ``RACY_SECONDS`` before the
  listing (as git's racy-index rule: a change within the file system's mtime granularity could go unseen).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

from zoo.files import atomic_path, cache_dir

__all__ = ["FileIndex", "folder_index", "list_subfolders", "scan_folder", "cached_arrays", "image_suffix"]

FORMAT = 1
RACY_SECONDS = 2.0
_MAGIC = b"ZOOIDX1\n"
_ALIGN = 64


def image_suffix(name: str) -> str:
    """``Path(name).suffix.lower()`` without building a Path (the rule the old listing used)."""
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def list_subfolders(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the sub-folders (symlinks to folders included) of ``folder``."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir())


def _list_files(folder: str, extensions: frozenset[str]) -> list[str]:
    with os.scandir(folder) as it:  # DirEntry.is_file: d_type, no stat except for symlinks
        return sorted(e.name for e in it if image_suffix(e.name) in extensions and e.is_file())


class FileIndex:
    """Files of a folder as arrays: ``folders`` (sub-folder names, or ``[""]`` for a flat folder), ``counts`` per
    folder, ``folder_of`` per file (int32), and the relative paths as ``blob`` (uint8) + ``offsets`` (int64, n+1)."""

    def __init__(self, folders: Sequence[str], arrays: dict[str, np.ndarray], source: str | None = None) -> None:
        self.folders = list(folders)
        self.blob, self.offsets = arrays["blob"], arrays["offsets"]
        self.folder_of, self.counts = arrays["folder_of"], arrays["counts"]
        self.source = source  # the cache file the arrays are mapped from (None: built in memory)

    def __len__(self) -> int:
        return len(self.folder_of)

    def relpath(self, i: int) -> str:
        """Path of file ``i`` relative to the indexed folder (``<folder>/<name>`` or ``<name>``)."""
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name (what the cache file stores)."""
        return {"blob": self.blob, "offsets": self.offsets, "folder_of": self.folder_of, "counts": self.counts}

    def __reduce__(self):
        # A worker started by spawn/forkserver maps the cache file again instead of receiving a pickled copy.
        if self.source is not None:
            return _load_index, (self.source,)
        return FileIndex, (self.folders, self.arrays(), None)


def scan_folder(folder: str | os.PathLike, extensions: Sequence[str]) -> FileIndex:
    """Index ``folder``: its sub-folders' image files (``<sub>/<name>``), or, without sub-folders, its own."""
    folder = os.fspath(folder)
    exts = frozenset(e.lower() for e in extensions)
    subs = list_subfolders(folder)
    groups = [(s, _list_files(os.path.join(folder, s), exts)) for s in subs] if subs else [("", _list_files(folder, exts))]
    parts: list[bytes] = []
    for sub, names in groups:
        prefix = os.fsencode(sub) + b"/" if sub else b""
        parts.extend(prefix + os.fsencode(n) for n in names)
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    counts = np.array([len(names) for _, names in groups], dtype=np.int64)
    arrays = {"blob": np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), "offsets": offsets,
              "folder_of": np.repeat(np.arange(len(groups), dtype=np.int32), counts), "counts": counts}
    return FileIndex([g for g, _ in groups], arrays)


def _identity(folder: str, extensions: Sequence[str]) -> tuple[dict, float]:
    """What the cache key hashes (see the module docstring), and the newest folder mtime (seconds)."""
    st = os.stat(folder)
    ident = {"format": FORMAT, "root": os.path.realpath(folder), "ext": sorted(e.lower() for e in extensions),
             "self": [st.st_dev, st.st_ino, st.st_mtime_ns]}
    newest = st.st_mtime_ns
    subs = []
    with os.scandir(folder) as it:
        for e in sorted(it, key=lambda e: e.name):
            if e.is_dir():
                s = e.stat()  # one stat per folder (follows a symlinked folder)
                subs.append([e.name, s.st_dev, s.st_ino, s.st_mtime_ns])
                newest = max(newest, s.st_mtime_ns)
    ident["subs"] = subs
    return ident, newest / 1e9


def _write_arrays(path: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """One file: magic, header length, JSON header (meta + each array's dtype/shape/offset), aligned array data."""
    layout, pos = {}, 0
    for name, a in arrays.items():
        layout[name] = [a.dtype.str, list(a.shape), pos]
        pos += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"meta": meta, "arrays": layout}).encode()
    start = -(-(len(_MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
        for name, a in arrays.items():
            f.seek(start + layout[name][2])
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(start + pos)


def read_arrays(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a file written by ``_write_arrays``; the arrays are read-only views of a memory map."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if mm[:len(_MAGIC)] != _MAGIC:
        raise ValueError(f"{path} is not a zoo index file")
    n = int.from_bytes(mm[len(_MAGIC):len(_MAGIC) + 8], "little")
    head = json.loads(mm[len(_MAGIC) + 8:len(_MAGIC) + 8 + n])
    start = -(-(len(_MAGIC) + 8 + n) // _ALIGN) * _ALIGN
    arrays = {}
    for name, (dtype, shape, off) in head["arrays"].items():
        count = int(np.prod(shape)) if shape else 1
        arrays[name] = np.frombuffer(mm, dtype=np.dtype(dtype), count=count, offset=start + off).reshape(shape)
    return head["meta"], arrays


def _load_index(path: str) -> FileIndex:
    meta, arrays = read_arrays(path)
    return FileIndex(meta["folders"], arrays, source=path)


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the holder dies, so nobody waits forever)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cached_arrays(kind: str, ident: dict, newest_change: float, build: Callable[[], tuple[dict, dict]],
                  cache: str | os.PathLike | None = None) -> tuple[dict, dict[str, np.ndarray], str | None]:
    """(meta, arrays, cache file or None) for ``ident``: read from the cache, or built by the one process holding the
    key's lock while others wait, then written atomically. ``build`` returns (meta, arrays); an unwritable cache
    folder means every process builds its own copy."""
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    folder = os.fspath(cache) if cache is not None else os.fspath(cache_dir("index"))
    path = os.path.join(folder, f"{kind}-{key}.zidx")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = _locked(path + ".lock")
        lock.__enter__()
    except OSError:
        meta, arrays = build()
        return meta, arrays, None
    try:
        if os.path.exists(path):
            try:
                meta, arrays = read_arrays(path)
                return meta, arrays, path
            except (OSError, ValueError, KeyError):  # damaged by hand: rebuild
                pass
        meta, arrays = build()
        if time.time() - newest_change > RACY_SECONDS:
            try:
                _write_arrays(path, meta, arrays)
                meta, arrays = read_arrays(path)
                return meta, arrays, path
            except OSError:
                pass
        return meta, arrays, None
    finally:
        lock.__exit__(None, None, None)


def folder_index(folder: str | os.PathLike, extensions: Sequence[str], cache: str | os.PathLike | None = None
                 ) -> FileIndex:
    """``scan_folder(folder)``, from the on-disk cache when the folder is unchanged (see the module docstring)."""
    folder = os.fspath(folder)
    ident, newest = _identity(folder, extensions)

    def build() -> tuple[dict, dict]:
        idx = scan_folder(folder, extensions)
        return {"folders": idx.folders, "root": folder}, idx.arrays()

    meta, arrays, path = cached_arrays("folder", ident, newest, build, cache)
    return FileIndex(meta["folders"], arrays, source=path)
