"""Checked stand-ins for the builtin constructors a pickle may name (``builtins.list``, ``__builtin__.set``, ...).

Older protocols build sets, bytes and complex numbers by calling these types. Each stand-in accepts only plain
data, charges the copy it makes against the unpickler's budget before making it, checks dict keys / set members,
and never calls ``str()``/``repr()`` on a container (whose repr of a shared, DAG-shaped list grows exponentially).

Also the pieces the guarded unpickler (``safe_pickle.py``, which imports this module) builds on: ``Guarded`` (an
allow-listed callable) and ``brief`` / ``one_line`` (bounded reprs of file-controlled data).
"""
from __future__ import annotations

import reprlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from zoo.weights.file_errors import UnsafeFileError

__all__ = ["guarded_builtins", "Guarded", "brief", "one_line", "Budget"]

_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxtuple, _brief.maxlist, _brief.maxdict, _brief.maxstring, _brief.maxother = 3, 4, 4, 4, 60, 60


def brief(obj: Any) -> str:
    """A short, one-line repr of file-controlled data (bounded even for huge or DAG-shaped objects)."""
    try:
        text = _brief.repr(obj)
    except Exception:  # noqa: BLE001 - e.g. an int too long for str(): name the type instead
        text = f"<{type(obj).__name__}>"
    return one_line(text)


def one_line(text: str, limit: int = 400) -> str:
    """``text`` without line breaks or control characters, at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Guarded:
    """An allow-listed callable from the file: ``target`` is what the pickle named, ``fn`` the checked stand-in."""

    def __init__(self, name: str, fn: Callable[..., Any], target: Any = None) -> None:
        self.name, self.fn, self.target = name, fn, target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Budget(Protocol):
    """What the stand-ins charge: the unpickler's budgets (``zoo.weights.safe_pickle.GuardedUnpickler``)."""

    def charge(self, budget: str, n: int, what: str) -> None: ...

    def check_key(self, key: Any) -> None: ...


def guarded_builtins(up: Budget) -> dict[tuple[str, str], Guarded]:
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
