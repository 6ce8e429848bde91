"""Features on disk: one ``.npy`` file per split, written shard by shard, read back memory-mapped.

A store folder holds ``key.json`` (what the features are of: encoder hash, data content, view, dtype), ``feats.npy``
([N, D] in float32 / float16 / bfloat16-as-uint16, one row per dataset position, zeros for undecodable images) and one
``shard_XXXXX.json`` per finished shard (its labels, which rows were read, the skipped files). A shard's rows are
written with ``os.pwrite`` (a full disk is an ``OSError`` there, never a SIGBUS as through a writable memory map),
flushed, and only then is its JSON written atomically: a killed extraction resumes at the first missing shard.
Readers map the file copy-on-write, so the features cost page cache, not a second copy in the process.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FEATURE_DTYPES", "Features", "FeatureStore", "feature_dtype", "dataset_fingerprint", "weights_sha256"]

# name -> (numpy dtype on disk, torch dtype in memory); numpy has no bfloat16: its bits are stored as uint16
FEATURE_DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
                  "bfloat16": (np.uint16, torch.bfloat16)}
# a shard is the unit of resume and the extraction's buffer: ~64 MiB of features (ImageNet ResNet-50 fp16: 82 shards)
SHARD_BYTES = 64 << 20


def feature_dtype(name: str, device: torch.device) -> str:
    """The on-disk dtype: ``auto`` is float16 on a GPU (half the bytes; the probe trains in float32 anyway), float32
    on a CPU (where float16 arithmetic is slow and memory is the host's either way)."""
    if name == "auto":
        return "float16" if device.type == "cuda" else "float32"
    if name not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype={name!r}: choose auto, {', '.join(FEATURE_DTYPES)}")
    return name


@dataclass
class Features:
    """Features of one split: ``feats`` [N, D] (any float dtype, possibly memory-mapped), ``labels`` [N] (-1 where no
    feature was read), the rows that were read (``rows``, dataset positions) and the skipped files."""

    feats: torch.Tensor
    all_labels: torch.Tensor
    rows: torch.Tensor
    skipped: list[str] = field(default_factory=list)

    @property
    def labels(self) -> torch.Tensor:
        """Labels of the rows read."""
        return self.all_labels[self.rows]

    @property
    def index(self) -> torch.Tensor:
        """Dataset positions of the rows read."""
        return self.rows

    @property
    def dim(self) -> int:
        """Feature size."""
        return int(self.feats.shape[1])

    def subset(self, positions: torch.Tensor) -> "Features":
        """The ``positions``-th of the rows read (no copy of the features)."""
        return Features(self.feats, self.all_labels, self.rows[positions], [])

    def gather(self, positions: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 features of the ``positions``-th rows read, on ``device`` (reads only those rows)."""
        return self.feats[self.rows[positions].cpu()].to(device).float()

    def chunk_rows(self, nbytes: int = 16 << 20) -> int:
        """Rows of about ``nbytes`` of float32 features (what ``chunks`` reads at a time by default: a few of these
        transient copies stay small beside the mapped features)."""
        return max(1, nbytes // (4 * max(self.dim, 1)))

    def chunks(self, size: int | None = None):
        """(positions, float32 features) of the rows read, ``size`` rows (default: ~16 MiB) at a time."""
        size = size or self.chunk_rows()
        for start in range(0, len(self.rows), size):
            pos = torch.arange(start, min(start + size, len(self.rows)))
            yield pos, self.gather(pos)

    def __len__(self) -> int:
        return len(self.rows)


def _bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, 0-d included)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes, bytes): the encoder's identity in cache keys."""
    h = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(_bytes(t))
    return h.hexdigest()


def dataset_fingerprint(ds: Any) -> dict[str, Any]:
    """What the dataset holds, by content: for files their relative paths, sizes, mtimes and labels; for in-memory
    images a hash of their bytes and labels; for a ``Subset`` also which positions. Swapping two class folders, or
    replacing one file, changes it."""
    from torch.utils.data import Subset

    positions = None
    while isinstance(ds, Subset):
        idx = list(ds.indices)
        positions = idx if positions is None else [idx[i] for i in positions]
        ds = ds.dataset
    h = hashlib.sha256()
    samples = getattr(ds, "samples", None)
    if samples is not None:
        root = Path(getattr(ds, "root", "/"))
        for path, label in samples:
            st = os.stat(path) if os.path.exists(path) else None
            rel = os.path.relpath(path, root)
            h.update(f"{rel}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\0{label}\n".encode())
        kind = "files"
    else:
        kind = "tensors"
        tensors = [getattr(ds, a) for a in ("images", "labels", "x", "y", "data", "targets") if hasattr(ds, a)]
        tensors = [torch.as_tensor(t) for t in tensors if isinstance(t, (torch.Tensor, np.ndarray, list))]
        if not tensors:  # nothing to read the content from: its type and length (documented limit of the cache)
            kind = f"opaque:{type(ds).__qualname__}"
        for t in tensors:
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(_bytes(t))
    if positions is not None:
        h.update(np.asarray(positions, dtype=np.int64).tobytes())
    return {"kind": kind, "n": len(positions) if positions is not None else len(ds), "sha256": h.hexdigest()}


class FeatureStore:
    """One split's features in ``root``: create or reopen (resume), write shards, read memory-mapped."""

    def __init__(self, root: str | os.PathLike, key: dict[str, Any], n: int, dtype: str = "float32",
                 shard_rows: int = 0) -> None:
        self.root, self.key, self.n, self.dtype = Path(root), key, int(n), dtype
        self.requested_shard_rows = int(shard_rows)
        self.dim: int | None = None
        self.shard_rows = int(shard_rows) or 0
        self.stale: dict[str, Any] | None = None  # what a folder holding other features holds
        meta = self.root / "key.json"
        if meta.exists():
            try:
                saved = json.loads(meta.read_text())
            except ValueError:
                saved = {}
            if saved.get("key") == json.loads(json.dumps(key, default=str)) and saved.get("n") == self.n:
                self.dim, self.shard_rows = saved["dim"], saved["shard_rows"]
            else:
                self.stale = saved  # another encoder / data / view: the caller decides (rebuild or refuse)

    @property
    def exists(self) -> bool:
        """Whether the folder holds (some of) these features."""
        return self.dim is not None

    def clear(self) -> None:
        """Remove every file of the store (``--overwrite``, or features of something else)."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.dim = None
        self.shard_rows = self.requested_shard_rows

    def num_shards(self) -> int:
        """Shards of the split (the last may be short)."""
        return -(-self.n // self.shard_rows) if self.shard_rows else 0

    def shard_range(self, i: int) -> tuple[int, int]:
        """Rows [start, end) of shard ``i``."""
        return i * self.shard_rows, min((i + 1) * self.shard_rows, self.n)

    def done(self) -> list[int]:
        """Finished shards."""
        if not self.exists:
            return []
        return sorted(int(p.stem.split("_")[1]) for p in self.root.glob("shard_*.json"))

    def create(self, dim: int) -> None:
        """Lay out an empty store for features of size ``dim`` (the file is sized now; blocks come with the writes)."""
        np_dtype = FEATURE_DTYPES[self.dtype][0]
        itemsize = np.dtype(np_dtype).itemsize
        self.root.mkdir(parents=True, exist_ok=True)
        self.dim = int(dim)
        if not self.shard_rows:
            self.shard_rows = max(1, SHARD_BYTES // (self.dim * itemsize))
        with open(self.root / "feats.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np_dtype)),
                                                     "fortran_order": False, "shape": (self.n, self.dim)})
            self._offset = f.tell()
            f.truncate(self._offset + self.n * self.dim * itemsize)
        self._atomic(self.root / "key.json", {"key": self.key, "n": self.n, "dim": self.dim, "dtype": self.dtype,
                                              "shard_rows": self.shard_rows})

    def _header_offset(self) -> int:
        with open(self.root / "feats.npy", "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            return f.tell()

    def write_shard(self, i: int, feats: torch.Tensor, labels: torch.Tensor, read: torch.Tensor,
                    skipped: list[str]) -> None:
        """Write shard ``i``: ``feats`` [rows, D] for every row of the shard (zeros where nothing was read),
        ``labels`` [rows], ``read`` [rows] bool, ``skipped`` the files not read."""
        start, end = self.shard_range(i)
        np_dtype, torch_dtype = FEATURE_DTYPES[self.dtype]
        block = feats.to(torch_dtype).contiguous()
        data = (block.view(torch.int16) if torch_dtype == torch.bfloat16 else block).numpy().astype(np_dtype, copy=False)
        offset = self._header_offset() + start * self.dim * data.itemsize
        fd = os.open(self.root / "feats.npy", os.O_WRONLY)
        try:
            view, written = memoryview(np.ascontiguousarray(data)).cast("B"), 0  # no copy of the shard
            while written < len(view):  # pwrite may write less than asked
                written += os.pwrite(fd, view[written:], offset + written)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert end - start == len(labels)
        self._atomic(self.root / f"shard_{i:05d}.json", {"labels": labels.tolist(), "read": read.tolist(),
                                                          "skipped": skipped})

    @staticmethod
    def _atomic(path: Path, obj: Any) -> None:
        from zoo.files import atomic_write_text

        atomic_write_text(path, json.dumps(obj, default=str))

    def load(self) -> Features:
        """The finished store, memory-mapped (copy-on-write: nothing is written back)."""
        missing = sorted(set(range(self.num_shards())) - set(self.done()))
        if missing:
            raise ValueError(f"features in {self.root} are incomplete (shards {missing[:5]} missing)")
        labels = torch.full((self.n,), -1, dtype=torch.long)
        read = torch.zeros(self.n, dtype=torch.bool)
        skipped: list[str] = []
        for i in range(self.num_shards()):
            start, end = self.shard_range(i)
            meta = json.loads((self.root / f"shard_{i:05d}.json").read_text())
            labels[start:end] = torch.tensor(meta["labels"], dtype=torch.long)
            read[start:end] = torch.tensor(meta["read"], dtype=torch.bool)
            skipped += meta["skipped"]
        arr = np.load(self.root / "feats.npy", mmap_mode="c")
        feats = torch.from_numpy(arr)
        if self.dtype == "bfloat16":
            feats = feats.view(torch.bfloat16)
        return Features(feats, labels, torch.nonzero(read).flatten(), skipped)
