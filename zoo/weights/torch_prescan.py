"""A dry run of a torch file's pickle before ``torch.load(weights_only=True)`` reads it: memory and time bounded.

torch's weights-only unpickler never runs code, but it still lets a small file ask for a lot: ``_codecs.encode`` or
``bytearray`` of a memoised string called thousands of times (150 KB -> 150 MB), ``bytearray(2**30)``, a
deflate-compressed storage record (1 MB -> 1 GB), a legacy-format storage whose declared size the file cannot hold
(allocated before it is read), a dict key that is a tuple DAG (hashing it takes 2**64 steps) or a self-referencing or
exponentially shared container graph that any later walk never finishes. ``prescan_torch_file`` replays the pickle
with the project's ``GuardedUnpickler`` (charges every copy against the file's size, checks keys), with torch's
allow-listed globals as inert stand-ins (nothing is called), and checks every storage against the bytes that hold it.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import torch

from zoo.weights.file_errors import UnreadableFileError, UnsafeFileError, forbidden_global_error
from zoo.weights.safe_pickle import (MAX_DEPTH, BoundedReader, GuardedUnpickler, TooLargeError, describe_failure,
                                     one_line)

__all__ = ["prescan_torch_file", "MAX_EXPANDED"]

# A walk of the loaded object visits a shared container once per reference; a checkpoint's graph is a tree (only
# tensors are shared, e.g. tied weights), so its expanded size is its node count. Anything past this is a DAG bomb.
MAX_EXPANDED = 10_000_000
_LEGACY_PICKLES = 5  # magic number, protocol, sys info, the object, the storage keys (torch.serialization._legacy_load)


class _TorchGlobal:
    """An allow-listed torch global, named but never called: calling or instantiating it gives a ``_TorchObj``."""

    def __init__(self, name: str, obj: Any) -> None:
        self.name, self.obj = name, obj

    def element_size(self) -> int:
        """Bytes per element of a storage type (1 for untyped storage, 8 when unknown, an upper bound)."""
        if self.obj is torch.UntypedStorage:
            return 1
        dtype = getattr(self.obj, "dtype", None)
        return torch._utils._element_size(dtype) if isinstance(dtype, torch.dtype) else 8


class _Forbidden(UnsafeFileError):
    """A global outside the allow-list (refused before it is imported); reworded with the file's label."""


class _TorchObj:
    """What an allow-listed torch call would have built (a tensor, a size, a device), as an inert token."""


class _Prescan(GuardedUnpickler):
    def __init__(self, file: Any, size: int, extra: dict[str, Any]) -> None:
        super().__init__(file, size, encoding="ASCII")
        self.extra = extra
        self.storages: dict[str, int] = {}  # key -> bytes declared
        self.attributes: list[dict] = []  # states BUILD sets on OrderedDicts (part of the loaded graph)

    def build_allowed_map(self) -> dict[tuple[str, str], Any]:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed: dict[tuple[str, str], Any] = {}
        for full, obj in {**_get_allowed_globals(), **self.extra}.items():
            module, _, name = full.rpartition(".")
            allowed[(module, name)] = _TorchGlobal(full, obj)
        builtins = self.builtin_constructors()
        allowed.update({k: v for k, v in builtins.items() if k[1] in ("bytearray", "set", "complex")})
        allowed[("collections", "OrderedDict")] = builtins[("collections", "OrderedDict")]
        allowed[("collections", "Counter")] = builtins[("builtins", "dict")]
        allowed[("_codecs", "encode")] = super().build_allowed_map()[("_codecs", "encode")]
        return allowed

    def find_class(self, module: str, name: str) -> Any:
        from torch._weights_only_unpickler import IMPORT_MAPPING, NAME_MAPPING

        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        try:
            return super().find_class(module, name)
        except UnsafeFileError:
            raise _Forbidden(f"{one_line(module, 120)}.{one_line(name, 120)}") from None

    def call(self, func: Any, args: tuple, kwargs: dict | None = None) -> Any:
        return _TorchObj() if isinstance(func, _TorchGlobal) else super().call(func, args, kwargs)

    def new_object(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        return _TorchObj() if isinstance(cls, _TorchGlobal) else super().new_object(cls, args, kwargs)

    def build(self, inst: Any, state: Any) -> None:
        # torch sets an OrderedDict's attributes (a state dict's ``_metadata``) from a BUILD: kept for the walk.
        if type(inst) is OrderedDict and isinstance(state, dict):
            self.attributes.append(state)
        elif not isinstance(inst, _TorchObj):
            super().build(inst, state)

    def key_allowed(self, key: Any) -> bool:
        return isinstance(key, (_TorchObj, _TorchGlobal))

    def persistent_load(self, pid: Any) -> Any:
        # zip format: (storage, type, key, location, numel); legacy format adds a view record (None since torch 1.0)
        ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], _TorchGlobal)
              and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0 and pid[5:] in ((), (None,)))
        if not ok:
            raise UnsafeFileError("refused a persistent id that is not a (storage, type, key, location, size) record")
        self.storages[pid[2]] = pid[4] * pid[1].element_size()
        return _TorchObj()


def _expanded_size(obj: Any) -> int:
    """Nodes a recursive walk of ``obj`` visits (shared containers once per reference); refuses cycles and depth."""
    memo: dict[int, int] = {}
    active: set[int] = set()

    def count(x: Any, depth: int) -> int:
        if not isinstance(x, (list, tuple, dict, set, frozenset)):
            return 1
        if id(x) in memo:
            return memo[id(x)]
        if id(x) in active:
            raise UnsafeFileError(f"refused: a {type(x).__name__} contains itself (a self-referencing container, "
                                  "not a checkpoint)")
        if depth > MAX_DEPTH:
            raise UnsafeFileError(f"refused: containers nested more than {MAX_DEPTH} deep")
        active.add(id(x))
        items: Iterable[Any] = (v for kv in x.items() for v in kv) if isinstance(x, dict) else x
        total = 1
        for v in items:
            total = min(total + count(v, depth + 1), MAX_EXPANDED + 1)
        active.discard(id(x))
        memo[id(x)] = total
        return total

    return count(obj, 0)


def _scan(f: Any, size: int, extra: dict[str, Any], pickles: int) -> tuple[dict[str, int], int]:
    """Replay ``pickles`` consecutive pickles of the open file ``f`` (``size`` bytes, read as a stream, never
    whole); returns (storage key -> bytes declared, bytes the pickles took)."""
    reader = BoundedReader(f, size)
    storages: dict[str, int] = {}
    for k in range(pickles):
        up = _Prescan(reader, size, extra)
        obj = up.load()
        storages.update(up.storages)
        if k == 0 and pickles > 1 and obj != torch.serialization.MAGIC_NUMBER:
            raise UnreadableFileError("it is a pickle but not a torch file (no torch magic number)")
        if _expanded_size([obj, up.attributes]) > MAX_EXPANDED:
            raise TooLargeError(f"refused: a walk of the loaded object would visit more than {MAX_EXPANDED:,} "
                                "entries (containers shared exponentially: a bomb, not a checkpoint)")
    return storages, reader.pos


def _scan_zip(source: Path | io.BytesIO, extra: dict[str, Any]) -> None:
    with zipfile.ZipFile(source) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for info in infos.values():
            if info.compress_type != zipfile.ZIP_STORED:
                raise UnsafeFileError(f"refused: record {info.filename!r} is compressed, which torch.save never "
                                      "writes (a compressed record can expand a thousandfold)")
        pkl = next((n for n in infos if n.endswith("data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise UnreadableFileError("it is a zip archive without the data.pkl record of a torch file")
        prefix = pkl[: -len("data.pkl")]
        with zf.open(pkl) as f:
            storages, _ = _scan(f, infos[pkl].file_size, extra, 1)
    for key, nbytes in storages.items():
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise UnreadableFileError(f"storage record {prefix}data/{key} is missing (truncated file?)")
        if nbytes > info.file_size:
            raise TooLargeError(f"refused: storage {key!r} declares {nbytes:,} bytes but its record holds "
                                f"{info.file_size:,} (corrupt or hostile)")


def _scan_legacy(source: Path | io.BytesIO, extra: dict[str, Any]) -> None:
    if isinstance(source, io.BytesIO):
        size = len(source.getbuffer())
        storages, used = _scan(io.BytesIO(source.getvalue()), size, extra, _LEGACY_PICKLES)
    else:
        size = source.stat().st_size
        with open(source, "rb") as f:
            storages, used = _scan(f, size, extra, _LEGACY_PICKLES)
    declared = sum(storages.values())
    if declared > size - used:
        raise TooLargeError(f"refused: its storages declare {declared:,} bytes but only {size - used:,} follow "
                            "the pickle (corrupt or hostile)")


def prescan_torch_file(source: Path | io.BytesIO, label: str, extra_globals: Iterable[Any] = ()) -> None:
    """Refuse, in one line naming ``label``, a torch file (a path or in-memory bytes) whose loading would allocate
    more than its size implies, hash a DAG, or build a self-referencing or exponentially shared graph. Files that
    are neither a zip nor a pickle are left to ``torch.load`` (which refuses them)."""
    extra = {f"{g.__module__}.{g.__qualname__}": g for g in extra_globals}
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:4]
    else:
        with open(source, "rb") as f:
            head = f.read(4)
    try:
        if head == b"PK\x03\x04":
            _scan_zip(source, extra)
        elif head[:1] == b"\x80":
            _scan_legacy(source, extra)
    except _Forbidden as err:
        raise forbidden_global_error(label, str(err)) from None
    except UnsafeFileError as err:
        raise type(err)(f"{label}: {err}") from None
    except UnreadableFileError as err:
        raise UnreadableFileError(f"could not read {label} as a torch file: {err}") from None
    except (MemoryError, RecursionError) as err:  # a bound the scan's own checks did not catch first
        raise TooLargeError(f"{label}: refused: reading it needs more memory or nesting than a checkpoint "
                            f"({type(err).__name__})") from None
    except Exception as err:  # noqa: BLE001 - any malformed pickle or zip: one line naming the file
        raise UnreadableFileError(f"could not read {label} as a torch file ({describe_failure(err)}); is it "
                                  "truncated, corrupt or in another format?") from None
