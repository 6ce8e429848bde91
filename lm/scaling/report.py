"""`zoo scaling fit`: fit a runs CSV with Approach 1, 2 or 3, print the law and compute-optimal table, plot PNGs."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import lm.scaling.laws as S
from lm.scaling.runs import load_runs_csv


def _fmt(x: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.3g}{unit}"
    return f"{x:.3g}"


def load_curves(folder: str | Path, run_ids: Any) -> list[S.TrainingCurve]:
    """Training curves of the given dense runs from ``<folder>/<run_id>.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Approach 1 needs training curves, and {str(folder)!r} does not exist; the sweep "
                                "writes them to <out_dir>/curves (or pass --curves DIR)")
    curves, missing = [], []
    for rid in run_ids:
        p = folder / f"{rid}.json"
        if not p.is_file():
            missing.append(str(rid))
            continue
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            curves.append(S.TrainingCurve(N=float(d["N"]), tokens=d["tokens"], loss=d["loss"]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"training curve {str(p)!r} is not readable JSON ({exc}); rerun that run "
                             "(delete its row from runs.csv) or pass --curves DIR") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"training curve {str(p)!r} lacks a numeric N, tokens or loss ({exc!r}); rerun that "
                             "run (delete its row from runs.csv)") from None
    if missing:
        raise FileNotFoundError(f"no training curve for run(s) {missing[:5]}{'...' if len(missing) > 5 else ''} "
                                f"in {str(folder)!r}")
    return curves


def optimal_table(budgets: np.ndarray, fit: Any) -> list[tuple[float, float, float]]:
    """(C, N_opt, D_opt) rows at the given budgets."""
    N, D = S.compute_optimal(budgets, fit)
    return [(float(c), float(n), float(d)) for c, n, d in zip(budgets, np.atleast_1d(N), np.atleast_1d(D))]


def _fit(approach: int, N: np.ndarray, D: np.ndarray, L: np.ndarray, C: np.ndarray, n_bootstrap: int,
         curve_list: list[S.TrainingCurve] | None, echo: Any) -> Any:
    """Fit one approach and print its law; ValueError when the runs admit no fit, warnings when it is degenerate."""
    if approach == 3:
        fit: Any = S.fit_parametric(N, D, L, n_bootstrap=n_bootstrap)
        se = fit.se or {}
        pm = {k: f" ± {se[k]:.3g}" if k in se else "" for k in ("E", "A", "B", "alpha", "beta")}
        echo(f"Approach 3: L(N, D) = E + A/N^alpha + B/D^beta with E = {fit.E:.4g}{pm['E']}, "
             f"A = {fit.A:.4g}{pm['A']}, B = {fit.B:.4g}{pm['B']}, alpha = {fit.alpha:.4f}{pm['alpha']}, "
             f"beta = {fit.beta:.4f}{pm['beta']}  (sum Huber {fit.objective:.3g}, {fit.n_bootstrap} bootstraps)")
        a, b = fit.exponents
        echo(f"  allocation: N_opt ∝ C^{a:.3f}, D_opt ∝ C^{b:.3f}; converged: {fit.converged} ({fit.message})")
    elif approach == 2:
        fit = S.fit_isoflop([{"N": n, "D": d, "L": l, "C": c} for n, d, l, c in zip(N, D, L, C)])
        for p in fit.profiles:
            echo(f"  C = {p.C:.3g}: {p.n_runs} runs, parabola minimum N_opt = {_fmt(p.N_opt)}, "
                 f"D_opt = {_fmt(p.D_opt)}, L_min = {p.L_min:.4f}")
        law = fit.law
        echo(f"Approach 2: N_opt = {law.k_n:.4g} C^{law.a:.4f} (± {law.a_se:.3g}), "
             f"D_opt = {law.k_d:.4g} C^{law.b:.4f} (± {law.b_se:.3g})")
    else:
        fit = S.fit_envelope(curve_list)
        law = fit.law
        echo(f"Approach 1: envelope over {fit.C.size} FLOP values won by {len(set(fit.N_opt))} model sizes; "
             f"N_opt = {law.k_n:.4g} C^{law.a:.4f} (± {law.a_se:.3g}), "
             f"D_opt = {law.k_d:.4g} C^{law.b:.4f} (± {law.b_se:.3g})")
    return fit


def fit_and_report(csv_path: str, approach: int, out: str | None = None, n_bootstrap: int = 100,
                   curves: str | None = None, echo: Any = print) -> int:
    """Fit the CSV with one approach, print law + compute-optimal table, write PNGs; 0 ok, 1 fit not converged."""
    # The whole CSV is validated (N, D, L and, wherever filled in, C and E positive) before any law is printed.
    cols = load_runs_csv(csv_path, required=("N", "D", "L") + (("C",) if approach == 2 else ()))
    out_dir = Path(out) if out else Path(csv_path).parent
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file; the plots need a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    E = cols.get("E", np.ones_like(cols["N"]))
    E = np.where(np.isfinite(E), E, 1.0)
    dense = E == 1
    if dense.sum() == 0:
        raise ValueError(f"{csv_path!r} has no dense (E = 1) runs to fit the Chinchilla laws to")
    N, D, L = cols["N"][dense], cols["D"][dense], cols["L"][dense]
    C = cols["C"][dense] if "C" in cols and np.all(np.isfinite(cols["C"][dense])) else 6 * N * D
    echo(f"{int(dense.sum())} dense runs from {csv_path}; N {_fmt(N.min())}-{_fmt(N.max())}, "
         f"D {_fmt(D.min())}-{_fmt(D.max())}, budgets C = "
         + ", ".join(f"{c:.3g}" for c in sorted({float(f'{c:.3g}') for c in C})))
    iso = None
    curve_list = None
    if approach == 1:  # input files, read before fitting: a missing or unreadable curve is a usage error (exit 2)
        curve_list = load_curves(curves or Path(csv_path).parent / "curves", cols["run_id"][dense])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", S.ScalingFitWarning)
        try:
            fit = _fit(approach, N, D, L, C, n_bootstrap, curve_list, echo)
        except ValueError as exc:  # valid runs that admit no fit (too few points, flat profile, ...): degenerate
            for w in caught:
                echo(f"WARNING (Approach {approach}): {w.message}")
            echo(f"WARNING (Approach {approach}): no law fitted: {exc}")
            echo(f"WARNING: the Approach {approach} fit is degenerate; nothing was plotted")
            return 1
    ok = not caught and getattr(fit, "converged", True)
    if isinstance(fit, S.IsoFlopFit):
        iso = fit
    for w in caught:
        echo(f"WARNING (Approach {approach}): {w.message}")
    budgets = np.unique(np.array([float(f"{c:.3g}") for c in C]))
    table_C = np.concatenate([budgets, budgets.max() * np.array([10.0, 100.0])])
    echo(f"compute-optimal allocation (Approach {approach}; the last two rows extrapolate 10x and 100x):")
    echo(f"  {'C (FLOPs)':>12s} {'N_opt':>10s} {'D_opt':>10s} {'D/N':>8s}")
    try:
        with np.errstate(all="ignore"):
            table = optimal_table(table_C, fit)
    except (ArithmeticError, ValueError) as exc:
        if ok:
            raise
        table = []  # a degenerate law may have no allocation at all; the exit code already says why
        echo(f"  (none: {type(exc).__name__} {exc})")
    for c, n, d in table:
        echo(f"  {c:12.3g} {_fmt(n):>10s} {_fmt(d):>10s} {d / n if n else float('nan'):8.1f}")
    if iso is None:
        # Parabolas for the IsoFLOP plot only; their warnings are notes, not a verdict on this approach's fit.
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", S.ScalingFitWarning)
            try:
                iso = S.fit_isoflop([{"N": n, "D": d, "L": l, "C": c} for n, d, l, c in zip(N, D, L, C)])
            except ValueError as exc:
                iso = None  # budgets without 3 sizes or a concave profile: the plot shows points only
                echo(f"note (IsoFLOP plot): {exc}")
        for w in notes:
            echo(f"note (IsoFLOP plot): {w.message}")
    from lm.scaling.plots import plot_envelope, plot_isoflop, plot_optimal, plot_routed

    try:
        paths = [plot_isoflop(N, L, C, iso, fit if approach == 3 else None, out_dir / "isoflop.png"),
                 plot_optimal(fit, iso, out_dir / "optimal.png")]
        if approach == 1:
            paths.append(plot_envelope(curve_list, fit, out_dir / "envelope.png"))
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
        if ok:
            raise
        paths = []  # a degenerate law (non-finite values) cannot be drawn; the exit code already says why
        echo(f"note: plots skipped for the degenerate fit ({exc})")
    if np.unique(E).size >= 3:
        rfit = S.fit_routed(cols["N"], E, cols["L"])
        c = rfit.coeffs
        echo(f"routed law: log10 L = {c.a:.4f} log10 N + {c.b:.4f} log10 Ê + {c.c:.4f} log10 N log10 Ê + {c.d:.4f}, "
             f"E_start = {c.e_start:.3g}, E_max = {c.e_max:.3g}; routing helps below N = "
             f"{_fmt(S.routing_cutoff(c))}")
        paths.append(plot_routed(cols["N"], E, cols["L"], rfit, out_dir / "routed.png"))
    echo("plots: " + ", ".join(str(p) for p in paths))
    if not ok:
        echo(f"WARNING: the Approach {approach} fit did not converge or is degenerate; the numbers above are not "
             "reliable")
    return 0 if ok else 1
