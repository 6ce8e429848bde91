"""Count the device -> host synchronisations a training step makes, on any device (CPU included).

A host sync is an op whose result the Python program must see before it can go on: ``.item()``, ``bool(t)``,
``int(t)``, ``if t:``, ops whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``) and copies to host memory (``.cpu()``, ``.tolist()``, ``.numpy()``). On a GPU each one
stalls the launch queue; under ``torch.compile`` each data-dependent one is a graph break. ``torch.cuda.
set_sync_debug_mode`` only sees them on CUDA; this counter sees them on CPU, so a CPU test can prove a step free of
them before any GPU is lent.

    with count_host_syncs() as syncs:
        step(batch)
    print(syncs.total, syncs.report())   # counts by op and by the source line that caused each

Ops are seen through a ``TorchDispatchMode`` (every aten op, forward and backward); host copies of CPU tensors are no
ops at all, so ``Tensor.cpu/tolist/numpy`` are wrapped for the duration of the block (an explicit ``.cpu()`` in a step
is a sync once the step runs on a GPU). Not thread-safe against other threads calling those methods meanwhile.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncs", "count_host_syncs", "SYNC_OPS"]

_aten = torch.ops.aten
# Ops that always make the host wait: a scalar read, or an output whose size depends on tensor values.
SYNC_OPS: dict[Any, str] = {
    _aten._local_scalar_dense.default: "item",  # .item(), bool(t), int(t), float(t), `if t:`
    _aten.is_nonzero.default: "item",
    _aten.equal.default: "equal",
    _aten.allclose.default: "item",  # a kernel of its own: its inner .item() is not dispatched
    _aten.nonzero.default: "nonzero",
    _aten.nonzero.out: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique.default: "unique",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
}
# Indexing with a boolean mask calls nonzero inside the kernel, out of the dispatch mode's sight: detect the mask.
_MASK_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
# Sizes that need the data's values unless the caller passes them (output_size / minlength is not enough for these).
_VALUE_SIZED = {_aten.repeat_interleave.Tensor: "repeat_interleave", _aten.bincount.default: "bincount"}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


def _call_site() -> str:
    """``path:line`` of the innermost frame outside torch and this module (the line that asked for the sync)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_TORCH_DIR) and path != _THIS_FILE and not path.startswith("<"):
            return f"{_short(path)}:{frame.f_lineno}"
        frame = frame.f_back
    return "<torch internals>"


def _short(path: str) -> str:
    """The path relative to the working directory (a repo run from its root), else to the sys.path entry that holds
    it (site-packages, say)."""
    cwd = os.getcwd() + os.sep
    if path.startswith(cwd):
        return path[len(cwd):]
    roots = [os.path.abspath(p) + os.sep for p in sys.path if p]
    best = max((r for r in roots if path.startswith(r)), key=len, default="")
    return path[len(best):]


@dataclass
class HostSyncs:
    """Host syncs seen in a block: by op name, by call site (``file:line``), and as (op, site) events in order."""

    by_op: Counter = field(default_factory=Counter)
    by_site: Counter = field(default_factory=Counter)
    events: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of host syncs."""
        return len(self.events)

    def add(self, op: str, site: str | None = None) -> None:
        """Record one sync of kind ``op`` (site: the caller's source line when not given)."""
        site = site or _call_site()
        self.by_op[op] += 1
        self.by_site[site] += 1
        self.events.append((op, site))

    def per_site_ops(self) -> dict[str, Counter]:
        """``{site: Counter(op -> count)}``, sites in first-seen order."""
        out: dict[str, Counter] = {}
        for op, site in self.events:
            out.setdefault(site, Counter())[op] += 1
        return out

    def report(self) -> str:
        """One line per call site: count, ops, ``file:line``."""
        if not self.events:
            return "no host syncs"
        return "\n".join(f"{sum(ops.values()):>4}  {', '.join(f'{k} x{v}' for k, v in ops.items()):<28} {site}"
                         for site, ops in self.per_site_ops().items())


def _is_mask(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


class _SyncMode(TorchDispatchMode):
    """Dispatch mode that records every host-syncing op into ``syncs`` and runs it unchanged."""

    def __init__(self, syncs: HostSyncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = SYNC_OPS.get(func)
        if kind is None and func in _MASK_INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(_is_mask(i) for i in indices or ()):
                kind = "mask_index"
        elif kind is None and func in _VALUE_SIZED:
            if not (kwargs.get("output_size") is not None and func is _aten.repeat_interleave.Tensor):
                kind = _VALUE_SIZED[func]
        elif kind is None and func in _COPY_OPS:
            kind = self._host_copy(func, args, kwargs)
        if kind is not None:
            self.syncs.add(kind)
        return func(*args, **kwargs)

    @staticmethod
    def _host_copy(func, args, kwargs) -> str | None:
        """'to_host' for a copy from an accelerator into host memory, else None."""
        if func is _aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            return "to_host" if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu" \
                else None
        dst, src = args[0], args[1]
        return "to_host" if dst.device.type == "cpu" and src.device.type not in ("cpu", "meta") else None


@contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count host syncs made inside the block (forward, backward and optimizer ops alike); yields a ``HostSyncs``."""
    syncs = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "numpy")}

    def wrap(name: str, fn):
        def method(self, *a, **k):
            # A CPU tensor's copy is no op the mode can see; count the explicit request (a sync on any accelerator).
            if self.device.type == "cpu":
                syncs.add(name)
            return fn(self, *a, **k)
        return method

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        with _SyncMode(syncs):
            yield syncs
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
