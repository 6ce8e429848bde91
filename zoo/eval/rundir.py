"""The probe's output folder (``zoo probe ... --out DIR``): which probe it holds, what it resumes, what it reports.

``DIR/probe.json`` names the probe (backbone, data, mode and every setting that changes a figure); rerunning the same
command resumes what DIR holds (finished feature shards, finished lr-grid points) and says so, ``--overwrite`` starts
over, and other arguments are refused in one line. ``DIR/metrics.json`` holds every figure, ``DIR/metrics.md`` a table
naming the recipe, the encoder's source and hash and the figures.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["IDENTITY_IGNORED", "identity", "claim", "GridPoints", "markdown_report"]

# settings that change how fast a probe runs or what it prints, never a figure
IDENTITY_IGNORED = ("progress", "num_workers", "extract_batch_size", "cache_dir", "device", "trainer", "devices",
                    "num_nodes")
OURS = ("probe.json", "grid.json", "metrics.json", "metrics.md", "features")


def identity(tool: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What makes two probes the same: the tool's arguments and the settings that change a figure."""
    return json.loads(json.dumps({**{k: tool.get(k) for k in ("backbone", "data", "mode", "which", "padding", "arch")},
                                  **{k: v for k, v in config.items() if k not in IDENTITY_IGNORED}}, default=str))


def claim(out: str | Path, ident: dict[str, Any], overwrite: bool = False) -> bool:
    """Make ``out`` this probe's folder; True when it already was (a resume). Another probe's folder is refused in
    one line (``ValueError``) unless ``overwrite``, which removes the probe's files there first."""
    out = Path(out)
    meta = out / "probe.json"
    if overwrite:
        for name in OURS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for path in out.glob("protocol_*"):  # protocol_pass_*: a protocol pass's checkpoints
            shutil.rmtree(path, ignore_errors=True)
    elif meta.exists():
        saved = json.loads(meta.read_text())
        if saved == ident:
            return True
        diff = [k for k in sorted(set(saved) | set(ident)) if saved.get(k) != ident.get(k)]
        shown = "; ".join(f"{k}: {saved.get(k)!r} there, {ident.get(k)!r} now" for k in diff[:3])
        raise ValueError(f"--out {out} holds another probe ({shown}{' ...' if len(diff) > 3 else ''}); "
                         "pass another --out, or --overwrite to start over there")
    out.mkdir(parents=True, exist_ok=True)
    from zoo.files import atomic_write_text

    atomic_write_text(meta, json.dumps(ident, indent=2))
    return False


class GridPoints:
    """Finished lr-grid points (held-out top-1 and divergence per base lr) in ``DIR/grid.json``, for a resume.

    The file carries the key of the run that wrote it (settings, encoder hash, data content): points of another run
    are never reused, even when ``evaluate`` is called directly with a folder.
    """

    def __init__(self, out: str | Path | None, key: dict[str, Any]) -> None:
        self.path = Path(out) / "grid.json" if out is not None else None
        self.key = json.loads(json.dumps(key, default=str))
        self.points: dict[str, dict[str, Any]] = {}
        self.finals: dict[str, dict[str, Any]] = {}  # the final head per lr (top-1, top-5 on test, divergence)
        if self.path is not None and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except ValueError:
                saved = {}
            if saved.get("key") == self.key:
                self.points = saved.get("points", {})
                self.finals = saved.get("finals", {})
        self.resumed = len(self.points)

    def add(self, lr: float, top1: float, diverged: str | None, final: dict[str, Any] | None = None) -> None:
        """Record a finished point and, when its pass trained one, its final head (written at once: a kill after it
        loses nothing)."""
        self.points[str(lr)] = {"top1": top1, "diverged": diverged}
        if final is not None:
            self.finals[str(lr)] = final
        self._write()

    def final(self, lr: float) -> dict[str, Any] | None:
        """The final head of ``lr`` (``{top1, top5, diverged}``), if a pass trained it."""
        return self.finals.get(str(lr))

    def add_final(self, lr: float, final: dict[str, Any]) -> None:
        """Record the final head of ``lr``."""
        self.finals[str(lr)] = final
        self._write()

    def _write(self) -> None:
        from zoo.eval.distributed import is_main_process

        if self.path is not None and is_main_process():  # every DDP rank holds the points; rank 0 writes them
            from zoo.files import atomic_write_text

            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"key": self.key, "points": self.points, "finals": self.finals},
                                                     indent=2))


def markdown_report(m: dict[str, Any]) -> str:
    """``metrics.md``: the recipe, the encoder's source and hash, and the figures, as a markdown table."""
    c = m.get("counts", {})
    rows = [("mode", m.get("mode")), ("backbone (source)", m.get("backbone")), ("arch", m.get("arch")),
            ("encoder sha256", (m.get("encoder_sha256") or "")[:16]), ("dataset", m.get("dataset")),
            ("recipe", m.get("recipe", "")), ("top-1 %", f"{m['top1']:.2f}"), ("top-5 %", f"{m['top5']:.2f}"),
            ("train / test images", f"{c.get('train')} / {c.get('test')}"),
            ("skipped train / test", f"{c.get('skipped_train')} / {c.get('skipped_test')}")]
    for lr, top1 in (m.get("heldout_top1") or {}).items():
        rows.append((f"held-out top-1 @ base lr {lr}", f"{top1:.2f}"))
    if "base_lr" in m:
        rows.append(("base lr (held-out pick)", f"{m['base_lr']:g}"))
    for k, v in (m.get("knn") or {}).items():
        rows.append((f"kNN k={k} top-1 / top-5", f"{v['top1']:.2f} / {v['top5']:.2f}"))
    rows += [(f"note {i + 1}", n) for i, n in enumerate(m.get("notices") or [])]
    rows.append(("seconds (total / features)", f"{m['seconds']['total']:.1f} / {m['seconds']['features']:.1f}"))
    body = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    return f"# Probe: {m.get('backbone')} on {m.get('dataset')}\n\n| field | value |\n|---|---|\n{body}\n"
