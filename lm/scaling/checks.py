"""Checks shared by every scaling-law fit: run columns of finite positive numbers; the untrustworthy-fit warning."""
from __future__ import annotations

from typing import Any

import numpy as np


class ScalingFitWarning(UserWarning):
    """A fit finished but its result should not be trusted (did not converge, or is degenerate)."""


def check_runs(**columns: Any) -> dict[str, np.ndarray]:
    """Validate equal-length columns of finite positive numbers; errors name the column and the row."""
    out: dict[str, np.ndarray] = {}
    length = None
    for name, values in columns.items():
        try:
            arr = np.asarray(values, dtype=float).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"column {name!r} must hold numbers: {exc}") from None
        if length is None:
            length = arr.size
        elif arr.size != length:
            raise ValueError(f"column {name!r} has {arr.size} values but the others have {length}; "
                             "every run needs one value per column")
        bad_nan = np.flatnonzero(~np.isfinite(arr))
        if bad_nan.size:
            i = int(bad_nan[0])
            raise ValueError(f"row {i} has a non-finite {name} ({float(arr[i])!r}); remove or fix that run "
                             f"({bad_nan.size} such row(s) in all)")
        bad = np.flatnonzero(arr <= 0)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"row {i}: {name} = {float(arr[i])!r} is not positive; every {name} must be > 0 "
                             f"({bad.size} such row(s) in all)")
        out[name] = arr
    return out
