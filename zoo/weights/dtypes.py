"""The floating-point dtypes weights may be written in, by name: no torch here, so a parser lists them in --help."""
from __future__ import annotations

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")  # what --dtype accepts (weights stay floating point)
