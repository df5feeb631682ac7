"""Scaling-law fits: a saturating power law per line, Huber loss on logs, bootstrap intervals.

The quantity fitted is an *error* that falls with scale, e = 1 − metric for a metric in [0, 1] such as
nDCG@10: e(x) = E + A·x^(−α), x the non-embedding parameters (or training FLOPs), E ≥ 0 the
irreducible error, α the exponent. As in Hoffmann et al. (2022), the fit minimises a Huber loss of
log-residuals, log e − log(E + A·x^−α), from a grid of starting points (L-BFGS).

Three parameters need more than three distinct x: with three sizes (the paper's grid) the saturating
law interpolates any three points, so the fit falls back to a pure power law (E = 0) and says so.
The exponent's 95 % interval comes from a bootstrap over the points (replicates — seeds — included);
with one point per size it is wide, and the summary says when it cannot pin the exponent down.
Percentile intervals from few points run narrow: on 20 synthetic points (5 sizes × 4 seeds, 1 %
noise) the 95 % interval held the true exponent in 16 of 20 draws.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

HUBER_DELTA = 0.05  # on log-residuals: quadratic up to ~5 % relative error, linear (robust) beyond


@dataclass
class Fit:
    """A fitted law e(x) = E + A·x^(−α) and what can be said of it."""

    alpha: float
    A: float
    E: float
    saturating: bool  # False: E fixed at 0 (too few distinct x for three parameters)
    n_points: int
    n_sizes: int
    alpha_ci: tuple[float, float] | None = None
    bootstrap_samples: int = 0
    notes: list[str] = field(default_factory=list)
    samples: list[tuple[float, float, float]] = field(default_factory=list, repr=False)  # bootstrap (α, A, E)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** (-self.alpha)

    def band(self, x: np.ndarray, level: float = 95.0) -> tuple[np.ndarray, np.ndarray] | None:
        """Pointwise bootstrap interval of the fitted curve at `x`."""
        if len(self.samples) < 20:
            return None
        x = np.asarray(x, dtype=float)
        curves = np.array([E + A * x ** (-alpha) for alpha, A, E in self.samples])
        tail = (100 - level) / 2
        return np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("samples")
        return out


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _objective(theta: np.ndarray, logx: np.ndarray, loge: np.ndarray, saturating: bool) -> float:
    # theta = (a, alpha, b) with A = e^a, E = e^b: log(E + A x^-α) = logsumexp(a − α log x, b)
    a, alpha = theta[0], theta[1]
    terms = a - alpha * logx
    pred = np.logaddexp(terms, theta[2]) if saturating else terms
    return float(_huber(loge - pred).sum())


def _fit_once(x: np.ndarray, e: np.ndarray, saturating: bool,
              start: np.ndarray | None = None) -> tuple[np.ndarray, float, float, float]:
    """(θ, α, A, E) of the best fit from a grid of starting points (or from `start` alone)."""
    from scipy.optimize import minimize

    logx, loge = np.log(x), np.log(e)
    if start is not None:
        starts = [start]
    else:
        # α0 spans flat to steep; a0 puts A·x^-α near the data at the mean size; b0 below the lowest error
        starts = [np.array([loge.max() + alpha0 * logx.mean(), alpha0, b0])
                  for alpha0, b0 in itertools.product((0.0, 0.1, 0.3, 0.6, 1.0),
                                                       (loge.min() - 3, loge.min() - 1, loge.min() - 0.1))
                  if saturating or b0 == loge.min() - 3]
    best, best_val = starts[0], math.inf
    for theta0 in starts:
        res = minimize(_objective, theta0, args=(logx, loge, saturating), method="L-BFGS-B",
                       options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})  # the α–E valley is flat
        if res.fun < best_val:
            best, best_val = res.x, res.fun
    a, alpha, b = best
    return best, float(alpha), float(math.exp(a)), float(math.exp(b)) if saturating else 0.0


def fit_scaling_law(x, error, bootstrap: int = 1000, seed: int = 0) -> Fit:
    """Fit e(x) = E + A·x^(−α) to positive errors; bootstrap the exponent's 95 % interval."""
    x, e = np.asarray(x, dtype=float), np.asarray(error, dtype=float)
    if x.shape != e.shape or x.ndim != 1:
        raise ValueError("x and error must be 1-D arrays of the same length")
    if np.any(x <= 0) or np.any(e <= 0):
        raise ValueError("scaling fits need positive x and positive errors (1 − metric > 0)")
    sizes = len(np.unique(x))
    if sizes < 2:
        raise ValueError(f"a scaling law needs at least two distinct sizes, got {sizes}")
    saturating = sizes >= 4
    notes = []
    if not saturating:
        notes.append(f"{sizes} sizes cannot pin down a saturating law (3 parameters): fitted a pure power "
                     "law, E = 0")
    theta, alpha, amp, floor = _fit_once(x, e, saturating)
    fit = Fit(alpha=alpha, A=amp, E=floor, saturating=saturating, n_points=len(x), n_sizes=sizes, notes=notes)
    if bootstrap:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(x), len(x))
            if len(np.unique(x[idx])) < 2:  # a resample with one size says nothing about the slope
                continue
            # from the full fit's optimum: a resample is a small perturbation of the data
            samples.append(_fit_once(x[idx], e[idx], saturating and len(np.unique(x[idx])) >= 4, theta)[1:])
        fit.samples = samples
        alphas = [a for a, _, _ in samples]
        fit.bootstrap_samples = len(alphas)
        if len(alphas) >= 20:
            lo, hi = np.percentile(alphas, [2.5, 97.5])
            fit.alpha_ci = (float(lo), float(hi))
        if len(x) <= sizes:
            notes.append(f"one point per size ({sizes} in all): the interval reflects which sizes a resample "
                         "drew, not seed noise; run more seeds for an honest interval")
        if fit.alpha_ci is None:
            notes.append("too few usable bootstrap resamples for an interval")
        elif fit.alpha_ci[0] <= 0 <= fit.alpha_ci[1]:
            notes.append("the interval includes 0: no evidence that this line scales")
    return fit
