"""Hostile torch distributed checkpoint (DCP) folders, for every test of a sharded-checkpoint reader.

``lm_checkpoint_folder`` writes what a 1-process ``--trainer.strategy fsdp2`` run of ``gemma2-tiny`` writes (a DCP
folder of ``state_dict`` + ``optimizer_0`` with Lightning's ``meta.pt`` carrying the LM contract) without training;
each ``HOSTILE`` builder then turns such a folder into one crafted variant. ``marker`` is a file that only exists if
pickled code ran: every test asserts it was not created.
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from lm_testutil import TINY

MODEL = "gemma2-tiny"


class RunsCode:
    """Unpickling this calls ``fn(*args)``: e.g. ``os.system("touch marker")`` or ``open(marker, "w")``."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: Path) -> dict[str, RunsCode]:
    """Pickled objects that each create ``marker`` when unpickled by an unrestricted unpickler."""
    return {"os.system": RunsCode(os.system, f"touch {marker}"),
            "builtins.open": RunsCode(builtins.open, str(marker), "w"),
            "builtins.exec": RunsCode(builtins.exec, f"open({str(marker)!r}, 'w')")}


def lm_checkpoint_folder(folder: Path, group: dict[str, Any] | None = None) -> Path:
    """A valid sharded LM checkpoint folder (``last.ckpt/``: ``.metadata``, ``__0_0.distcp``, ``meta.pt``);
    ``group`` entries replace values of the optimizer's parameter group (saved as byte items). Returns the folder."""
    import torch.distributed.checkpoint as dcp

    import zoo

    torch.manual_seed(0)
    model = zoo.create(MODEL, **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 200, (1, 8))).float().mean().backward()
    opt.step()
    # Lightning's layout: the module's keys are "model.<name>", the optimizer state sits at "optimizer_0"
    opt_state = opt.state_dict()
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    opt_state = {"state": {names[i]: s for i, s in opt_state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]], **(group or {})}
                                  for g in opt_state["param_groups"]]}
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "optimizer_0": opt_state}
    if folder.exists():
        shutil.rmtree(folder)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    contract = {"format": 1, "kind": "lm", "model": MODEL, "overrides": dict(TINY), "prefix": "model.",
                "tokenizer": "byte"}
    torch.save({"zoo": contract, "global_step": 1, "epoch": 0, "pytorch-lightning_version": "2.6.0",
                "hyper_parameters": {"model": MODEL, "model_overrides": dict(TINY)}}, folder / "meta.pt")
    return folder


def _metadata(folder: Path) -> Any:
    from zoo.weights.safe_dcp import check_dcp_folder

    return check_dcp_folder(folder)


def _write_metadata(folder: Path, md: Any) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(md))


# ------------------------------------------------------------------------------------------------- the variants
def metadata_payload(folder: Path, marker: Path, which: str = "os.system") -> str:
    """``.metadata`` replaced by a pickle that runs code; returns the global the refusal must name."""
    (folder / ".metadata").write_bytes(pickle.dumps(payloads(marker)[which]))
    return which.replace("os.system", "posix.system") if os.name == "posix" else which


def metadata_payload_nested(folder: Path, marker: Path) -> str:
    """The real metadata with a payload hidden inside it (in ``storage_meta.modules``): the reader must refuse in the
    middle of an otherwise valid pickle."""
    md = _metadata(folder)
    md.storage_meta.modules = [payloads(marker)["builtins.open"]]
    _write_metadata(folder, md)
    return "io.open"  # pickle names builtins.open by its home module


def byte_item_payload(folder: Path, marker: Path) -> str:
    """A byte item (a non-tensor value: here the optimizer's learning rate, which every reader loads) whose pickle
    runs code."""
    lm_checkpoint_folder(folder, group={"lr": payloads(marker)["os.system"]})
    return "posix.system" if os.name == "posix" else "nt.system"


def tensor_item_payload(folder: Path, marker: Path) -> str:
    """A tensor item whose stored bytes are a pickle that runs code (same length, so the metadata still fits)."""
    md = _metadata(folder)
    index, info = next((i, s) for i, s in md.storage_data.items() if i.fqn == "state_dict.model.embed.weight")
    buf = io.BytesIO()
    torch.save(payloads(marker)["builtins.open"], buf)
    evil = buf.getvalue()
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    assert len(evil) <= info.length, (len(evil), info.length)
    data[info.offset:info.offset + info.length] = evil + b"\0" * (info.length - len(evil))
    shard.write_bytes(bytes(data))
    return "io.open"


def truncated_shard(folder: Path, marker: Path) -> str:
    """A shard cut in half (a copy or save that stopped early)."""
    shard = next(folder.glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    return shard.name


def missing_shard(folder: Path, marker: Path) -> str:
    """A shard the metadata names is gone."""
    shard = next(folder.glob("*.distcp"))
    shard.unlink()
    return shard.name


def path_outside(folder: Path, marker: Path) -> str:
    """An item whose shard path climbs out of the folder (``../``)."""
    md = _metadata(folder)
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    _write_metadata(folder, md)
    return "outside the checkpoint folder"


def huge_tensor(folder: Path, marker: Path) -> str:
    """The metadata claims a 10^12-element tensor: rebuilding it would allocate 4 TB from a tiny folder."""
    md = _metadata(folder)
    entry = md.state_dict_metadata["state_dict.model.embed.weight"]
    entry.size = torch.Size([10**6, 10**6])
    _write_metadata(folder, md)
    return "state_dict.model.embed.weight"


def meta_pt_payload(folder: Path, marker: Path) -> str:
    """Lightning's ``meta.pt`` (the loop state) holds a payload."""
    torch.save({"global_step": 1, "x": payloads(marker)["builtins.open"]}, folder / "meta.pt")
    return "io.open"  # pickle names builtins.open by its home module


def metadata_bomb(folder: Path, marker: Path, kind: str) -> str:
    """``.metadata`` that asks for memory (a length that lies, before the record) or time (a dict key that is a tuple
    DAG: hashing it visits 2**64 nodes) far beyond its few bytes; or a byte item amplifying a memoised string."""
    import struct

    if kind == "length":
        (folder / ".metadata").write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1_300_000_000) + b"x" * 64)
        return "1,300,000,000 bytes"
    if kind == "dag-key":
        put, get = (lambda k: b"r" + struct.pack("<I", k)), (lambda k: b"j" + struct.pack("<I", k))
        (folder / ".metadata").write_bytes(b"\x80\x02}(K\x00\x85" + put(0) + b"".join(
            get(k) + get(k) + b"\x86" + put(k + 1) for k in range(64)) + b"tNs.")
        return "deep or huge tuple"
    import _codecs  # a byte item (the lr) whose pickle calls _codecs.encode on one memoised string 400 times

    text = "a" * 50_000
    lm_checkpoint_folder(folder, group={"lr": [RunsCode(_codecs.encode, text, "latin1") for _ in range(400)]})
    return "_codecs.encode"


# name -> builder(folder, marker) -> text the one-line refusal must contain
HOSTILE: dict[str, Callable[[Path, Path], str]] = {
    "metadata-os.system": metadata_payload,
    "metadata-builtins.exec": lambda f, m: metadata_payload(f, m, "builtins.exec"),
    "metadata-nested": metadata_payload_nested,
    "byte-item": byte_item_payload,
    "tensor-item": tensor_item_payload,
    "meta.pt": meta_pt_payload,
    "truncated-shard": truncated_shard,
    "missing-shard": missing_shard,
    "path-outside": path_outside,
    "huge-tensor": huge_tensor,
    "metadata-length-lie": lambda f, m: metadata_bomb(f, m, "length"),
    "metadata-dag-key": lambda f, m: metadata_bomb(f, m, "dag-key"),
    "byte-item-amplify": lambda f, m: metadata_bomb(f, m, "encode"),
}
CODE_EXECUTION = ("metadata-os.system", "metadata-builtins.exec", "metadata-nested", "byte-item", "tensor-item",
                  "meta.pt")


def hostile_folder(tmp: Path, name: str) -> tuple[Path, Path, str]:
    """(a checkpoint folder crafted as ``HOSTILE[name]``, the marker file, the text its refusal must name)."""
    marker = tmp / "pwned"
    folder = lm_checkpoint_folder(tmp / "last.ckpt")
    expect = HOSTILE[name](folder, marker)
    assert not marker.exists()
    return folder, marker, expect
