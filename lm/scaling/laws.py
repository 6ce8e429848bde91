"""Scaling-law fitting: Chinchilla approaches 1-3, compute-optimal allocation, and the routed-LM law.

Pure functions over numpy arrays (no I/O, no training). Formulas follow
Hoffmann et al. 2022 (Chinchilla) for the dense laws, Clark et al. 2022 for routed language models.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import optimize

from lm.scaling.checks import ScalingFitWarning, check_runs
# The routed-LM law lives in lm.scaling.routed; re-exported so this module is the one entry point to the fits.
from lm.scaling.routed import (
    ROUTED_COEFFICIENTS, RoutedCoefficients, RoutedFit, effective_params, expert_transform, fit_routed,
    routed_loss, routing_cutoff,
)

__all__ = [
    "ScalingFitWarning", "ParametricFit", "PowerLawFit", "IsoFlopProfile", "IsoFlopFit", "TrainingCurve",
    "EnvelopeFit", "RoutedCoefficients", "RoutedFit", "ROUTED_COEFFICIENTS", "CHINCHILLA_PUBLISHED",
    "fit_parametric", "fit_isoflop", "fit_envelope", "compute_optimal", "fit_power_law", "parametric_loss",
    "expert_transform", "routed_loss", "effective_params", "routing_cutoff", "fit_routed", "check_runs",
    "check_allocation",
]

HUBER_DELTA = 1e-3  # Hoffmann et al. section D.2
# Gradient size (objective units) below which a stalled line search still counts as converged.
_GRAD_TOL = 1e-8
# The paper's L-BFGS initialisation grid (lm.md): 5 * 5 * 5 * 6 * 6 = 4500 starting points.
_ALPHA_GRID = np.arange(0.0, 2.0 + 1e-9, 0.5)
_E_GRID = np.arange(-1.0, 1.0 + 1e-9, 0.5)
_AB_GRID = np.arange(0.0, 25.0 + 1e-9, 5.0)


def check_allocation(approach: str, a: float, b: float, extra: Mapping[str, float] | None = None) -> bool:
    """Warn (ScalingFitWarning naming ``approach``) unless N_opt ∝ C^a, D_opt ∝ C^b are finite with a, b in (0, 1).

    An exponent outside (0, 1) means a compute-optimal model (or its data) would shrink as compute grows: such a
    law is an artefact of flat or noisy losses or too few budgets, never a finding. Returns True when sane.
    """
    values = {"a": a, "b": b, **(extra or {})}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        warnings.warn(f"{approach} fit is degenerate: non-finite parameter(s) {bad}; the runs do not determine a "
                      "law", ScalingFitWarning, stacklevel=3)
        return False
    if not (0.0 < a < 1.0 and 0.0 < b < 1.0):
        warnings.warn(f"{approach} fit is degenerate: N_opt ∝ C^{a:.3g}, D_opt ∝ C^{b:.3g} has an exponent outside "
                      "(0, 1), so the compute-optimal model or its data would shrink as compute grows; the losses "
                      "are too flat or noisy to place the optimum (check the runs, add sizes or budgets)",
                      ScalingFitWarning, stacklevel=3)
        return False
    return True


def _flat(values: np.ndarray) -> bool:
    """True when the values do not vary beyond rounding (relative spread below 1e-9)."""
    values = np.asarray(values, dtype=float)
    return values.size > 0 and float(np.ptp(values)) <= 1e-9 * max(float(np.abs(values).max()), 1e-300)


# --------------------------------------------------------------------------------------------- Approach 3
@dataclass(frozen=True)
class ParametricFit:
    """Approach 3 result: L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap standard errors."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # sum of Huber losses on log-loss at the optimum
    converged: bool
    message: str
    n_runs: int
    se: dict[str, float] = field(default_factory=dict)  # bootstrap std errors of E, A, B, alpha, beta
    n_bootstrap: int = 0

    def predict(self, N: Any, D: Any) -> np.ndarray:
        """Predicted loss at parameters N and tokens D."""
        return parametric_loss(N, D, self.E, self.A, self.B, self.alpha, self.beta)

    @property
    def exponents(self) -> tuple[float, float]:
        """Allocation exponents (a, b): N_opt ∝ C^a, D_opt ∝ C^b."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1 / (alpha + beta)) of the allocation formula."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))


# Hoffmann et al. 2022, eq. (10) / lm.md.
CHINCHILLA_PUBLISHED = ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=float("nan"),
                                     converged=True, message="published values (Hoffmann et al. 2022)", n_runs=0)


def parametric_loss(N: Any, D: Any, E: float, A: float, B: float, alpha: float, beta: float) -> np.ndarray:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return E + A / N**alpha + B / D**beta


def _huber_objective(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                     weights: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Weighted SUM of Huber(log L_hat - log L) and its gradient, batched over rows of theta (S, 5).

    theta columns are (a, b, e, alpha, beta) with log L_hat = LSE(a - alpha log N, b - beta log D, e).
    ``weights`` (S or 1, n) carry bootstrap resampling counts so every resample is one row of a batch.
    """
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    t1 = a - alpha * logN
    t2 = b - beta * logD
    t3 = np.broadcast_to(e, t1.shape)
    m = np.maximum(np.maximum(t1, t2), t3)
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(t3 - m)
    z = x1 + x2 + x3
    r = m + np.log(z) - logL
    absr = np.abs(r)
    hub = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
    dr = np.clip(r, -delta, delta) * weights / z
    g1, g2, g3 = dr * x1, dr * x2, dr * x3
    grad = np.stack([g1.sum(1), g2.sum(1), g3.sum(1), -(g1 * logN).sum(1), -(g2 * logD).sum(1)], axis=1)
    return (hub * weights).sum(1), grad


def _batched_lbfgs(fg, x0: np.ndarray, max_iter: int, memory: int = 8, gtol: float = 1e-10
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Independent L-BFGS runs, one per row of x0, vectorised (backtracking Armijo line search).

    Running 4500 starts one scipy call at a time costs minutes; these rows never interact, so the
    two-loop recursion and the line search are done for all still-running rows at once. ``fg(x, rows)``
    evaluates the objective for the given rows. Returns (x, f, converged mask).
    """
    x = x0.astype(float).copy()
    S, P = x.shape
    f, g = fg(x, np.arange(S))
    s_hist = np.zeros((memory, S, P))
    y_hist = np.zeros((memory, S, P))
    rho = np.zeros((memory, S))
    gamma = np.full(S, 1.0)
    converged = np.zeros(S, dtype=bool)
    act = np.arange(S)
    for k in range(max_iter):
        if act.size == 0:
            break
        ga = g[act]
        q = ga.copy()
        order = [(k - 1 - j) % memory for j in range(min(k, memory))]
        alphas = []
        for i in order:
            al = rho[i, act] * np.einsum("sp,sp->s", s_hist[i, act], q)
            q -= al[:, None] * y_hist[i, act]
            alphas.append(al)
        r = gamma[act, None] * q
        for i, al in zip(reversed(order), reversed(alphas)):
            be = rho[i, act] * np.einsum("sp,sp->s", y_hist[i, act], r)
            r += s_hist[i, act] * (al - be)[:, None]
        d = -r
        slope = np.einsum("sp,sp->s", ga, d)
        reset = ~(slope < 0)  # not a descent direction: fall back to (scaled) steepest descent
        d[reset] = -ga[reset] / np.maximum(np.linalg.norm(ga[reset], axis=1, keepdims=True), 1e-300)
        slope = np.einsum("sp,sp->s", ga, d)
        xa, fa = x[act], f[act]
        x_new, f_new, g_new = xa.copy(), fa.copy(), ga.copy()
        t = np.ones(act.size)
        pending = np.arange(act.size)
        for _ls in range(30):
            trial = xa[pending] + t[pending, None] * d[pending]
            ft, gt = fg(trial, act[pending])
            ok = np.isfinite(ft) & (ft <= fa[pending] + 1e-4 * t[pending] * slope[pending])
            acc = pending[ok]
            x_new[acc], f_new[acc], g_new[acc] = trial[ok], ft[ok], gt[ok]
            pending = pending[~ok]
            if pending.size == 0:
                break
            t[pending] *= 0.25
        stalled = np.zeros(act.size, dtype=bool)
        stalled[pending] = True  # no decrease along d at any step: numerically at its optimum
        sv, yv = x_new - xa, g_new - ga
        sy = np.einsum("sp,sp->s", sv, yv)
        slot = k % memory
        good = sy > 1e-30
        s_hist[slot, act], y_hist[slot, act] = sv, yv
        rho[slot, act] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
        gamma[act] = np.where(good, sy / np.maximum(np.einsum("sp,sp->s", yv, yv), 1e-300), gamma[act])
        df = fa - f_new
        x[act], f[act], g[act] = x_new, f_new, g_new
        small_g = np.abs(g_new).max(1) < gtol
        small_df = df <= 1e-12 * np.maximum(np.abs(f_new), 1e-30)
        converged[act] = small_g | stalled | small_df
        act = act[~(small_g | stalled | small_df)]
    return x, f, converged


def _theta_to_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def _paper_grid() -> np.ndarray:
    return np.array([(a, b, e, al, be) for al, be, e, a, b in
                     itertools.product(_ALPHA_GRID, _ALPHA_GRID, _E_GRID, _AB_GRID, _AB_GRID)])


def fit_parametric(N: Any, D: Any, L: Any, n_bootstrap: int = 0, delta: float = HUBER_DELTA, seed: int = 0,
                   max_iter: int = 300, bootstrap_starts: int = 32) -> ParametricFit:
    """Chinchilla Approach 3: fit L = E + A/N^alpha + B/D^beta on log-loss (sum of Huber, L-BFGS from the grid).

    Every point of the paper's grid is run through L-BFGS (vectorised) and the best is polished with scipy's
    L-BFGS-B, whose convergence flag is reported. Bootstrap refits (rows resampled with replacement) start
    from the full-data optimum and the ``bootstrap_starts`` grid points that ended best, since re-running all
    4500 starts per resample costs n_bootstrap times the whole fit for the same answer.
    """
    cols = check_runs(N=N, D=D, L=L)
    n = cols["N"].size
    if n < 6:
        raise ValueError(f"Approach 3 fits 5 parameters and needs at least 6 runs; got {n}")
    logN, logD, logL = np.log(cols["N"]), np.log(cols["D"]), np.log(cols["L"])
    if np.unique(logN).size < 2 or np.unique(logD).size < 2:
        raise ValueError("Approach 3 needs runs with at least 2 distinct N and 2 distinct D")
    if _flat(cols["L"]):
        raise ValueError(f"Approach 3: every run has the same loss ({float(cols['L'][0]):.6g}), so no law of N and D "
                         "can be read from them; check that the runs trained")
    def make_fg(W: np.ndarray) -> Any:
        """Objective over rows of a batch; W holds one weight row shared by all, or one row per batch row."""
        shared = W.shape[0] == 1
        return lambda th, rows: _huber_objective(th, logN[None], logD[None], logL[None],
                                                 W if shared else W[rows], delta)

    fg = make_fg(np.ones((1, n)))
    grid = _paper_grid()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ends, fends, _ = _batched_lbfgs(fg, grid, max_iter=max_iter)
    fends = np.where(np.isfinite(fends), fends, np.inf)
    ranked = np.argsort(fends)
    best_theta, best_f, converged, message = _polish(fg, ends[ranked[:5]], max_iter)

    params = _theta_to_params(best_theta)
    se: dict[str, float] = {}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        starts = np.vstack([best_theta[None], ends[ranked[:bootstrap_starts]]])
        k = starts.shape[0]
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_bootstrap)])
        # All resamples x starts in one batch: row r belongs to resample r // k.
        W = np.repeat(counts.astype(float), k, axis=0)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            th, fb, _ = _batched_lbfgs(make_fg(W), np.tile(starts, (n_bootstrap, 1)), max_iter=max_iter)
        fb = np.where(np.isfinite(fb), fb, np.inf).reshape(n_bootstrap, k)
        picks = th.reshape(n_bootstrap, k, 5)[np.arange(n_bootstrap), fb.argmin(1)]
        arr = np.array([[p[key] for key in ("E", "A", "B", "alpha", "beta")]
                        for p in map(_theta_to_params, picks)])
        se = {key: float(v) for key, v in zip(("E", "A", "B", "alpha", "beta"), arr.std(axis=0, ddof=1))}
    fit = ParametricFit(**params, objective=float(best_f), converged=converged, message=message, n_runs=n,
                        se=se, n_bootstrap=n_bootstrap)
    params_ok = all(math.isfinite(v) for v in (*params.values(), best_f))
    if not params_ok or min(params["A"], params["B"]) <= 0:
        warnings.warn(f"Approach 3 fit is degenerate: non-finite parameter(s) {params}; the runs do not determine "
                      "the law", ScalingFitWarning, stacklevel=2)
    elif not converged:
        warnings.warn(f"Approach 3 fit did not converge ({message}); treat E, A, B, alpha, beta as unreliable",
                      ScalingFitWarning, stacklevel=2)
    elif fit.E < 1e-3 * float(cols["L"].min()):
        warnings.warn(f"Approach 3 fit put the irreducible loss E at {fit.E:.3g} (~0): the runs do not constrain E, "
                      "so A, B and the exponents trade off against it; add larger budgets", ScalingFitWarning,
                      stacklevel=2)
    elif min(fit.alpha, fit.beta) < 1e-3:
        warnings.warn(f"Approach 3 fit is degenerate (alpha={fit.alpha:.3g}, beta={fit.beta:.3g}): the runs do "
                      "not constrain one of the power laws; widen the grid of N or D", ScalingFitWarning, stacklevel=2)
    else:
        check_allocation("Approach 3", *fit.exponents)
    return fit


def _polish(fg, candidates: np.ndarray, max_iter: int) -> tuple[np.ndarray, float, bool, str]:
    """Refine the best batched results with scipy L-BFGS-B; its convergence verdict is the one reported.

    L-BFGS-B's line search gives up ("ABNORMAL") once it cannot decrease the objective to machine
    precision; that counts as converged only if the gradient there is negligible.
    """
    best: tuple[np.ndarray, float, bool, str] | None = None
    row = np.zeros(1, dtype=int)
    for th0 in candidates:
        def fun(t: np.ndarray) -> tuple[float, np.ndarray]:
            f, g = fg(t[None], row)
            return float(f[0]), g[0]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = optimize.minimize(fun, th0, jac=True, method="L-BFGS-B",
                                    options={"maxiter": max_iter, "ftol": 1e-13, "gtol": 1e-10})
        gmax = float(np.abs(res.jac).max()) if np.all(np.isfinite(res.jac)) else float("inf")
        ok = bool(res.success) or (res.status == 2 and gmax < _GRAD_TOL)
        if res.success:
            msg = f"converged: {res.message} ({res.nit} polishing iterations, max |gradient| {gmax:.1e})"
        elif ok:
            msg = f"converged: line search at machine precision, max |gradient| {gmax:.1e} ({res.nit} iterations)"
        else:
            msg = f"{res.message} after {res.nit} iterations, max |gradient| {gmax:.1e}"
        if np.isfinite(res.fun) and (best is None or res.fun < best[1]):
            best = (res.x, float(res.fun), ok, msg)
    if best is None:
        return candidates[0], float("nan"), False, "every start produced a non-finite objective"
    return best


# --------------------------------------------------------------------------------------------- Approaches 1 and 2
@dataclass(frozen=True)
class PowerLawFit:
    """N_opt = k_n * C^a and D_opt = k_d * C^b, fitted by least squares in log-log space."""

    a: float
    k_n: float
    b: float
    k_d: float
    a_se: float = float("nan")
    b_se: float = float("nan")

    def predict(self, C: Any) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) at compute C."""
        C = np.asarray(C, dtype=float)
        return self.k_n * C**self.a, self.k_d * C**self.b


def fit_power_law(x: Any, y: Any) -> tuple[float, float, float]:
    """Least-squares fit of y = k x^p in log space; returns (p, k, standard error of p)."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    if lx.size < 2 or np.ptp(lx) == 0:
        raise ValueError("a power law needs at least 2 distinct x values")
    X = np.stack([lx, np.ones_like(lx)], axis=1)
    coef, *_ = np.linalg.lstsq(X, ly, rcond=None)
    se = float("nan")
    if lx.size > 2:
        resid = ly - X @ coef
        s2 = float(resid @ resid) / (lx.size - 2)
        se = math.sqrt(s2 / float(((lx - lx.mean()) ** 2).sum()))
    return float(coef[0]), math.exp(float(coef[1])), se


def _power_laws(C: np.ndarray, N_opt: np.ndarray, D_opt: np.ndarray) -> PowerLawFit:
    a, k_n, a_se = fit_power_law(C, N_opt)
    b, k_d, b_se = fit_power_law(C, D_opt)
    return PowerLawFit(a=a, k_n=k_n, b=b, k_d=k_d, a_se=a_se, b_se=b_se)


@dataclass(frozen=True)
class IsoFlopProfile:
    """One compute budget of Approach 2: loss = p2 (ln N)^2 + p1 ln N + p0 and its minimum."""

    C: float
    N_opt: float
    D_opt: float
    L_min: float
    coeffs: tuple[float, float, float]  # (p2, p1, p0)
    n_runs: int


@dataclass(frozen=True)
class IsoFlopFit:
    """Approach 2 result: one parabola per budget and the power laws through their minima."""

    profiles: list[IsoFlopProfile]
    law: PowerLawFit


def _run_field(run: Any, key: str, i: int) -> float:
    try:
        return float(run[key]) if isinstance(run, Mapping) else float(getattr(run, key))
    except (KeyError, AttributeError):
        raise ValueError(f"run {i} has no {key!r} field; each run needs N, D, L (and C for IsoFLOP budgets)") from None


def fit_isoflop(runs: Iterable[Any], min_per_budget: int = 3) -> IsoFlopFit:
    """Chinchilla Approach 2: per compute budget C a parabola of loss in ln N; power laws through the minima.

    ``runs`` are mappings or objects with N, D, L and optionally C (the nominal budget, used to group runs;
    when absent C = 6 N D). D_opt = C / (6 N_opt) as in the paper.
    """
    runs = list(runs)
    has_c = bool(runs) and all((("C" in r) if isinstance(r, Mapping) else hasattr(r, "C")) for r in runs)
    N = [_run_field(r, "N", i) for i, r in enumerate(runs)]
    D = [_run_field(r, "D", i) for i, r in enumerate(runs)]
    L = [_run_field(r, "L", i) for i, r in enumerate(runs)]
    C = [_run_field(r, "C", i) for i, r in enumerate(runs)] if has_c else [6 * n * d for n, d in zip(N, D)]
    cols = check_runs(N=N, D=D, L=L, C=C)
    # Budgets are grouped after rounding to 3 significant digits so 6ND computed in float still groups.
    keys = np.array([float(f"{c:.3g}") for c in cols["C"]])
    profiles = []
    for key in np.unique(keys):
        idx = np.flatnonzero(keys == key)
        lnN = np.log(cols["N"][idx])
        if np.unique(lnN).size < min_per_budget:
            raise ValueError(f"compute budget C={key:.3g} has {np.unique(lnN).size} distinct model sizes; "
                             f"a parabola needs at least {min_per_budget} (runs {idx.tolist()})")
        if _flat(cols["L"][idx]):
            raise ValueError(f"Approach 2: every run at C={key:.3g} has the same loss ({float(cols['L'][idx][0]):.6g}); "
                             f"a flat IsoFLOP profile has no minimum (runs {idx.tolist()}): check that they trained")
        p2, p1, p0 = np.polyfit(lnN, cols["L"][idx], 2)
        if p2 <= 0:
            raise ValueError(f"the IsoFLOP profile at C={key:.3g} is not convex (curvature {p2:.3g}); its "
                             f"minimum is not bracketed by the model sizes (runs {idx.tolist()}): add sizes "
                             "on both sides of the best one")
        ln_opt = -p1 / (2 * p2)
        if not lnN.min() <= ln_opt <= lnN.max():
            warnings.warn(f"the IsoFLOP minimum at C={key:.3g} (N_opt={math.exp(ln_opt):.3g}) lies outside the sampled "
                          f"sizes [{math.exp(lnN.min()):.3g}, {math.exp(lnN.max()):.3g}]: it is extrapolated, not "
                          "bracketed; add sizes on that side", ScalingFitWarning, stacklevel=2)
        Cb = float(np.median(cols["C"][idx]))
        n_opt = math.exp(ln_opt)
        profiles.append(IsoFlopProfile(C=Cb, N_opt=n_opt, D_opt=Cb / (6 * n_opt),
                                       L_min=float(p0 - p1 * p1 / (4 * p2)), coeffs=(float(p2), float(p1), float(p0)),
                                       n_runs=int(idx.size)))
    if len(profiles) < 2:
        raise ValueError(f"Approach 2 needs at least 2 compute budgets to fit N_opt ∝ C^a; got {len(profiles)}")
    Cs = np.array([p.C for p in profiles])
    law = _power_laws(Cs, np.array([p.N_opt for p in profiles]), np.array([p.D_opt for p in profiles]))
    check_allocation("Approach 2", law.a, law.b, {"k_n": law.k_n, "k_d": law.k_d})
    return IsoFlopFit(profiles=profiles, law=law)


@dataclass(frozen=True)
class TrainingCurve:
    """One run's training curve: a model of N parameters evaluated after each token count."""

    N: float
    tokens: Sequence[float]
    loss: Sequence[float]


@dataclass(frozen=True)
class EnvelopeFit:
    """Approach 1 result: the minimum-loss envelope over training curves at each C and its power laws."""

    C: np.ndarray
    N_opt: np.ndarray
    D_opt: np.ndarray
    L_min: np.ndarray
    law: PowerLawFit


def fit_envelope(curves: Iterable[Any], n_points: int = 50, min_cover: int = 2) -> EnvelopeFit:
    """Chinchilla Approach 1: for log-spaced C, the run with the lowest loss at D = C / (6N); fit power laws.

    Each curve is interpolated in ln D; a FLOP value is used only where at least ``min_cover`` curves reach
    it, because where one run alone covers C the 'minimum' is that run by default and biases the slope.
    """
    parsed = []
    for i, c in enumerate(curves):
        N = _run_field(c, "N", i)
        tok = np.asarray(c["tokens"] if isinstance(c, Mapping) else c.tokens, dtype=float)
        loss = np.asarray(c["loss"] if isinstance(c, Mapping) else c.loss, dtype=float)
        cols = check_runs(tokens=tok, loss=loss)
        if N <= 0 or not math.isfinite(N):
            raise ValueError(f"curve {i}: N = {N!r} is not positive")
        if tok.size < 2:
            raise ValueError(f"curve {i} (N={N:.3g}) has {tok.size} points; a training curve needs at least 2")
        order = np.argsort(cols["tokens"])
        parsed.append((N, np.log(cols["tokens"][order]), cols["loss"][order]))
    if parsed and _flat(np.concatenate([l for _, _, l in parsed])):
        raise ValueError(f"Approach 1: the training losses do not vary (every point of every curve is "
                         f"{float(parsed[0][2][0]):.6g}), so no model size can win the envelope; check that the "
                         "runs trained")
    if len({p[0] for p in parsed}) < 2:
        raise ValueError(f"Approach 1 needs training curves of at least 2 model sizes; got {len(parsed)} curve(s)")
    lo = [math.log(6 * N) + t[0] for N, t, _ in parsed]
    hi = [math.log(6 * N) + t[-1] for N, t, _ in parsed]
    grid = np.linspace(min(lo), max(hi), n_points)
    C_out, N_out, L_out = [], [], []
    for lc in grid:
        cands = [(float(np.interp(lc - math.log(6 * N), t, l)), N)
                 for (N, t, l), a, b in zip(parsed, lo, hi) if a - 1e-9 <= lc <= b + 1e-9]
        if len(cands) < min_cover:
            continue
        best_l, best_n = min(cands)
        C_out.append(math.exp(lc))
        N_out.append(best_n)
        L_out.append(best_l)
    if len(set(N_out)) < 2:
        raise ValueError("the loss envelope is won by a single model size at every covered FLOP count; "
                         "Approach 1 needs curves that overlap in compute and cross each other")
    C_a, N_a = np.array(C_out), np.array(N_out, dtype=float)
    D_a = C_a / (6 * N_a)
    law = _power_laws(C_a, N_a, D_a)
    check_allocation("Approach 1", law.a, law.b, {"k_n": law.k_n, "k_d": law.k_d})
    return EnvelopeFit(C=C_a, N_opt=N_a, D_opt=D_a, L_min=np.array(L_out), law=law)


def compute_optimal(C: Any, fit: ParametricFit | PowerLawFit | IsoFlopFit | EnvelopeFit
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal (N_opt, D_opt) at FLOPs C from any fit (Approach 3 formula or Approach 1/2 power laws)."""
    C = np.asarray(C, dtype=float)
    if np.any(~(C > 0)):
        raise ValueError(f"compute budgets must be positive; got {C}")
    if isinstance(fit, ParametricFit):
        a, b = fit.exponents
        return fit.G * (C / 6) ** a, (C / 6) ** b / fit.G
    if isinstance(fit, (IsoFlopFit, EnvelopeFit)):
        fit = fit.law
    if isinstance(fit, PowerLawFit):
        return fit.predict(C)
    raise TypeError(f"compute_optimal takes a ParametricFit, PowerLawFit, IsoFlopFit or EnvelopeFit, not "
                    f"{type(fit).__name__}")
