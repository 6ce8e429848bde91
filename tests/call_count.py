"""One call-counting wrapper for the tests that assert a function was (not) called: decoders, stat calls."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def counting(fn: Callable[..., Any], counts: dict[str, int], key: str) -> Callable[..., Any]:
    """``fn`` that adds one to ``counts[key]`` on every call."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[key] += 1
        return fn(*args, **kwargs)
    return wrapper
