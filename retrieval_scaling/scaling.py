"""Scaling-law fits: a saturating power law per line, Huber loss on logs, bootstrap intervals.

The quantity fitted is an *error* that falls with scale: e(x) = E + A·x^(−α), x the non-embedding
parameters, E ≥ 0 the irreducible error, α the exponent. A `Target` says how a metric maps to its
error and back, so that a prediction stays inside the metric's range: a loss (contrastive entropy,
≥ 0) is its own error; a score in [0, 1] (nDCG, MRR, recall) is fitted as the odds of missing it,
(1 − m)/m, whose law maps back to m = 1/(1 + e) ∈ (0, 1) at every x. As in Hoffmann et al. (2022),
the fit minimises a Huber loss of log-residuals, log e − log(E + A·x^−α), from a grid of starting
points (L-BFGS).

Three parameters need more than three distinct x: with three sizes (the paper's grid) the saturating
law interpolates any three points, so the fit falls back to a pure power law (E = 0) and says so.
Intervals come from bootstrap replicates of the data: `resampling` draws them from per-query values
(and seeds) when the cells kept them; otherwise the points themselves are resampled here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

HUBER_DELTA = 0.05  # on log-residuals: quadratic up to ~5 % relative error, linear (robust) beyond


@dataclass(frozen=True)
class Target:
    """How a metric maps to the error a law is fitted to, and back."""

    name: str
    bounded: bool  # True: a score in [0, 1], higher is better; False: a loss ≥ 0, lower is better

    def error(self, metric: np.ndarray) -> np.ndarray:
        m = np.asarray(metric, dtype=float)
        if not self.bounded:
            return m
        with np.errstate(divide="ignore"):
            return (1.0 - m) / m

    def metric(self, error: np.ndarray) -> np.ndarray:
        e = np.asarray(error, dtype=float)
        return 1.0 / (1.0 + e) if self.bounded else e

    def clip(self, metric: np.ndarray) -> np.ndarray:
        return np.clip(metric, 0.0, 1.0) if self.bounded else np.clip(metric, 0.0, None)

    @property
    def law(self) -> str:
        return "(1 - m)/m = E + A*N^-alpha" if self.bounded else "m = E + A*N^-alpha"


def fittable(errors) -> np.ndarray:
    """Which errors a law can be fitted to: finite and above 0. A score of exactly 0 has infinite odds
    of missing, a score of 1 none; a log-log fit sees neither."""
    errors = np.asarray(errors, dtype=float)
    return np.isfinite(errors) & (errors > 0)


def target_for(metric: str) -> Target:
    """A contrastive entropy is a loss; every other metric we log per collection is a score in [0, 1]."""
    leaf = metric.rsplit("/", 1)[-1]
    return Target(metric, bounded=not leaf.startswith("contrastive_entropy"))


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


def _objective(theta: np.ndarray, logx: np.ndarray, loge: np.ndarray, saturating: bool) -> tuple[float, np.ndarray]:
    """The Huber loss of log-residuals and its gradient in θ = (a, α, b), A = e^a, E = e^b:
    log(E + A x^-α) = logaddexp(a − α log x, b)."""
    a, alpha = theta[0], theta[1]
    terms = a - alpha * logx
    pred = np.logaddexp(terms, theta[2]) if saturating else terms
    r = loge - pred
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r
    share = np.exp(terms - pred) if saturating else np.ones_like(terms)  # d pred / d a
    grad = np.array([-(psi * share).sum(), (psi * share * logx).sum(),
                     -(psi * np.exp(theta[2] - pred)).sum() if saturating else 0.0])
    return float(_huber(r).sum()), grad


def _power_law(logx: np.ndarray, loge: np.ndarray, iterations: int = 100) -> np.ndarray:
    """θ = (a, α, ·) of log e = a − α·log x under the Huber loss, by iteratively reweighted least squares
    (the M-estimator's own algorithm): each step a 2-parameter weighted fit, exact where L-BFGS crawls."""
    u = logx - logx.mean()  # centred: the 2×2 normal equations stay well conditioned
    weights, coef = np.ones_like(logx), np.zeros(2)
    for _ in range(iterations):
        sw, swu, swuu = weights.sum(), weights @ u, weights @ (u * u)
        swy, swuy = weights @ loge, weights @ (u * loge)
        det = sw * swuu - swu * swu
        slope = (sw * swuy - swu * swy) / det if det > 0 else 0.0
        new_coef = np.array([(swy - slope * swu) / sw, slope])
        r = np.abs(loge - new_coef[0] - slope * u)
        weights = np.where(r <= HUBER_DELTA, 1.0, HUBER_DELTA / np.maximum(r, 1e-300))
        if np.abs(new_coef - coef).max() < 1e-13:
            break
        coef = new_coef
    # log e = c + slope·(log x − mean) = (c − slope·mean) − α·log x with α = −slope
    return np.array([new_coef[0] - new_coef[1] * logx.mean(), -new_coef[1], 0.0])


def _fit_once(x: np.ndarray, e: np.ndarray, saturating: bool,
              start: np.ndarray | None = None) -> tuple[np.ndarray, float, float, float]:
    """(θ, α, A, E) of the best fit from a grid of starting points (or from `start` alone)."""
    from scipy.optimize import minimize

    logx, loge = np.log(x), np.log(e)
    if not saturating:
        theta = _power_law(logx, loge)
        return theta, float(theta[1]), float(math.exp(theta[0])), 0.0
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
        res = minimize(_objective, theta0, args=(logx, loge, saturating), method="L-BFGS-B", jac=True,
                       options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})  # the α–E valley is flat
        if res.fun < best_val:
            best, best_val = res.x, res.fun
    a, alpha, b = best
    return best, float(alpha), float(math.exp(a)), float(math.exp(b)) if saturating else 0.0


def fit_scaling_law(x, error, bootstrap: int = 1000, seed: int = 0, resamples=None) -> Fit:
    """Fit e(x) = E + A·x^(−α) to positive errors; bootstrap the exponent's 95 % interval.
    `resamples`: replicates (x_b, e_b) of the data (`resampling.replicates`); None resamples the points."""
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
    if resamples is None and bootstrap:
        rng = np.random.default_rng(seed)
        resamples = [(x[idx], e[idx]) for idx in (rng.integers(0, len(x), len(x)) for _ in range(bootstrap))]
        if len(x) <= sizes:
            notes.append(f"one point per size ({sizes} in all): the interval reflects which sizes a resample "
                         "drew, not seed noise; run more seeds, or keep per-query metrics, for an honest interval")
    if resamples is not None:
        samples = []
        for xb, eb in resamples:
            xb, eb = np.asarray(xb, dtype=float), np.asarray(eb, dtype=float)
            # one size says nothing of the slope; a replicate whose queries all scored 0 has infinite odds
            if len(np.unique(xb)) < 2 or not fittable(eb).all():
                continue
            # from the full fit's optimum: a resample is a small perturbation of the data
            samples.append(_fit_once(xb, eb, saturating and len(np.unique(xb)) >= 4, theta)[1:])
        fit.samples = samples
        alphas = [a for a, _, _ in samples]
        fit.bootstrap_samples = len(alphas)
        if len(alphas) >= 20:
            lo, hi = np.percentile(alphas, [2.5, 97.5])
            fit.alpha_ci = (float(lo), float(hi))
        if fit.alpha_ci is None:
            notes.append("too few usable bootstrap resamples for an interval")
        elif fit.alpha_ci[0] <= 0 <= fit.alpha_ci[1]:
            notes.append("the interval includes 0: no evidence that this line scales")
    return fit
