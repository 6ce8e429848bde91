"""WebDataset tar shards as an indexable dataset: ``wds:/data/in1k/train-{000000..001023}.tar``.

Why an index over the standard ``tarfile`` rather than a shard-streaming library: the training order is a seeded
permutation of *all* samples, sharded over ranks, and a resumed run restarts at the exact sample
(``zoo.data.loaders``); that needs ``__len__`` + ``__getitem__``. webdataset's ``WebDataset`` is an iterable
(shard-level shuffling only, no exact resume); its indexed reader ``wids`` needs every shard's sample count up
front, prints to stderr on every construction, reports bad data with ``assert`` and parses tar headers itself
(ignoring PAX records, so a member name longer than 100 bytes written by Python's ``tarfile`` comes back truncated).
``tarfile`` reads every tar dialect (ustar, GNU, PAX) that other tools write, so the index is built with it, once:
per sample the shard id, the image member's byte offset and size, the label (from ``.cls``) and the key, as NumPy
arrays cached like the folder index (``zoo.data.index.cached_arrays``, keyed by each shard's path, size, inode and
mtime). Reading a sample is then one ``os.pread`` of its image bytes.

Sample rules (webdataset's): a member ``dir/name.ext1.ext2`` has key ``dir/name`` and extension ``ext1.ext2``;
a sample is the members sharing a key within a shard; its image is the member whose extension is an image type
(``jpg``, ``jpeg``, ``png``, ``webp``, ...) and its label the ASCII integer in ``.cls`` (surrounding whitespace, a
trailing newline included, ignored). A key with dots in it (``n01.v2.jpg`` + ``n01.v2.cls``, as GNU tar of such
files or webdataset's ``TarWriter`` given such a key writes them) would have no ``jpg``/``cls`` member for webdataset;
its members are grouped by their name less the last extension instead (key ``n01.v2``). Bad input never stops a
run: a sample without image or ``.cls``, or whose class is not an integer in range, is left out and counted; a
0-byte, truncated (complete samples before the cut are kept) or unreadable shard is skipped and counted; the counts
are logged once, naming the shards. A pattern that matches nothing is one error line.

``http(s)://`` and ``pipe:`` shards are fetched once into ``cache_dir('shards')`` (by one process, others wait),
then read locally: random access needs the bytes on a local disk.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.index import _locked, cached_arrays, read_arrays
from zoo.data.workers import BusySlots
from zoo.files import atomic_path, cache_dir

__all__ = ["ShardDataset", "expand_braces", "resolve_shards", "split_key", "IMAGE_EXTS", "CLASS_FILE"]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff", "gif")
CLASS_FILE = "classes.json"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_BLOCK = 512  # tar block
_OPEN_FILES = 64  # per process: an LRU of open shard descriptors


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{000..003}`` (zero padding kept), ``{a,b}``, nested; left to right order."""
    depth, start = 0, -1
    for i, ch in enumerate(pattern):
        if ch == "{":
            start, depth = (i if depth == 0 else start), depth + 1
        elif ch == "}" and depth:
            depth -= 1
            if depth:
                continue
            head, body, tail = pattern[:start], pattern[start + 1:i], pattern[i + 1:]
            rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
            if rng:
                a, b = rng.groups()
                padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
                width = max(len(a), len(b)) if padded else 0
                step = 1 if int(b) >= int(a) else -1
                options = [str(v).zfill(width) for v in range(int(a), int(b) + step, step)]
            else:
                options = _split_top(body)
                if len(options) < 2:  # "{x}" is no expansion in the shell either: kept as written
                    return [head + "{" + body + "}" + t for t in expand_braces(tail)]
                options = [e for o in options for e in expand_braces(o)]
            return [head + o + t for o in options for t in expand_braces(tail)]
    return [pattern]


def _split_top(body: str) -> list[str]:
    """Split ``body`` at the commas outside nested braces."""
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    return parts + [cur]


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name as webdataset splits it (``a/b.seg.png`` -> ``a/b``, ``seg.png``);
    None for a name webdataset skips (no extension, or a dot file)."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2)) if m else None


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:"))


def _fetch(url: str) -> str:
    """A local copy of a remote shard in ``cache_dir('shards')``, fetched once (one process; the others wait)."""
    folder = cache_dir("shards")
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".tar")
    with _locked(str(dest) + ".lock"):
        if not dest.exists():
            try:
                with atomic_path(dest) as tmp, open(tmp, "wb") as out:
                    if url.startswith("pipe:"):
                        proc = subprocess.run(url[5:], shell=True, stdout=out, stderr=subprocess.PIPE, timeout=3600)
                        if proc.returncode:
                            raise OSError(f"the command failed ({proc.returncode}): "
                                          f"{proc.stderr.decode(errors='replace').strip()[:200]}")
                    else:
                        import urllib.request

                        with urllib.request.urlopen(url, timeout=60) as resp:
                            shutil.copyfileobj(resp, out, 1 << 20)
            except (OSError, subprocess.TimeoutExpired) as err:  # one line naming the shard (data.dataset check)
                raise FileNotFoundError(f"cannot fetch shard {url!r}: {err}") from None
    return str(dest)


def resolve_shards(pattern: str, split: str) -> list[str]:
    """The shard files of a ``wds:`` spec's path for ``split``: a folder (``<dir>/<split>/*.tar``, as ``zoo data
    pack`` writes), or a pattern with braces / globs, where ``{split}`` stands for train or val."""
    if not pattern:
        raise ValueError("wds needs shards: use 'wds:/path/train-{000000..000099}.tar' or a folder from zoo data pack")
    if not _is_remote(pattern) and os.path.isdir(pattern):
        found = sorted(glob.glob(os.path.join(glob.escape(pattern), split, "*.tar")))
        if not found:
            raise FileNotFoundError(f"no shards in {os.path.join(pattern, split)}: expected <dir>/{split}/*.tar, as "
                                    "zoo data pack writes")
        return found
    if "{split}" not in pattern and split != "train":
        raise NoSplit(f"'wds:{pattern}' names the training shards only; to also validate or probe, put {{split}} "
                      f"in the pattern (e.g. 'wds:/data/{{split}}-{{000000..000099}}.tar') or give a folder from "
                      "zoo data pack")
    urls = expand_braces(pattern.replace("{split}", split))
    if _is_remote(pattern):
        return urls
    out: list[str] = []
    for u in urls:
        if glob.has_magic(u):
            out += sorted(glob.glob(u))
        elif os.path.exists(u):
            out.append(u)
        else:
            raise FileNotFoundError(f"shard {u} does not exist (from the pattern {pattern!r}; {len(urls)} names)")
    if not out:
        raise FileNotFoundError(f"the shard pattern {pattern!r} matches no file")
    return out


class NoSplit(ValueError):
    """A ``wds:`` pattern without ``{split}`` asked for its validation split."""


def _samples_of(key: str, members: list[tuple]) -> list[tuple[str, dict[str, Any]]]:
    """The samples of one webdataset key's members ``(name, extension, last extension, data)``: ``key`` itself when
    it has a plain image (``.jpg``, ...) and a plain ``.cls``, as webdataset reads it. Otherwise the key had dots
    in it (``22.05.jpg`` + ``22.05.cls``: webdataset's key ``22`` with extensions ``05.jpg`` and ``05.cls``, which no
    reader asking for ``jpg`` / ``cls`` finds), and the members are grouped by their name less the last extension
    (key ``22.05``), when that gives a complete sample. Else the key is reported as webdataset sees it."""
    plain: dict[str, Any] = {}
    for _, ext, _, data in members:
        if ext in IMAGE_EXTS and "image" not in plain:
            plain["image"] = data
        elif ext == "cls":
            plain["cls"] = data
    if "image" in plain and "cls" in plain:
        return [(key, plain)]
    by_stem: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for name, _, last, data in members:
        entry = by_stem.setdefault(name.rsplit(".", 1)[0], {})
        if last == "cls":
            entry["cls"] = data
        elif "image" not in entry:
            entry["image"] = data
    if any("image" in e and "cls" in e for e in by_stem.values()):
        return list(by_stem.items())
    return [(key, plain)]


def _index_shard(path: str, shard_id: int) -> tuple[dict[str, list], dict[str, int]]:
    """Samples of one shard (lists of shard id, offset, size, label, key) and its problems counted."""
    counts = {"no_image": 0, "no_cls": 0, "bad_cls": 0, "truncated": 0, "unreadable": 0}
    by_key: OrderedDict[str, list[tuple]] = OrderedDict()  # webdataset key -> its image and .cls members
    try:
        size = os.path.getsize(path)
        tf = tarfile.open(path, "r:")  # uncompressed only: a compressed tar has no offsets to read from
    except (OSError, tarfile.TarError, EOFError):
        counts["unreadable"] = 1
        return {}, counts
    try:
        with tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, EOFError, OSError):
                    counts["truncated"] = 1
                    break
                if m is None:  # tarfile ends quietly at a cut header: a complete tar has a zero block there
                    tf.fileobj.seek(tf.offset)
                    counts["truncated"] = int(tf.fileobj.read(_BLOCK) != bytes(_BLOCK))
                    break
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:  # the cut went through this member
                    counts["truncated"] = 1
                    break
                parts = split_key(m.name)
                if parts is None:
                    continue
                last = parts[1].rsplit(".", 1)[-1].lower()
                if last not in IMAGE_EXTS and last != "cls":
                    continue
                data = tf.extractfile(m).read(64) if last == "cls" else (m.offset_data, m.size)
                by_key.setdefault(parts[0], []).append((m.name, parts[1].lower(), last, data))
    except (OSError, tarfile.TarError, EOFError):
        counts["truncated"] = 1
    cols: dict[str, list] = {"offset": [], "size": [], "label": [], "key": []}
    for key, entry in (e for k, members in by_key.items() for e in _samples_of(k, members)):
        if "image" not in entry:
            counts["no_image"] += "cls" in entry  # a key with only other members (json, txt) is not a sample
            continue
        if "cls" not in entry:
            counts["no_cls"] += 1
            continue
        try:
            label = int(entry["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
        if label < 0:
            counts["bad_cls"] += 1
            continue
        cols["offset"].append(entry["image"][0])
        cols["size"].append(entry["image"][1])
        cols["label"].append(label)
        cols["key"].append(key)
    cols["shard"] = [shard_id] * len(cols["key"])
    return cols, counts


def _build_index(paths: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
    cols: dict[str, list] = {"shard": [], "offset": [], "size": [], "label": [], "key": []}
    problems: dict[str, list[str]] = {}
    per_shard = []
    for sid, p in enumerate(paths):
        c, counts = _index_shard(p, sid)
        for k in cols:
            cols[k] += c.get(k, [])
        per_shard.append(len(c.get("key", [])))
        for k, n in counts.items():
            if n:
                problems.setdefault(k, []).append(f"{os.path.basename(p)}:{n}")
    keys = [k.encode("utf-8", "surrogateescape") for k in cols["key"]]
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(k) for k in keys), dtype=np.int64, count=len(keys)), out=offsets[1:])
    arrays = {"shard": np.asarray(cols["shard"], dtype=np.int32), "offset": np.asarray(cols["offset"], np.int64),
              "size": np.asarray(cols["size"], np.int64), "label": np.asarray(cols["label"], np.int64),
              "keys": np.frombuffer(b"".join(keys), dtype=np.uint8).copy(), "key_offsets": offsets}
    return {"shards": paths, "per_shard": per_shard, "problems": problems}, arrays


def _read_classes(paths: list[str], labels: np.ndarray) -> tuple[list[str], bool]:
    """The class names: ``classes.json`` beside the shards or one folder up; else ``"0".."max"`` (False)."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    for d in (folder, os.path.dirname(folder)):
        f = os.path.join(d, CLASS_FILE)
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                names = json.load(fh)
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ValueError(f"{f} must be a JSON list of class names")
            return names, True
    return [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)], False


class ShardDataset(Dataset):
    """Samples of WebDataset tar shards, by index: ``(uint8 [3, H, W] or raw bytes, label, "<shard>:<key>")``.

    Args:
        spec_path: what follows ``wds:`` (see ``resolve_shards``).
        split: "train" or "val".
        decode: "worker" (CPU decode in the loader workers) or "device" (raw bytes, decoded after transfer).
    """

    def __init__(self, spec_path: str, split: str = "train", decode: str = "worker") -> None:
        if decode not in ("worker", "device"):
            raise ValueError(f"decode must be 'worker' or 'device', got {decode!r}")
        self.decode = decode
        urls = resolve_shards(spec_path, split)
        paths = [_fetch(u) if _is_remote(u) else u for u in urls]
        ident = {"format": 1, "shards": []}
        newest = 0.0
        for p in paths:
            st = os.stat(p)
            ident["shards"].append([os.path.realpath(p), st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns])
            newest = max(newest, st.st_mtime_ns / 1e9)
        meta, arrays, self.source = cached_arrays("shards", ident, newest, lambda: _build_index(paths))
        self.shards, self.problems = [os.fspath(p) for p in paths], meta["problems"]
        self.names = [os.path.basename(u) for u in urls]
        self._shard, self._offset, self._size = arrays["shard"], arrays["offset"], arrays["size"]
        self.labels, self._keys, self._key_offsets = arrays["label"], arrays["keys"], arrays["key_offsets"]
        if not len(self.labels):
            raise FileNotFoundError(f"no usable samples in the {len(paths)} shard(s) of 'wds:{spec_path}' ({split})"
                                    + (f": {self._problem_line()}" if self.problems else ""))
        self.classes, named = _read_classes(paths, self.labels)
        if named and int(self.labels.max()) >= len(self.classes):
            raise ValueError(f"shard labels go up to {int(self.labels.max())} but {CLASS_FILE} names "
                             f"{len(self.classes)} classes")
        if self.problems:
            log.warning("wds:%s (%s): %s", spec_path, split, self._problem_line())
        self._files: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        self.busy = BusySlots()

    def _problem_line(self) -> str:
        what = {"no_image": "samples without an image", "no_cls": "samples without .cls",
                "bad_cls": "samples whose .cls is not a non-negative integer", "truncated": "truncated shards",
                "unreadable": "unreadable or empty shards"}
        return "; ".join(f"{sum(int(x.rsplit(':', 1)[1]) for x in v)} {what[k]} left out ({', '.join(v[:3])}"
                         f"{', ...' if len(v) > 3 else ''})" for k, v in self.problems.items())

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i: int) -> str:
        """The sample's key (its members' common name)."""
        return self._keys[self._key_offsets[i]:self._key_offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def where(self, i: int) -> str:
        """``<shard file>:<key>``: how a skipped sample is named."""
        return f"{self.shards[self._shard[i]]}:{self.key(i)}"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: descriptors are per process
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.pop(shard, None)
        if fd is None:
            fd = os.open(self.shards[shard], os.O_RDONLY)
            while len(self._files) >= _OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd
        return fd

    def read(self, i: int) -> bytes | None:
        """The image member's bytes of sample ``i``; None when the shard can no longer be read in full."""
        size = int(self._size[i])
        try:
            data = os.pread(self._fd(int(self._shard[i])), size, int(self._offset[i]))
        except OSError:
            return None
        return data if len(data) == size else None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str] | tuple[None, int, str]:
        self.busy.enter(i)  # a worker killed while reading it is named by this sample's shard (zoo.data.workers)
        try:
            return self._item(i)
        finally:
            self.busy.leave()

    def _item(self, i: int) -> tuple[torch.Tensor, int, str] | tuple[None, int, str]:
        label, where = int(self.labels[i]), self.where(i)
        raw = self.read(i)
        if raw is None:
            return None, label, where
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        if self.decode == "device":
            return data, label, where
        from augment.decode import decode_batch

        try:
            images, bad = decode_batch([data], "cpu")  # the folders' rules: any mode to RGB, bad data skipped
        except Exception as err:  # e.g. MemoryError: the loader re-raises it in the main process, naming the sample
            raise RuntimeError(f"reading {where} failed: {type(err).__name__}: {err}") from err
        return (None, label, where) if bad else (images[0], label, where)

    _ARRAYS = {"_shard": "shard", "_offset": "offset", "_size": "size", "labels": "label", "_keys": "keys",
               "_key_offsets": "key_offsets"}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # descriptors do not travel to spawned workers
        if self.source is not None:  # a spawned worker maps the cached index again instead of receiving a copy
            for attr in self._ARRAYS:
                state[attr] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.labels is None:
            arrays = read_arrays(self.source)[1]
            for attr, name in self._ARRAYS.items():
                setattr(self, attr, arrays[name])

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._files.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
