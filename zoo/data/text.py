"""Text data for language models: a corpus of documents -> one memory-mapped token file per split -> windows.

The default corpus is the Python standard library's ``.py`` source, found through ``sysconfig`` so it exists
wherever Python does. Documents are tokenised once (byte-level by default, or a Hugging Face ``tokenizer.json`` /
SentencePiece model through ``zoo.models.tokenizer.load_tokenizer``) into ``train.bin`` / ``val.bin`` under a cache
directory keyed by corpus + tokenizer + options, then served as fixed-length windows of ``seq_len + 1`` tokens
(inputs and shifted targets) as int64 tensors.

The train/val split is by document: a document's split is decided by a seeded hash of its path relative to the
corpus folder, so it does not change when files are added, the byte cap moves, or Python lives elsewhere.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import shutil
import random
import sysconfig
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.files import cache_dir as zoo_cache_dir
from zoo.files import check_folder_path
from zoo.errors import UsageError

log = logging.getLogger(__name__)

CACHE_VERSION = 2
_SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__"}


# ----------------------------------------------------------------------------------------------------------------
# Corpus discovery
# ----------------------------------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    """The Python standard library's source directory (the embedded default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_documents(paths: str | Sequence[str] | None = None, pattern: str = "**/*.py") -> list[Path]:
    """Resolve files, folders (searched with ``pattern``) and glob patterns to a sorted list of files."""
    if paths is None:
        paths = [str(stdlib_dir())]
    elif isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    found: set[Path] = set()
    for spec in paths:
        spec = os.path.expanduser(str(spec))
        p = Path(spec)
        if p.is_file():
            found.add(p.resolve())
        elif p.is_dir():
            found.update(f.resolve() for f in p.glob(pattern) if f.is_file())
        elif any(ch in spec for ch in "*?["):
            found.update(Path(f).resolve() for f in globlib.glob(spec, recursive=True) if os.path.isfile(f))
        else:
            raise FileNotFoundError(f"text corpus path {spec!r} is not a file, folder or glob pattern that exists")
    # Installed packages are not the standard library; skip them so the corpus is the same on every machine.
    return sorted(f for f in found if not _SKIP_PARTS.intersection(f.parts))


def document_names(files: Sequence[Path]) -> dict[Path, str]:
    """Each file's path relative to the corpus's common folder: the same names (and split) on every machine."""
    if not files:
        return {}
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return {f: f.relative_to(root).as_posix() for f in files}


def read_documents(files: Sequence[Path], max_bytes: int | None, seed: int) -> list[tuple[str, str]]:
    """Read text files in a seeded order until ``max_bytes`` (UTF-8) is reached; returns (name, text) pairs."""
    names = document_names(files)
    order = sorted(files, key=lambda f: names[f])  # seeded shuffle of a machine-independent order
    random.Random(seed).shuffle(order)  # a cap then takes a spread of the corpus, not its alphabetical head
    docs, total, skipped = [], 0, 0
    for f in order:
        if max_bytes is not None and total >= max_bytes:
            break
        raw = f.read_bytes()
        if b"\x00" in raw:
            skipped += 1  # binary file: counted and logged, never silently tokenised
            continue
        if max_bytes is not None and total + len(raw) > max_bytes:
            raw = raw[: max_bytes - total]
        text = raw.decode("utf-8", errors="replace")
        if not text:
            continue
        docs.append((names[f], text))
        total += len(raw)
    if skipped:
        log.warning("text corpus: skipped %d binary file(s) containing NUL bytes", skipped)
    if len(docs) + skipped < len(order):
        log.info("text corpus: max_bytes=%s reached after %d of %d files", max_bytes, len(docs), len(order))
    return docs


def split_of(path: str, val_fraction: float, seed: int) -> str:
    """'val' or 'train' for a document, from a seeded hash of its path (deterministic, independent of order)."""
    h = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return "val" if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else "train"


def _tokenizer_vocab(tok: Any) -> int:
    v = tok.vocab_size
    return int(v() if callable(v) else v)


def _tokenizer_eos(tok: Any) -> int | None:
    eos = getattr(tok, "eos_id", None)
    eos = eos() if callable(eos) else eos
    return None if eos is None or int(eos) < 0 else int(eos)


def load_tokenizer(spec: str) -> Any:
    """The tokenizer named by ``spec`` ("byte", a tokenizer.json, or a SentencePiece .model) via zoo.models.tokenizer."""
    from zoo.models.tokenizer import load_tokenizer as _load

    return _load(spec)


# ----------------------------------------------------------------------------------------------------------------
# Tokenise once into memory-mapped files
# ----------------------------------------------------------------------------------------------------------------
def _cache_key(files: Sequence[Path], tokenizer: str, options: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "tokenizer": tokenizer, **options}, sort_keys=True).encode())
    if tokenizer != "byte" and os.path.isfile(tokenizer):
        h.update(Path(tokenizer).read_bytes())  # same path, new vocabulary -> new cache
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build_token_files(docs: Sequence[tuple[str, str]], tokenizer: Any, out_dir: Path, val_fraction: float,
                      seed: int, progress: bool = True) -> dict[str, Any]:
    """Tokenise documents into out_dir/{train,val}.bin (EOS between documents) and write meta.json."""
    vocab = _tokenizer_vocab(tokenizer)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    eos = _tokenizer_eos(tokenizer)
    splits = {s: {"tokens": 0, "bytes": 0, "docs": 0} for s in ("train", "val")}
    assigned = [split_of(p, val_fraction, seed) for p, _ in docs]
    if len(docs) >= 2 and val_fraction > 0:
        # Tiny corpora can hash every document into one split; move the best candidate so both exist.
        if "val" not in assigned or "train" not in assigned:
            missing = "val" if "val" not in assigned else "train"
            assigned[0] = missing
    out_dir.mkdir(parents=True, exist_ok=True)
    handles = {s: open(out_dir / f"{s}.bin", "wb") for s in splits}
    total_bytes = sum(len(t.encode("utf-8")) for _, t in docs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising corpus", leave=False,
                   disable=None)  # None: no bar when stderr is not a terminal (log files)
    try:
        for (path, text), split in zip(docs, assigned):
            ids = list(tokenizer.encode(text))
            if eos is not None:
                ids.append(eos)
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab):
                raise ValueError(f"tokenizer produced ids outside [0, {vocab}) for {path}")
            handles[split].write(arr.astype(dtype).tobytes())
            nbytes = len(text.encode("utf-8"))
            splits[split]["tokens"] += int(arr.size)
            splits[split]["bytes"] += nbytes
            splits[split]["docs"] += 1
            if bar is not None:
                bar.update(nbytes)
    finally:
        for fh in handles.values():
            fh.close()
        if bar is not None:
            bar.close()
    meta = {"version": CACHE_VERSION, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "eos_id": eos,
            "splits": splits}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens from a memory-mapped token file."""

    def __init__(self, path: str | Path, dtype: str, seq_len: int, return_index: bool = False) -> None:
        self.path, self.dtype, self.seq_len, self.return_index = str(path), dtype, seq_len, return_index
        n = os.path.getsize(self.path) // np.dtype(dtype).itemsize
        self.n_tokens = n
        self._arr: np.memmap | None = None  # opened lazily so worker processes each map the file themselves

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def tokens(self) -> np.ndarray:
        """The whole split as a read-only memory map."""
        if self._arr is None:
            self._arr = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._arr

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.seq_len
        x = torch.from_numpy(self.tokens()[start : start + self.seq_len + 1].astype(np.int64))
        return (i, x) if self.return_index else x

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arr": None}


def remove_dead_tmp_dirs(cache_root: Path) -> None:
    """Remove ``<key>.tmp<pid>`` folders left by tokenising processes that were killed (their pid is gone)."""
    if not cache_root.is_dir():
        return
    for d in cache_root.glob("*.tmp*"):
        pid = d.name.rsplit(".tmp", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (or another user's): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


class TextDataModule(L.LightningDataModule):
    """Text corpus -> cached memory-mapped tokens -> fixed-length next-token windows (train/val split by document)."""

    def __init__(self, paths: str | list[str] | None = None, tokenizer: str = "byte", seq_len: int = 256,
                 batch_size: int = 16, val_fraction: float = 0.05, max_bytes: int | None = None,
                 pattern: str = "**/*.py", cache_dir: str | None = None, num_workers: int = 0, seed: int = 0,
                 return_index: bool = False, progress: bool = True) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
        self.paths, self.tokenizer_spec, self.seq_len = paths, tokenizer, seq_len
        self.batch_size, self.val_fraction, self.max_bytes = batch_size, val_fraction, max_bytes
        self.pattern, self.num_workers, self.seed = pattern, num_workers, seed
        self.return_index, self.progress = return_index, progress
        if cache_dir:
            check_folder_path(Path(cache_dir).expanduser(), f"cache_dir={cache_dir!r}")
        self.cache_root = Path(cache_dir).expanduser() / "text" if cache_dir else zoo_cache_dir("text")
        self.tokenizer: Any = None
        self._found: list[Path] | None = None  # the corpus's files, once resolved
        self.meta: dict[str, Any] | None = None
        self.data_dir: Path | None = None
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    # -- corpus + cache ---------------------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if self._found is not None:  # resolving the stdlib corpus walks ~1,800 files (~1 s): once per module
            return self._found
        files = find_documents(self.paths, self.pattern)
        if not files:
            where = self.paths if self.paths is not None else str(stdlib_dir())
            raise ValueError(f"text corpus is empty: no files matching {self.pattern!r} under {where!r}; "
                             "pass `paths` naming text files, folders or glob patterns")
        self._found = files
        return files

    def prepare_data(self) -> None:
        """Tokenise the corpus into the cache unless it is already there (runs once, on rank 0)."""
        self._prepare()

    def _prepare(self) -> Path:
        files = self._files()
        options = {"max_bytes": self.max_bytes, "val_fraction": self.val_fraction, "seed": self.seed,
                   "pattern": self.pattern}
        out = self.cache_root / _cache_key(files, self.tokenizer_spec, options)
        if (out / "meta.json").is_file():
            return out
        docs = read_documents(files, self.max_bytes, self.seed)
        if not docs:
            raise ValueError(f"text corpus is empty: {len(files)} file(s) found but none holds any text")
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_spec)
        remove_dead_tmp_dirs(self.cache_root)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_token_files(docs, self.tokenizer, tmp, self.val_fraction, self.seed, self.progress)
        try:
            tmp.rename(out)  # atomic: a crashed run never leaves a half-written cache behind
        except OSError:
            if not (out / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first
        return out

    def check_data(self) -> None:
        """Resolve the corpus, load the tokenizer and tokenise into the cache now (``ZooTrainer.fit`` calls this
        before creating any output folder): a missing path, an empty corpus, an unknown tokenizer or a split shorter
        than one window is one ``UsageError`` line naming its key."""
        try:
            self._files()
        except (OSError, ValueError) as err:
            raise UsageError(f"data.paths={self.paths!r} cannot be read: {err}") from None
        try:
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.tokenizer_spec)
        except (OSError, ValueError) as err:
            raise UsageError(f"data.tokenizer={self.tokenizer_spec!r} cannot be loaded: {err}") from None
        try:
            self.setup()
        except ValueError as err:
            raise UsageError(f"data: {err}") from None

    def setup(self, stage: str | None = None) -> None:
        """Open the cached token files (tokenising first if needed) and build the window datasets."""
        if self.train_set is not None:
            return
        self.data_dir = self._prepare()
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_spec)
        self.meta = json.loads((self.data_dir / "meta.json").read_text())
        dtype = self.meta["dtype"]
        self.train_set = TokenWindows(self.data_dir / "train.bin", dtype, self.seq_len, self.return_index)
        self.val_set = TokenWindows(self.data_dir / "val.bin", dtype, self.seq_len, self.return_index)
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            if name == "val" and self.val_fraction == 0:
                continue
            if len(ds) == 0:
                raise ValueError(f"the {name} split has {ds.n_tokens} tokens, fewer than seq_len + 1 = "
                                 f"{self.seq_len + 1}; lower seq_len or give a larger corpus (max_bytes, paths)")

    # -- facts the LM module reads --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_spec)
        return _tokenizer_vocab(self.tokenizer)

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of text per token in ``split`` (turns nats/token into bits per byte)."""
        if self.meta is None:
            raise RuntimeError("call setup() before bytes_per_token()")
        s = self.meta["splits"][split]
        return s["bytes"] / max(1, s["tokens"])

    # -- loaders ---------------------------------------------------------------------------------------------
    def _loader(self, ds: TokenWindows | None, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        ds.return_index = self.return_index  # may be switched on after setup (lm.Distill does, for top-k targets)
        # Drop a ragged last batch only when there is more than one: a tiny corpus must still train.
        drop = shuffle and len(ds) > self.batch_size
        # The shared resumable loader: (seed, epoch) order, this rank's shard, mid-epoch position in the checkpoint.
        from zoo.data.loaders import resumable_loader

        return resumable_loader(self, ds, self.batch_size, train=shuffle, seed=self.seed, drop_last=drop,
                                num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches of training windows."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation windows in order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out split (the same documents as validation)."""
        return self._loader(self.val_set, shuffle=False)
