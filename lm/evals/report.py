"""Report files of a grid evaluation (needle depth x context length or image count): CSV, Markdown and a PNG
heatmap, each written atomically."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def wrap_title(title: str, width: int) -> str:
    """``title`` in lines of at most ``width`` characters, broken after a space or a ``/`` (a path splits between
    its folders, never inside a name); a single piece longer than ``width`` keeps its own line whole."""
    lines, line = [], ""
    for piece in re.split(r"(?<=[ /])", title):
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join([*lines, line.rstrip()])


def write_grid_report(rows: Sequence[dict[str, Any]], out_dir: str | Path, stem: str, md_lines: list[str],
                      grid: np.ndarray, cell_text: Callable[[float], str], xticklabels: list[str],
                      yticklabels: list[str], xlabel: str, ylabel: str, title: str, base_width: float = 1.2
                      ) -> dict[str, Path]:
    """Write ``<stem>.csv`` (every row), ``<stem>.md`` (``md_lines``) and ``<stem>.png`` (``grid`` as a heatmap,
    depth x context, values in [0, 1]) into ``out_dir``, each atomically; the paths by kind."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    from zoo.files import atomic_path, atomic_write_text

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; the needle report needs a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    fig, ax = plt.subplots(figsize=(base_width + 0.9 * grid.shape[1], 1.0 + 0.5 * grid.shape[0]))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, cell_text(grid[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(grid.shape[1]), xticklabels)
    ax.set_yticks(range(grid.shape[0]), yticklabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # wrapped to the figure's width (a narrow grid cut a long model path off); ~12 characters an inch at size 9
    ax.set_title(wrap_title(title, max(16, int(fig.get_figwidth() * 12))), fontsize=9)
    fig.tight_layout()
    try:  # the figure is drawn before any file is replaced, so a plotting error leaves the old report whole
        with atomic_path(paths["png"]) as tmp:
            fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8", newline="")
    atomic_write_text(paths["md"], "\n".join(md_lines) + "\n")
    return paths
