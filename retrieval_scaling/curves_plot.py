"""The curves figure: the metric against model size, one fitted line per (paradigm, loss, budget) with its
95 % band, the compute-optimal size of each budget and the predictions stored before training; and,
when the sweep has several budgets, the metric against training FLOPs per model size. A panel with
nothing to show is left out."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .curves_summary import budget_label
from .scaling import Fit, Target

COLORS = {"sparse": "Reds", "dense": "Blues"}
MARKERS = {"cl": "o", "kd": "s", "cl_kd": "^", "kl": "D"}
STYLES = {"cl": "-", "kd": "--", "cl_kd": ":", "kl": "-."}


def _color(paradigm: str, budget: float, budgets: Sequence[float]):
    import matplotlib

    shade = 0.75 if len(budgets) == 1 else 0.45 + 0.5 * budgets.index(budget) / (len(budgets) - 1)
    return matplotlib.colormaps[COLORS.get(paradigm, "Greys")](shade)


def _size_panel(ax, lines: Mapping, optima: Mapping, judged: Sequence[Mapping], target: Target) -> None:
    budgets = sorted({b for _, _, b in lines})
    for (paradigm, loss, budget), entry in lines.items():
        color, marker = _color(paradigm, budget, budgets), MARKERS.get(loss, "x")
        label = f"{paradigm} {loss}" + (f" @ {budget_label(budget)}" if len(budgets) > 1 else "")
        x = np.array([p["params_non_embedding"] for p in entry["points"]])
        y = np.array([p["metric"] for p in entry["points"]])
        fit: Fit | None = entry["fit"]
        if fit is None:
            ax.scatter(x, y, color=color, marker=marker, label=f"{label} ({entry['why']})")
            continue
        ci = f", α 95% [{fit.alpha_ci[0]:.2f}, {fit.alpha_ci[1]:.2f}]" if fit.alpha_ci else ""
        ax.scatter(x, y, color=color, marker=marker, label=f"{label}: α={fit.alpha:.2f}{ci}")
        grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        ax.plot(grid, target.metric(fit.predict(grid)), color=color, linestyle=STYLES.get(loss, "-"))
        band = fit.band(grid)
        if band is not None:
            ends = np.sort(np.stack([target.metric(band[0]), target.metric(band[1])]), axis=0)
            ax.fill_between(grid, ends[0], ends[1], color=color, alpha=0.12)
    for (paradigm, loss), rows in optima.items():
        for r in rows:
            fit = lines[paradigm, loss, r["budget"]]["fit"]
            if fit is not None:
                ax.scatter([r["size"]], target.metric(fit.predict([r["size"]])), marker="*", s=260, zorder=5,
                           color=_color(paradigm, r["budget"], budgets), edgecolor="black")
    if optima:
        ax.scatter([], [], marker="*", s=160, color="white", edgecolor="black", label="compute-optimal size")
    for p in judged:
        if p["low"] is not None:
            ax.errorbar([p["x"]], [p["predicted"]], yerr=[[p["predicted"] - p["low"]], [p["high"] - p["predicted"]]],
                        fmt="D", mfc="none", color="black", capsize=4, zorder=6)
    if judged:
        ax.scatter([], [], marker="D", facecolor="none", edgecolor="black", label="predicted before training (95%)")
    ax.set_xlabel("non-embedding parameters")
    ax.set_title(f"metric vs model size (law: {target.law}; 95% band)", fontsize=9)


def _flops_panel(ax, lines: Mapping) -> None:
    import matplotlib

    series: dict[tuple[str, str, str], list] = defaultdict(list)
    for (paradigm, loss, _), entry in lines.items():
        for p in entry["points"]:
            series[paradigm, loss, p["model"]].append((p["flops"], p["metric"]))
    sizes = sorted({(p["params_non_embedding"], p["model"]) for e in lines.values() for p in e["points"]})
    rank = {model: i for i, (_, model) in enumerate(sizes)}
    for (paradigm, loss, model), pts in sorted(series.items(), key=lambda kv: (kv[0][:2], rank[kv[0][2]])):
        pts.sort()
        shade = 0.35 + 0.6 * rank[model] / max(len(sizes) - 1, 1)  # darker: larger
        ax.plot(*zip(*pts, strict=True), marker=MARKERS.get(loss, "x"), linestyle=STYLES.get(loss, "-"),
                color=matplotlib.colormaps[COLORS.get(paradigm, "Greys")](shade), label=f"{model} {paradigm} {loss}")
        ax.annotate(model, pts[-1], textcoords="offset points", xytext=(4, 0), fontsize=7)
    ax.set_xlabel("training FLOPs")
    ax.set_title("metric vs training FLOPs, per model size", fontsize=9)


def plot(lines: Mapping, optima: Mapping, judged: Sequence[Mapping], target: Target, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several_budgets = len({b for _, _, b in lines}) > 1
    fig, axes = plt.subplots(1, 2 if several_budgets else 1, figsize=(13 if several_budgets else 7.5, 5.2),
                             constrained_layout=True, squeeze=False)
    _size_panel(axes[0][0], lines, optima, judged, target)
    if several_budgets:
        _flops_panel(axes[0][1], lines)
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_ylabel(target.name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: never over a curve
    fig.savefig(out, dpi=130)
    plt.close(fig)
