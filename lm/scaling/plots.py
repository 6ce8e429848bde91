"""PNG plots of scaling fits (matplotlib Agg, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import lm.scaling.laws as S


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: never try to open a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write the PNG atomically (temp file + os.replace) and free the figure (every plot ends here)."""
    from zoo.files import atomic_path

    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        _plt().close(fig)
    return Path(path)


def plot_isoflop(N: np.ndarray, L: np.ndarray, C: np.ndarray, iso: S.IsoFlopFit | None,
                 parametric: S.ParametricFit | None, path: Path) -> Path:
    """Loss against N per compute budget, with the fitted parabolas (and the Approach 3 law when given)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    keys = np.array([float(f"{c:.3g}") for c in C])
    cmap = plt.get_cmap("viridis")
    budgets = np.unique(keys)
    for j, key in enumerate(budgets):
        col = cmap(j / max(1, len(budgets) - 1))
        m = keys == key
        ax.scatter(N[m], L[m], color=col, s=18, label=f"C={key:.2g}")
        grid = np.geomspace(N[m].min() / 1.5, N[m].max() * 1.5, 100)
        if iso is not None:
            prof = min(iso.profiles, key=lambda p: abs(np.log(p.C / key)))
            p2, p1, p0 = prof.coeffs
            lg = np.log(grid)
            ax.plot(grid, p2 * lg ** 2 + p1 * lg + p0, color=col, lw=1)
            ax.scatter([prof.N_opt], [prof.L_min], color=col, marker="*", s=80, edgecolor="k")
        if parametric is not None:
            ax.plot(grid, parametric.predict(grid, key / (6 * grid)), color=col, lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (non-embedding)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("IsoFLOP profiles" + (" (solid: parabolas, *: minima)" if iso else "")
                 + (" (dashed: Approach 3)" if parametric else ""))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_optimal(fit: Any, iso: S.IsoFlopFit | None, path: Path) -> Path:
    """N_opt and D_opt against C: the fitted allocation law (line) and the per-budget optima (points)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if isinstance(fit, S.EnvelopeFit):
        pts_c, pts_n, pts_d = fit.C, fit.N_opt, fit.D_opt
    elif iso is not None:
        pts_c = np.array([p.C for p in iso.profiles])
        pts_n, pts_d = np.array([p.N_opt for p in iso.profiles]), np.array([p.D_opt for p in iso.profiles])
    else:
        pts_c = pts_n = pts_d = np.array([])
    lo = pts_c.min() / 3 if pts_c.size else 1e15
    hi = pts_c.max() * 3 if pts_c.size else 1e20
    grid = np.geomspace(lo, hi, 50)
    n_fit, d_fit = S.compute_optimal(grid, fit)
    for ax, pts, line, name in ((axes[0], pts_n, n_fit, "N_opt"), (axes[1], pts_d, d_fit, "D_opt")):
        if pts.size:
            ax.scatter(pts_c, pts, s=14, label="per-budget optimum")
        expo = np.polyfit(np.log(grid), np.log(line), 1)[0]
        ax.plot(grid, line, "r-", label=f"fitted law ∝ C^{expo:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs, 6ND)")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    fig.suptitle(f"compute-optimal allocation ({type(fit).__name__})")
    return _save(fig, path)


def plot_envelope(curves: list[S.TrainingCurve], fit: S.EnvelopeFit, path: Path) -> Path:
    """Approach 1: every training curve against compute 6 N D, with the minimum-loss envelope."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = sorted({c.N for c in curves})
    cmap = plt.get_cmap("plasma")
    for c in curves:
        tok = np.asarray(c.tokens, dtype=float)
        ax.plot(6 * c.N * tok, c.loss, color=cmap(sizes.index(c.N) / max(1, len(sizes) - 1)), lw=0.8, alpha=0.7)
    ax.plot(fit.C, fit.L_min, "k-", lw=2, label="envelope (min over runs)")
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6 N D (FLOPs)")
    ax.set_ylabel("smoothed training loss")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_routed(N: np.ndarray, E: np.ndarray, L: np.ndarray, fit: S.RoutedFit, path: Path) -> Path:
    """Routed runs: loss against expert count per base size N, with the fitted routed law."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = np.unique(N)
    cmap = plt.get_cmap("viridis")
    grid = np.geomspace(1, max(E.max(), 2), 60)
    for j, n in enumerate(sizes):
        col = cmap(j / max(1, len(sizes) - 1))
        m = N == n
        ax.scatter(E[m], L[m], color=col, s=16, label=f"N={n:.3g}")
        ax.plot(grid, S.routed_loss(np.full_like(grid, n), grid, fit.coeffs), color=col, lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts E")
    ax.set_ylabel("validation loss")
    ax.set_title("routed law fit")
    ax.legend(fontsize=7)
    return _save(fig, path)
