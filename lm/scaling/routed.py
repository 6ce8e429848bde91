"""The routed-language-model scaling law of Clark et al. 2022 ("Unified Scaling Laws for Routed Language Models").

log10 L = a log10 N + b log10 Ê + c log10 N log10 Ê + d, with N the dense base size and Ê a saturating transform
of the expert count E; the published S-BASE, RL-R and Hash coefficient sets ship as data (re-exported by
lm.scaling.laws).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from lm.scaling.checks import ScalingFitWarning, check_runs

__all__ = ["RoutedCoefficients", "RoutedFit", "ROUTED_COEFFICIENTS", "expert_transform", "routed_loss",
           "effective_params", "routing_cutoff", "fit_routed"]


@dataclass(frozen=True)
class RoutedCoefficients:
    """Clark et al. 2022: log10 L = a log10 N + b log10 Ê + c log10 N log10 Ê + d, Ê saturating in E."""

    a: float
    b: float
    c: float
    d: float
    e_start: float
    e_max: float
    name: str = ""


# Clark et al. 2022, fitted (a, b, c, d, E_start, E_max) per routing method, as listed in lm.md.
ROUTED_COEFFICIENTS: dict[str, RoutedCoefficients] = {
    "s-base": RoutedCoefficients(-0.082, -0.108, 0.009, 1.104, 1.847, 314.478, "S-BASE"),
    "rl-r": RoutedCoefficients(-0.083, -0.126, 0.012, 1.111, 1.880, 469.982, "RL-R"),
    "hash": RoutedCoefficients(-0.087, -0.136, 0.012, 1.157, 4.175, 477.741, "Hash"),
}


def expert_transform(E: Any, e_start: float, e_max: float) -> np.ndarray:
    """Saturating expert count: 1/Ê = 1 / (E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max."""
    if not 0 < e_start < e_max:
        raise ValueError(f"need 0 < E_start < E_max; got E_start={e_start}, E_max={e_max}")
    E = np.asarray(E, dtype=float)
    return 1.0 / (1.0 / (E - 1.0 + 1.0 / (1.0 / e_start - 1.0 / e_max)) + 1.0 / e_max)


def routed_loss(N: Any, E: Any, coeffs: RoutedCoefficients) -> np.ndarray:
    """Loss of a routed model with dense base size N and E experts (E = 1 is the dense model)."""
    lN = np.log10(np.asarray(N, dtype=float))
    lE = np.log10(expert_transform(E, coeffs.e_start, coeffs.e_max))
    return 10.0 ** (coeffs.a * lN + coeffs.b * lE + coeffs.c * lN * lE + coeffs.d)


def effective_params(N: Any, E: Any, coeffs: RoutedCoefficients) -> np.ndarray:
    """N_bar: the dense size with the same loss, L(N_bar, 1) = L(N, E) (solved in closed form)."""
    lN = np.log10(np.asarray(N, dtype=float))
    lE = np.log10(expert_transform(E, coeffs.e_start, coeffs.e_max))
    l1 = math.log10(float(expert_transform(1.0, coeffs.e_start, coeffs.e_max)))
    rhs = coeffs.a * lN + coeffs.b * lE + coeffs.c * lN * lE - coeffs.b * l1
    return 10.0 ** (rhs / (coeffs.a + coeffs.c * l1))


def routing_cutoff(coeffs: RoutedCoefficients) -> float:
    """The N above which more experts raise the loss: d log L / d log Ê = b + c log10 N changes sign."""
    if coeffs.c <= 0:
        return float("inf")
    return 10.0 ** (-coeffs.b / coeffs.c)


@dataclass(frozen=True)
class RoutedFit:
    """fit_routed result: the coefficients, the residual sum of squares in log10 L, and convergence."""

    coeffs: RoutedCoefficients
    rss: float
    converged: bool
    message: str
    n_runs: int


def fit_routed(N: Any, E: Any, L: Any, name: str = "fit") -> RoutedFit:
    """Fit the routed law to runs (N dense size, E experts >= 1, L loss) by least squares on log10 L.

    For fixed (E_start, E_max) the law is linear in (a, b, c, d), so those are solved exactly and only the
    two saturation parameters are searched (from a small grid, then Nelder-Mead in log space).
    """
    cols = check_runs(N=N, E=E, L=L)
    n = cols["N"].size
    if n < 7:
        raise ValueError(f"the routed law has 6 parameters and needs at least 7 runs; got {n}")
    if np.any(cols["E"] < 1):
        i = int(np.flatnonzero(cols["E"] < 1)[0])
        raise ValueError(f"row {i}: E = {cols['E'][i]} experts; E counts experts and must be >= 1 (1 = dense)")
    if np.unique(cols["E"]).size < 3 or np.unique(cols["N"]).size < 2:
        raise ValueError("the routed law needs at least 3 distinct expert counts and 2 distinct base sizes")
    lN, y = np.log10(cols["N"]), np.log10(cols["L"])

    def solve(p: np.ndarray) -> tuple[float, np.ndarray]:
        es = 1.0 + math.exp(p[0])  # E_start > 1 and E_max > E_start by construction
        em = es + math.exp(p[1])
        lE = np.log10(expert_transform(cols["E"], es, em))
        X = np.stack([lN, lE, lN * lE, np.ones_like(lN)], axis=1)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        r = y - X @ coef
        return float(r @ r), coef

    starts = [np.array([math.log(es - 1), math.log(em)]) for es in (1.5, 2.0, 4.0, 8.0) for em in (30, 100, 300, 1000)]
    best = min((optimize.minimize(lambda p: solve(p)[0], s, method="Nelder-Mead",
                                  options={"xatol": 1e-8, "fatol": 1e-16, "maxiter": 4000}) for s in starts),
               key=lambda r: r.fun)
    rss, coef = solve(best.x)
    es = 1.0 + math.exp(best.x[0])
    em = es + math.exp(best.x[1])
    coeffs = RoutedCoefficients(*(float(v) for v in coef), e_start=es, e_max=em, name=name)
    fit = RoutedFit(coeffs=coeffs, rss=rss, converged=bool(best.success), message=str(best.message), n_runs=n)
    if not fit.converged:
        warnings.warn(f"routed-law fit did not converge ({fit.message})", ScalingFitWarning, stacklevel=2)
    return fit
