"""Checked stand-ins for the builtin constructors a pickle may name (``builtins.list``, ``__builtin__.set``, ...).

Older protocols build sets, bytes and complex numbers by calling these types. Each stand-in accepts only plain
data, charges the copy it makes against the unpickler's budget before making it, checks dict keys / set members,
and never calls ``str()``/``repr()`` on a container (whose repr of a shared, DAG-shaped list grows exponentially).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zoo.weights.safe_load import UnsafeFileError
from zoo.weights.safe_pickle import Guarded, brief

if TYPE_CHECKING:
    from zoo.weights.safe_pickle import GuardedUnpickler

__all__ = ["guarded_builtins"]


def guarded_builtins(up: "GuardedUnpickler") -> dict[tuple[str, str], Guarded]:
    """``(module, name) -> Guarded`` for the builtin types, charging ``up``'s budgets."""

    def container(t: type) -> Callable[..., Any]:
        def build(items: Any = ()) -> Any:
            if not isinstance(items, (list, tuple, set, frozenset, dict, str, bytes)):
                raise UnsafeFileError(f"refused {t.__name__}({brief(items)}): only from a plain container")
            up.charge("copies", 8 * len(items), f"{t.__name__}() of {len(items):,} items")
            if t in (set, frozenset):
                keys: Any = items
            elif t in (dict, OrderedDict):
                keys = items.keys() if isinstance(items, dict) else \
                    [p[0] if isinstance(p, (tuple, list)) and p else p for p in items]
            else:
                keys = ()
            for k in keys:
                up.check_key(k)
            return t(items)
        return build

    def number(t: type) -> Callable[..., Any]:
        def build(*args: Any) -> Any:
            if not all(isinstance(a, (int, float, complex)) or (isinstance(a, (str, bytes)) and len(a) < 4300)
                       for a in args) or len(args) > 2:
                raise UnsafeFileError(f"refused {t.__name__}{brief(args)}: only from numbers or short text")
            return t(*args)
        return build

    def text(value: Any = "", encoding: str = "utf-8", errors: str = "strict") -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bytes, bytearray)) and isinstance(encoding, str) and isinstance(errors, str):
            up.charge("copies", 4 * len(value), "str() of bytes")
            return str(value, encoding, errors)
        raise UnsafeFileError(f"refused str({type(value).__name__}): only text or bytes")  # repr of a DAG explodes

    def binary(t: type) -> Callable[..., Any]:
        def build(value: Any = b"", encoding: Any = None, errors: str = "strict") -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                n = value
            elif isinstance(value, str) and isinstance(encoding, str):
                n = 4 * len(value)
            elif isinstance(value, (bytes, bytearray, list, tuple)) and encoding is None:
                n = len(value)
            else:
                raise UnsafeFileError(f"refused {t.__name__}({type(value).__name__}): only a size, text or bytes")
            up.charge("copies", n, f"builtins.{t.__name__}({n:,})")
            return t(value) if encoding is None else t(value, encoding, errors)
        return build

    def plain_object(*args: Any) -> object:
        if args:
            raise UnsafeFileError("refused object() with arguments")
        return object()

    out = {("builtins", "object"): Guarded("builtins.object", plain_object, object),
           ("builtins", "str"): Guarded("builtins.str", text, str)}
    for t in (tuple, list, dict, set, frozenset):
        out[("builtins", t.__name__)] = Guarded(f"builtins.{t.__name__}", container(t), t)
    out[("collections", "OrderedDict")] = Guarded("collections.OrderedDict", container(OrderedDict), OrderedDict)
    for t in (int, float, complex, bool):
        out[("builtins", t.__name__)] = Guarded(f"builtins.{t.__name__}", number(t), t)
    for t in (bytes, bytearray):
        out[("builtins", t.__name__)] = Guarded(f"builtins.{t.__name__}", binary(t), t)
    return out
