"""The one reader of torch distributed checkpoint (DCP) folders: a sharded run's ``last.ckpt/``.

torch's own reader unpickles the folder's ``.metadata`` with the default unpickler and its byte items (optimizer
hyper-parameters, Python values) with torch's full unpickler (weights_only off), so a crafted folder runs any code it
names. Here the metadata goes through an unpickler that builds only the classes DCP itself writes (``ALLOWED``),
byte items and tensors through ``weights_only=True``, and the folder is checked against the metadata before a byte of
a shard is read: every shard named exists inside the folder and is long enough for its items, no item claims more
memory than its bytes can hold. Every refusal is one line naming the file (and the global or item); nothing runs.

Used by ``zoo consolidate`` / ``zoo.load_lm`` (``read_dcp_folder``), and by a sharded resume
(``load_dcp_into`` from ``lm.parallel.sharding.FSDP2Strategy``).
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata, _MEM_FORMAT_ENCODING)

from zoo.weights.safe_load import (UnreadableFileError, UnsafeFileError, explain_load_error, safe_torch_load,
                                   safe_torch_load_bytes)

__all__ = ["ALLOWED", "META_FILE", "METADATA_FILE", "SafeFileSystemReader", "check_dcp_folder", "is_sharded_checkpoint",
           "load_dcp_into", "read_dcp_folder", "read_sharded_checkpoint"]

METADATA_FILE = ".metadata"  # DCP's index of the folder: what is stored where
META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint (loop state, contract)

# Exactly the globals torch.distributed.checkpoint writes into .metadata (found by recording every find_class of the
# .metadata of a real FSDP2 run and of dcp.save of a model + AdamW state): its dataclasses, torch.Size, dtypes,
# the layout helper torch.serialization uses, and the checkpoint id as a path. Calling any of them only builds data.
ALLOWED: dict[tuple[str, str], Any] = {
    **{(c.__module__, c.__qualname__): c for c in (
        Metadata, MetadataIndex, StorageMeta, TensorProperties, TensorStorageMetadata, BytesStorageMetadata,
        ChunkStorageMetadata, _MEM_FORMAT_ENCODING, _StorageInfo)},
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,  # only its text is used: never a concrete path object
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    **{("torch", name): getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only ``ALLOWED``; any other global is refused by name before it is imported."""

    def __init__(self, file: Any, label: str) -> None:
        super().__init__(file)
        self.label = label

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((module, name))
        if found is None:
            raise UnsafeFileError(f"{self.label} references {module}.{name}, which a distributed checkpoint never "
                                  "holds; refused without running it (only torch.distributed.checkpoint's own "
                                  "metadata classes are allowed). Is this folder from a `zoo fit` sharded run?")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"{self.label} uses persistent ids, which DCP metadata never does; refused")


def _read_metadata(folder: Path) -> Metadata:
    path = folder / METADATA_FILE
    label = repr(str(path))
    if not path.is_file():
        raise UnreadableFileError(f"{str(folder)!r} has no {METADATA_FILE} file: not a complete distributed "
                                  "checkpoint (was the save interrupted?); pass the last.ckpt folder of a finished "
                                  "save")
    data = path.read_bytes()
    try:
        md = _MetadataUnpickler(io.BytesIO(data), label).load()
    except UnsafeFileError:
        raise
    except MemoryError:
        raise UnsafeFileError(f"{label}: refused: it asks for more memory than this machine has") from None
    except Exception as err:  # noqa: BLE001 - any malformed pickle: one line naming the file, not a deep trace
        raise UnreadableFileError(f"could not read {label} ({type(err).__name__}: {str(err)[:200]}); is the "
                                  "checkpoint folder truncated or corrupt?") from None
    if not isinstance(md, Metadata):
        raise UnreadableFileError(f"{label} holds a {type(md).__name__}, not distributed-checkpoint Metadata")
    return md


def _size(value: Any, label: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(n, int) and n >= 0 for n in value):
        raise UnreadableFileError(f"{label}: {what} is not a list of non-negative integers ({value!r:.80})")
    return tuple(value)


def check_dcp_folder(folder: str | os.PathLike) -> Metadata:
    """The folder's metadata, read safely and checked against the shards on disk; one-line error otherwise."""
    folder = Path(folder)
    md = _read_metadata(folder)
    label = repr(str(folder / METADATA_FILE))
    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        raise UnreadableFileError(f"{label}: malformed (state_dict_metadata / storage_data are not mappings)")
    stored: dict[str, int] = {}  # fqn -> bytes stored for it (all its chunks)
    sizes: dict[str, int] = {}
    root = folder.resolve()
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise UnreadableFileError(f"{label}: malformed storage entry {index!r:.80}")
        rel = info.relative_path
        if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise UnsafeFileError(f"{label}: item {index.fqn!r} points at {rel!r}, outside the checkpoint folder; "
                                  "refused")
        if info.transform_descriptors:
            raise UnreadableFileError(f"{label}: item {index.fqn!r} is stored with transforms "
                                      f"{list(info.transform_descriptors)}, which `zoo fit` never writes; refused")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            raise UnreadableFileError(f"{label}: item {index.fqn!r} has a bad offset/length")
        shard = folder / rel
        if shard.resolve().parent != root and root not in shard.resolve().parents:
            raise UnsafeFileError(f"{label}: item {index.fqn!r} points at {rel!r}, outside the checkpoint folder")
        if shard.name not in sizes:
            if not shard.is_file():
                raise UnreadableFileError(f"shard {str(shard)!r} is missing from the checkpoint folder (the metadata "
                                          "lists it); copy the whole folder, or resume from an earlier checkpoint")
            sizes[shard.name] = shard.stat().st_size
        if info.offset + info.length > sizes[shard.name]:
            raise UnreadableFileError(f"shard {str(shard)!r} is truncated ({sizes[shard.name]} bytes; item "
                                      f"{index.fqn!r} needs bytes up to {info.offset + info.length}); copy it again "
                                      "or resume from an earlier checkpoint")
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    for fqn, entry in md.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(entry.properties, TensorProperties) \
                or not isinstance(entry.properties.dtype, torch.dtype):
            raise UnreadableFileError(f"{label}: malformed entry for {fqn!r}")
        numel = math.prod(_size(entry.size, label, f"the size of {fqn!r}"))
        nbytes = numel * entry.properties.dtype.itemsize
        # A tensor is rebuilt from its stored chunks: it cannot hold more than they do (a tiny folder claiming a
        # huge tensor would otherwise allocate it before any read fails).
        if nbytes > stored.get(fqn, 0):
            raise UnsafeFileError(f"{label}: {fqn!r} claims {nbytes} bytes but its shards store {stored.get(fqn, 0)}; "
                                  "refused (corrupt or hostile metadata)")
        for chunk in entry.chunks:
            if not isinstance(chunk, ChunkStorageMetadata):
                raise UnreadableFileError(f"{label}: malformed chunk of {fqn!r}")
            _size(chunk.offsets, label, f"a chunk offset of {fqn!r}")
            _size(chunk.sizes, label, f"a chunk size of {fqn!r}")
    _check_planner_data(md, label)
    return md


def _check_planner_data(md: Metadata, label: str) -> None:
    # Each entry is the path of a flattened key in the nested state dict; a loader builds lists up to its integer
    # indices, so an index beyond the number of entries (a list cannot be longer) would allocate at will.
    data, limit = md.planner_data, len(md.state_dict_metadata)
    if data is None:
        return
    if not isinstance(data, dict):
        raise UnreadableFileError(f"{label}: malformed planner data ({type(data).__name__})")
    for key, path in data.items():
        if not isinstance(key, str) or not isinstance(path, (tuple, list)) or not all(
                isinstance(p, str) or (isinstance(p, int) and 0 <= p <= limit) for p in path):
            raise UnsafeFileError(f"{label}: the state-dict path of {key!r} is malformed ({path!r:.80}); refused")


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` with the restricted metadata reader and the folder checks above; tensors are read
    by torch with ``weights_only=True``; a shard that fails to load is named."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.folder = Path(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checked metadata (``check_dcp_folder``), with the load id torch's reader sets."""
        md = check_dcp_folder(self.folder)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: Any, planner: Any) -> Any:
        """Read shard by shard, so a corrupt shard's error names it."""
        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        fut = None
        for rel, items in by_file.items():
            try:
                fut = super().read_data(dataclasses.replace(plan, items=items), planner)
            except UnreadableFileError:
                raise
            except Exception as err:  # noqa: BLE001 - torch's weights-only loader on bad bytes: name the shard
                raise explain_load_error(err, f"shard {str(self.folder / rel)!r}") from None
        return fut if fut is not None else super().read_data(plan, planner)


class _SafeBytesMixin:
    """A load planner whose byte items are read with ``weights_only=True`` (torch's own planners unpickle them in
    full)."""

    folder: Path

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = safe_torch_load_bytes(value, f"item {fqn!r} of {str(self.folder)!r}")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeLoadPlanner(_SafeBytesMixin, DefaultLoadPlanner):
    """``DefaultLoadPlanner`` (load into an existing state dict) with safe byte items."""

    def __init__(self, folder: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.folder = Path(folder)


def _empty_planner(folder: Path) -> Any:
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    class SafeEmptyPlanner(_SafeBytesMixin, _EmptyStateDictLoadPlanner):
        """Rebuild the whole state dict from the metadata (what ``dcp_to_torch_save`` does) with safe byte items."""

    planner = SafeEmptyPlanner()
    planner.folder = folder
    return planner


def _unwrap(err: BaseException) -> BaseException:
    """DCP wraps each rank's exception in a ``CheckpointException``; the first of ours inside it, else ``err``."""
    failures = err.failures if isinstance(err, CheckpointException) else None
    if isinstance(failures, dict):
        for wrapped in failures.values():
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            while inner is not None and not isinstance(inner, UnreadableFileError):
                inner = inner.__cause__ or inner.__context__
            if inner is not None:
                return inner
    return err


def read_dcp_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """The whole state dict a DCP folder holds (tensors on CPU, byte items as Python values), read safely in this
    process alone."""
    # torch's own dcp_to_torch_save calls this private loader too: the public load() fills a copy of an empty dict
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    check_dcp_folder(folder)  # our one-line refusals, raised here rather than logged and wrapped inside DCP
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=SafeFileSystemReader(folder), planner=_empty_planner(folder),
                         no_dist=True)
    except CheckpointException as err:  # a BaseException: DCP's wrapper of each rank's error
        inner = _unwrap(err)
        if inner is err:
            raise
        raise inner from None
    return state


def load_dcp_into(state: dict[str, Any], folder: str | os.PathLike) -> None:
    """``torch.distributed.checkpoint.load(state, folder)`` (collective under a process group) with the safe reader
    and planner: ``state``'s tensors are filled in place, its byte items replaced."""
    import torch.distributed.checkpoint as dcp

    check_dcp_folder(folder)  # our one-line refusals, raised here rather than logged and wrapped inside DCP
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner(folder))
    except CheckpointException as err:  # a BaseException: DCP's wrapper of each rank's error
        inner = _unwrap(err)
        if inner is err:
            raise
        raise inner from None


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by a sharded (FSDP2) run: DCP shards plus Lightning's meta.pt."""
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file() and (p / METADATA_FILE).is_file()


def read_sharded_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """A sharded run's checkpoint folder as the one-file Lightning checkpoint it stands for: ``meta.pt``'s entries
    (loop state, hyper-parameters, contract) plus the whole ``state_dict`` and ``optimizer_states``, read safely."""
    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise UnreadableFileError(f"{str(folder)!r} is not a sharded checkpoint folder (no {META_FILE} and "
                                  f"{METADATA_FILE} inside); pass the last.ckpt folder a `--trainer.strategy fsdp2` "
                                  "run wrote")
    checkpoint = safe_torch_load(folder / META_FILE, map_location="cpu")
    if not isinstance(checkpoint, dict):
        raise UnreadableFileError(f"{str(folder / META_FILE)!r} holds a {type(checkpoint).__name__}, not the dict "
                                  "Lightning writes")
    tensors = read_dcp_folder(folder)
    if not isinstance(tensors.get("state_dict"), dict):
        raise UnreadableFileError(f"{str(folder)!r} holds no 'state_dict' (keys: {sorted(tensors)[:5]}); it was not "
                                  "written by a Lightning sharded run")
    checkpoint["state_dict"] = tensors.pop("state_dict")
    # Lightning stores optimizers as optimizer_0, optimizer_1, ... in the folder and as a list in one file.
    n_opt = sum(1 for k in tensors if k.startswith("optimizer_"))
    checkpoint["optimizer_states"] = [tensors.pop(f"optimizer_{i}") for i in range(n_opt)
                                      if f"optimizer_{i}" in tensors]
    return checkpoint
