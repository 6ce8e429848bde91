"""The project's one safe loader for weight files: torch pickles with ``weights_only=True`` and safetensors.

Every module that reads a checkpoint goes through here, so "never unpickle untrusted code" holds in one place.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from zoo.errors import UsageError
from zoo.weights.file_errors import (FolderNotFileError, MissingFileError, UnreadableFileError, UnsafeFileError,
                                     forbidden_global_error)

__all__ = [
    "UnreadableFileError",
    "UnsafeFileError",
    "safe_torch_load",
    "safe_torch_load_bytes",
    "explain_load_error",
    "check_weights",
    "read_safetensors",
    "write_safetensors",
    "load_state_dict_file",
    "sniff_format",
]

# Safetensors metadata is str -> str; the project stores its own JSON blob under this one key.
ZOO_METADATA_KEY = "zoo"


def _as_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"weight file {str(p)!r} does not exist; check the path (looked at {p.resolve()}).")
    if p.is_dir():
        raise FolderNotFileError(f"{str(p)!r} is a folder; pass the weight file inside it (.ckpt, .pth, .safetensors).")
    return p


def sniff_format(path: str | os.PathLike) -> str:
    """Guess a weight file's container from its first bytes: 'zip' (torch), 'pickle', 'safetensors' or 'unknown'."""
    p = _as_path(path)
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        # safetensors: 8-byte little-endian header length, then a JSON object.
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def safe_torch_load(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", extra_globals: Iterable[Any] = (),
    mmap: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)`` with a clear error when the file wants to run code.

    ``extra_globals`` are classes/functions the caller vouches for (e.g. a known hyper-parameter container);
    ``mmap=True`` maps a zip-format file's tensors instead of reading them (a cheap full check of the file).
    """
    p = _as_path(path)
    if p.stat().st_size == 0:
        raise UnreadableFileError(f"{str(p)!r} is empty (0 bytes); the download or save was interrupted: fetch or "
                                  "save it again.")
    return _weights_only_load(p, repr(str(p)), map_location, extra_globals, mmap and sniff_format(p) == "zip")


def safe_torch_load_bytes(data: io.BytesIO, label: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of an in-memory item with ``weights_only=True``; errors name ``label`` (e.g. file and key)."""
    return _weights_only_load(data, label, map_location, ())


def _weights_only_load(source: Path | io.BytesIO, label: str, map_location: str | torch.device,
                       extra_globals: Iterable[Any], mmap: bool = False) -> Any:
    from zoo.weights.torch_prescan import prescan_torch_file  # lazily: the prescan is only needed for torch files

    extra_globals = list(extra_globals)
    prescan_torch_file(source, label, extra_globals)  # memory, hashing and graph size bounded before torch reads it
    if isinstance(source, io.BytesIO):
        source.seek(0)
    try:
        with torch.serialization.safe_globals(extra_globals):
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - torch and its readers raise many types for bad bytes: one line each
        raise explain_load_error(err, label) from None


def explain_load_error(err: BaseException, label: str) -> UnreadableFileError:
    """The one-line refusal for an error of ``torch.load(weights_only=True)`` on ``label``: the forbidden global it
    named (``UnsafeFileError``), too much memory, or unreadable bytes."""
    text = str(err)
    if isinstance(err, MemoryError):
        return UnsafeFileError(f"{label}: refused: the file asks for more memory than this machine has (too large "
                               "or hostile); it was not loaded.")
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"[Uu]nsupported global[s]?:? [`']?([\w.]+)", text)
        if found is None:  # not a forbidden import: torch's unpickler stopped on bytes it cannot parse
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
            first = (detail.group(1) if detail else text).strip().splitlines()[0]
            return UnreadableFileError(f"could not read {label} as a torch file ({first}); is it truncated, corrupt "
                                       "or in another format?")
        return forbidden_global_error(label, found.group(1))
    first = text.splitlines()[0] if text else ""
    return UnreadableFileError(f"could not read {label} as a torch file ({type(err).__name__}: {first}); "
                               "is it truncated or in another format?")


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a ``.safetensors`` file; the project's JSON blob is decoded under key 'zoo'."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    p = _as_path(path)
    try:
        with safe_open(str(p), framework="pt", device=device) as f:
            meta: dict[str, Any] = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"could not read {str(p)!r} as safetensors ({err}); is the file truncated?") from None
    if ZOO_METADATA_KEY in meta:
        try:
            meta[ZOO_METADATA_KEY] = json.loads(meta[ZOO_METADATA_KEY])
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(p)!r}: the 'zoo' metadata entry is not valid JSON ({err}).") from None
    return tensors, meta


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], zoo_meta: dict | None = None) -> Path:
    """Write tensors (made contiguous, shared storage split) with the project's JSON metadata under 'zoo', atomically
    (a reader, or a crash mid-write, never leaves half a file) and with the umask's permissions."""
    from safetensors.torch import save_file

    from zoo.files import atomic_path

    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses aliased storage (e.g. tied weights); cloning gives each tensor its own buffer.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {ZOO_METADATA_KEY: json.dumps(zoo_meta, sort_keys=True)} if zoo_meta is not None else None
    with atomic_path(p) as tmp:
        save_file(flat, str(tmp), metadata=meta)
    return p


def check_weights(tensors: dict[str, torch.Tensor], source: str,
                  expected: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse, in one line naming ``source`` and the tensor, a floating tensor holding NaN/Inf, or an integer/bool
    tensor where ``expected`` (the model's state dict) holds a floating one (loading would cast it silently)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UnreadableFileError(f"{source}: entry {name!r} is a {type(t).__name__}, not a tensor")
        want = None if expected is None else expected.get(name)
        if want is not None and want.is_floating_point() and not t.is_floating_point():
            raise UnreadableFileError(f"{source}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')} but the "
                                      f"model holds {str(want.dtype).removeprefix('torch.')} weights there; the file "
                                      "is corrupt or not this model's: re-export it with floating-point weights")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UnreadableFileError(f"{source}: tensor {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}; the "
                                      "file is corrupt (e.g. saved after training diverged): use an earlier, healthy "
                                      "checkpoint")


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a plain state-dict file (.pth/.pt/.bin/.safetensors) safely; returns (tensors, metadata).

    Torch files that wrap the state dict (``{'state_dict': ...}``, ``{'model': ...}``) are unwrapped.
    """
    p = _as_path(path)
    fmt = sniff_format(p)
    if p.suffix == ".safetensors" or fmt == "safetensors":
        return read_safetensors(p)
    obj = safe_torch_load(p)
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state", "module", "net"):
            if isinstance(obj.get(key), dict):
                meta = {k: v for k, v in obj.items() if k != key and not isinstance(v, (dict, torch.Tensor))}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{str(p)!r} does not hold a state dict of tensors (got {type(obj).__name__}); save it with "
            "torch.save(model.state_dict(), path) or as .safetensors."
        )
    return dict(obj), meta
