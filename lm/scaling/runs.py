"""The results table of a scaling sweep: ``<out_dir>/runs.csv``, one row per finished run, written atomically and read
back with every cell checked (errors name the file, the row and the column)."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

COLUMNS = ("run_id", "model", "d_model", "n_layers", "n_heads", "d_ff", "E", "N", "N_total", "D", "C", "C_6nd",
           "C_detailed", "steps", "batch_size", "seq_len", "lr", "L", "train_loss", "wall_s", "tokens_per_s",
           "plan_hash", "data_key")



def _read_csv(p: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV; an undecodable or malformed file raises a ValueError naming it."""
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            return header, list(reader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(p)!r} is not a UTF-8 text CSV (byte {exc.object[exc.start:exc.start + 1]!r} at "
                         f"offset {exc.start}); pass the runs.csv written by `zoo scaling sweep`") from None
    except csv.Error as exc:
        raise ValueError(f"{str(p)!r} is not a readable CSV ({exc}); pass the runs.csv written by "
                         "`zoo scaling sweep`") from None
    except IsADirectoryError:
        raise ValueError(f"{str(p)!r} is a folder; pass the runs.csv file inside it") from None


def read_results(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a sweep CSV (empty list when the file does not exist yet)."""
    p = Path(path)
    if not p.is_file():
        return []
    return _read_csv(p)[1]


def append_result(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Add one finished run to the CSV (header written for a new file).

    The whole file is rewritten to a temporary file and ``os.replace``d over the old one, so a crash mid-write
    leaves the previous rows intact instead of a half-written last row.
    """
    from zoo.files import atomic_path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not p.is_file() or p.stat().st_size == 0
    old = b""
    if not new:
        header = _read_csv(p)[0]
        if tuple(header) != COLUMNS:
            raise ValueError(f"{str(p)!r} has columns {header}, not those of a sweep CSV {list(COLUMNS)}; "
                             "use another out_dir")
        old = p.read_bytes()
        if not old.endswith(b"\n"):
            old += b"\r\n"
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    if new:
        w.writeheader()
    w.writerow({k: row.get(k, "") for k in COLUMNS})
    with atomic_path(p) as tmp:
        tmp.write_bytes(old + buf.getvalue().encode("utf-8"))


# Columns that must be finite and positive wherever a row fills them in (empty cells are allowed).
POSITIVE_IF_PRESENT = ("C", "C_6nd", "C_detailed", "E", "N_total", "steps")


def load_runs_csv(path: str | os.PathLike, required: Sequence[str] = ("N", "D", "L"),
                  positive: Sequence[str] = POSITIVE_IF_PRESENT) -> dict[str, np.ndarray]:
    """Numeric columns of a runs CSV; a missing column or a bad cell raises an error naming it and its row.

    ``required`` columns must exist and hold finite positive numbers in every row; ``positive`` columns, where
    the file has them, must hold finite positive numbers in every row that fills them in.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"runs CSV {str(p)!r} does not exist; run `zoo scaling sweep --config ...` first")
    header, rows = _read_csv(p)
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{str(p)!r} is missing column(s) {missing}; it has {header}")
    if not rows:
        raise ValueError(f"{str(p)!r} has no runs")
    checked = list(required) + [c for c in positive if c in header and c not in required]
    out: dict[str, np.ndarray] = {}
    for col in [c for c in header if c not in ("run_id", "model", "plan_hash", "data_key")]:
        vals = []
        for i, r in enumerate(rows):
            cell = (r.get(col) or "").strip()
            try:
                vals.append(float(cell) if cell else math.nan)
            except ValueError:
                if col in checked:
                    raise ValueError(f"{str(p)!r} row {i + 1} (run {r.get('run_id', '?')}): column {col!r} = "
                                     f"{cell!r} is not a number") from None
                vals.append(math.nan)
        out[col] = np.asarray(vals)
    for col in checked:
        vals = out[col]
        present = np.ones(vals.size, dtype=bool) if col in required else np.array(
            [bool((r.get(col) or "").strip()) for r in rows])
        bad = np.flatnonzero(present & (~np.isfinite(vals) | (vals <= 0)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{str(p)!r} row {i + 1} (run {rows[i].get('run_id', '?')}): column {col!r} = "
                             f"{rows[i].get(col)!r} must be a finite positive number ({bad.size} bad row(s)); "
                             "fix or remove that run")
    out["run_id"] = np.asarray([r.get("run_id", str(i)) for i, r in enumerate(rows)], dtype=object)
    return out
