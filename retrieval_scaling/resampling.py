"""Bootstrap replicates of a line of cells, and what they give: fits with intervals, predictions of
sizes not trained yet, the leave-largest-out check, and the compute-optimal size of a budget.

The cells of a line are scored on the same queries, so one replicate draws one resample of the
queries for every cell (paired: a hard query is hard for all of them); a size trained with several
seeds also has its seeds resampled. Cells that kept no per-query values are resampled whole, which
says little with one cell per size (`scaling.fit_scaling_law` notes it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .scaling import Fit, Target, fit_scaling_law

LEVEL = 95.0


@dataclass
class Cell:
    """One trained cell of a line: its size, its metric and, when kept, the per-query values behind it
    (one array per collection averaged into the metric, aligned across the line's cells)."""

    x: float
    value: float
    per_query: list[np.ndarray] | None = None
    seed: str = ""


def paired(cells: Sequence[Cell]) -> bool:
    """Whether every cell kept per-query values over the same queries."""
    first = cells[0].per_query if cells else None
    return bool(first) and all(c.per_query is not None and [len(a) for a in c.per_query] == [len(a) for a in first]
                               for c in cells)


def replicates(cells: Sequence[Cell], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(x, metric) of `n` replicates, each an (n, cells) array, and how they were drawn."""
    rng = np.random.default_rng(seed)
    x = np.array([c.x for c in cells], dtype=float)
    if paired(cells):
        values = np.zeros((n, len(cells)))
        members = len(cells[0].per_query)
        for j in range(members):
            table = np.stack([c.per_query[j] for c in cells])  # (cells, queries)
            q = table.shape[1]
            weights = np.stack([np.bincount(rng.integers(0, q, q), minlength=q) for _ in range(n)]) / q
            values += (weights @ table.T) / members
        mode = "queries"
    else:
        values = np.tile([c.value for c in cells], (n, 1)).astype(float)
        mode = "cells"
    rows = np.tile(np.arange(len(cells)), (n, 1))
    groups = defaultdict(list)
    for i, c in enumerate(cells):
        groups[c.x if mode == "queries" else 0.0].append(i)
    for members_at in groups.values():  # seeds of a size (or, unpaired, every cell) drawn with replacement
        if len(members_at) > 1:
            rows[:, members_at] = rng.choice(members_at, size=(n, len(members_at)))
            if mode == "queries":
                mode = "queries and seeds"
    return x[rows], np.take_along_axis(values, rows, axis=1), mode


def fit_line(cells: Sequence[Cell], target: Target, bootstrap: int, seed: int = 0) -> tuple[Fit, str]:
    """The law of a line, its interval drawn from `replicates`; (fit, how the replicates were drawn)."""
    x = np.array([c.x for c in cells], dtype=float)
    e = target.error([c.value for c in cells])
    xb, mb, mode = replicates(cells, bootstrap, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        resamples = list(zip(xb, target.error(mb), strict=True)) if bootstrap else None
    fit = fit_scaling_law(x, e, resamples=resamples)
    if mode == "cells":
        fit.notes.append("no per-query values: the interval resamples whole cells")
    return fit, mode


def residuals(fit: Fit, cells: Sequence[Cell], target: Target) -> dict:
    """Observed − fitted metric per cell, and their root mean square."""
    fitted = target.metric(fit.predict([c.x for c in cells]))
    res = [float(c.value - f) for c, f in zip(cells, fitted, strict=True)]
    return {"per_cell": [{"x": c.x, "seed": c.seed, "observed": c.value, "fitted": float(f), "residual": r}
                         for c, f, r in zip(cells, fitted, res, strict=True)],
            "rmse": float(np.sqrt(np.mean(np.square(res))))}


def measurement_noise(cells: Sequence[Cell], bootstrap: int, seed: int = 0) -> np.ndarray | None:
    """Replicate deviations of the largest size's mean metric: how much one more cell's measurement
    moves with its queries (and seeds), borrowed for a size not yet trained."""
    if not paired(cells):
        return None
    _, mb, _ = replicates(cells, bootstrap, seed + 1)
    top = [i for i, c in enumerate(cells) if c.x == max(c.x for c in cells)]
    return mb[:, top].mean(axis=1) - np.mean([cells[i].value for i in top])


def predict(fit: Fit, target: Target, x_new: float, noise: np.ndarray | None = None, seed: int = 0) -> dict:
    """The metric the law gives at `x_new`, with a 95 % interval: the fit's replicates, plus the
    measurement noise of one cell when known, kept inside the metric's range."""
    point = float(target.clip(target.metric(fit.predict([x_new])))[0])
    out = {"x": float(x_new), "predicted": point, "low": None, "high": None}
    if len(fit.samples) < 20:
        return out
    alpha, amp, floor = np.array(fit.samples).T
    draws = target.metric(floor + amp * float(x_new) ** (-alpha))
    draws = draws[np.isfinite(draws)]
    if len(draws) < 20:
        return out
    if noise is not None and len(noise):
        draws = draws + np.random.default_rng(seed).choice(noise, size=len(draws))
    tail = (100 - LEVEL) / 2
    low, high = np.percentile(target.clip(draws), [tail, 100 - tail])
    out.update(low=float(low), high=float(high))
    return out


def leave_largest_out(cells: Sequence[Cell], target: Target, bootstrap: int, seed: int = 0) -> dict:
    """Fit on every size but the largest, predict the largest, compare with what it measured."""
    sizes = sorted({c.x for c in cells})
    if len(sizes) < 3:
        return {"why": f"{len(sizes)} sizes: the check needs 3 (fit on 2, predict the third)"}
    known = [c for c in cells if c.x < sizes[-1]]
    held = [c for c in cells if c.x == sizes[-1]]
    fit, _ = fit_line(known, target, bootstrap, seed)
    out = predict(fit, target, sizes[-1], measurement_noise(known, bootstrap, seed), seed)
    observed = float(np.mean([c.value for c in held]))
    out.update(observed=observed, error=observed - out["predicted"], fitted_on=sizes[:-1])
    out["covered"] = None if out["low"] is None else bool(out["low"] <= observed <= out["high"])
    return out


def best_size(x: np.ndarray, metric: np.ndarray, higher_better: bool) -> float:
    """The compute-optimal size of one budget: the vertex of a parabola in log size through the
    means per size when it is a peak inside the sizes tried, else the best size tried."""
    sizes = np.unique(x)
    means = np.array([metric[x == s].mean() for s in sizes])
    sign = 1.0 if higher_better else -1.0
    best = float(sizes[np.argmax(sign * means)])
    if len(sizes) < 3:
        return best
    a, b, _ = np.polyfit(np.log(sizes), sign * means, 2)
    if a >= 0:
        return best
    vertex = -b / (2 * a)
    return float(np.exp(vertex)) if np.log(sizes[0]) <= vertex <= np.log(sizes[-1]) else best


def compute_optimal(cells: Sequence[Cell], target: Target, bootstrap: int, seed: int = 0) -> dict:
    """The compute-optimal size of one budget's cells, with a 95 % interval over replicates."""
    x = np.array([c.x for c in cells], dtype=float)
    point = best_size(x, np.array([c.value for c in cells]), target.bounded)
    out = {"size": point, "low": None, "high": None, "sizes_tried": sorted(set(x.tolist()))}
    if bootstrap:
        xb, mb, _ = replicates(cells, bootstrap, seed)
        optima = [best_size(xr, mr, target.bounded) for xr, mr in zip(xb, mb, strict=True)
                  if len(np.unique(xr)) == len(out["sizes_tried"])]
        if len(optima) >= 20:
            low, high = np.exp(np.percentile(np.log(optima), [(100 - LEVEL) / 2, (100 + LEVEL) / 2]))
            out.update(low=float(low), high=float(high))
    out["at_edge"] = point in (out["sizes_tried"][0], out["sizes_tried"][-1])
    return out


def synthetic_line(rng: np.random.Generator, sizes: Sequence[float], *, target: Target, E: float, A: float,
                   alpha: float, queries: int = 300, seeds: int = 1) -> list[Cell]:
    """Cells on a known law, for checking the intervals' coverage (tests, bench/extrapolation.py): each
    size's mean metric follows it exactly, and every cell scores the same queries, whose shared difficulty
    (sd 0.15) plus the cell's own noise (sd 0.05) make the per-query values."""
    difficulty = rng.normal(0, 0.15, queries)
    cells = []
    for n in sizes:
        mean = float(target.metric(E + A * n ** -alpha))
        for s in range(seeds):
            values = mean + difficulty + rng.normal(0, 0.05, queries)
            cells.append(Cell(float(n), float(values.mean()), [values], str(s)))
    return cells
