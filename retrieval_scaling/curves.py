"""`python -m retrieval_scaling.curves sweep=<name>` — scaling curves, fits and the paper's findings.

Gathers the sweep's finished cells from MLflow, plots a metric against model size (non-embedding
parameters) and against training FLOPs for every (paradigm, loss) line, fits a scaling law per line
(`scaling.fit_scaling_law`: the error 1 − metric as E + A·N^−α, bootstrap interval on α), and writes
`sweeps/<name>/curves/`: `scaling.png`, `points.csv`, `fits.json`, `summary.md` (with the paper's three
findings and what this sweep says of each). The files are logged to the sweep's parent run.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .scaling import Fit, fit_scaling_law

DEFAULTS = {"sweep": None, "metric": "scifact/ndcg_10", "root": None, "uri": None, "bootstrap": "1000", "seed": "0"}
USAGE = ("usage: python -m retrieval_scaling.curves sweep=<name> [metric=scifact/ndcg_10] [root=sweeps] "
         "[uri=<tracking uri>] [bootstrap=1000] [seed=0]")


def gather_points(uri: str, sweep: str, metric: str) -> list[dict[str, Any]]:
    """One row per FINISHED cell run of the sweep that logged `metric`."""
    from .tracking import cell_runs

    rows = []
    for cell, run in cell_runs(uri, sweep).items():
        if run.info.status != "FINISHED" or metric not in run.data.metrics:
            continue
        tags, params = run.data.tags, run.data.params
        if "params_non_embedding" not in params or "flops_total" not in params:
            continue
        rows.append({"cell_id": cell, "model": tags.get("model"), "paradigm": tags.get("paradigm"),
                     "loss": tags.get("loss"), "seed": params.get("seed", ""),
                     "params_non_embedding": float(params["params_non_embedding"]),
                     "flops": float(params["flops_total"]), "metric": float(run.data.metrics[metric])})
    return sorted(rows, key=lambda r: (r["paradigm"], r["loss"], r["params_non_embedding"], r["seed"]))


def fit_lines(points: Sequence[Mapping[str, Any]], bootstrap: int, seed: int) -> dict[tuple[str, str], dict]:
    """(paradigm, loss) → {"points": [...], "fit": Fit | None, "why": reason when no fit}."""
    lines: dict[tuple[str, str], list] = defaultdict(list)
    for p in points:
        lines[p["paradigm"], p["loss"]].append(p)
    out = {}
    for key, pts in sorted(lines.items()):
        sizes = {p["params_non_embedding"] for p in pts}
        errors = [1.0 - p["metric"] for p in pts]
        entry: dict[str, Any] = {"points": pts, "fit": None, "why": None}
        if len(sizes) < 2:
            entry["why"] = f"{len(sizes)} size: nothing to fit"
        elif min(errors) <= 0:
            entry["why"] = "a metric of 1: the error is 0, its log undefined"
        else:
            entry["fit"] = fit_scaling_law([p["params_non_embedding"] for p in pts], errors, bootstrap, seed)
        out[key] = entry
    return out


def plot(lines: Mapping[tuple[str, str], Mapping], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (by_size, by_flops) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    colors = {"sparse": "tab:red", "dense": "tab:blue"}
    markers = {"cl": "o", "kd": "s", "cl_kd": "^", "kl": "D"}
    styles = {"cl": "-", "kd": "--", "cl_kd": ":", "kl": "-."}
    for (paradigm, loss), entry in lines.items():
        pts = entry["points"]
        color, marker = colors.get(paradigm, "gray"), markers.get(loss, "x")
        label = f"{paradigm} {loss}"
        x = np.array([p["params_non_embedding"] for p in pts])
        y = np.array([p["metric"] for p in pts])
        by_flops.scatter([p["flops"] for p in pts], y, color=color, marker=marker, label=label)
        fit: Fit | None = entry["fit"]
        if fit is None:
            by_size.scatter(x, y, color=color, marker=marker, label=f"{label} ({entry['why']})")
            continue
        ci = f", α 95% [{fit.alpha_ci[0]:.2f}, {fit.alpha_ci[1]:.2f}]" if fit.alpha_ci else ""
        by_size.scatter(x, y, color=color, marker=marker, label=f"{label}: α={fit.alpha:.2f}{ci}")
        grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        by_size.plot(grid, 1 - fit.predict(grid), color=color, linestyle=styles.get(loss, "-"))
        band = fit.band(grid)
        if band is not None:
            by_size.fill_between(grid, 1 - band[1], 1 - band[0], color=color, alpha=0.12)
    for ax, xlabel in ((by_size, "non-embedding parameters"), (by_flops, "training FLOPs")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
    by_size.set_title("metric vs model size (fit: 1 − metric = E + A·N^−α, 95% bootstrap band)")
    by_flops.set_title("metric vs training FLOPs")
    by_size.legend(fontsize=7)
    by_flops.legend(fontsize=7)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def _verdict_scales(fit: Fit | None) -> str:
    if fit is None or fit.alpha_ci is None:
        return "undetermined (no interval)"
    lo, hi = fit.alpha_ci
    if lo > 0:
        return f"scales (α {fit.alpha:.2f}, 95% [{lo:.2f}, {hi:.2f}])"
    if hi < 0:
        return f"gets worse with size (α {fit.alpha:.2f}, 95% [{lo:.2f}, {hi:.2f}])"
    return f"not shown (α {fit.alpha:.2f}, 95% [{lo:.2f}, {hi:.2f}] includes 0)"


def findings(lines: Mapping[tuple[str, str], Mapping]) -> list[dict[str, str]]:
    """The paper's three findings and what this sweep's lines say of each."""
    def line(paradigm: str, loss: str):
        return lines.get((paradigm, loss), {}).get("fit")

    cl = "; ".join(f"{p}: {_verdict_scales(line(p, 'cl'))}" for p in ("sparse", "dense") if (p, "cl") in lines)
    kd = "; ".join(f"{p}: {_verdict_scales(line(p, 'kd'))}" for p in ("sparse", "dense") if (p, "kd") in lines)
    # sparse ahead: compare mean metric per (loss, size) where both paradigms have points
    means: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for (paradigm, loss), entry in lines.items():
        for p in entry["points"]:
            means[paradigm, loss, p["params_non_embedding"]].append(p["metric"])
    pairs = [(loss, n) for (par, loss, n) in means if par == "sparse" and ("dense", loss, n) in means]
    ahead = [(loss, n) for loss, n in pairs
             if sum(means["sparse", loss, n]) / len(means["sparse", loss, n])
             > sum(means["dense", loss, n]) / len(means["dense", loss, n])]
    sparse = (f"sparse ahead in {len(ahead)} of {len(pairs)} (loss, size) pairs" if pairs
              else "undetermined (no pair of sparse and dense cells)")
    return [
        {"finding": "1. clear scaling with model size under CL", "paper": "yes", "this sweep": cl or "no CL lines"},
        {"finding": "1b. KD about flat across sizes", "paper": "yes",
         "this sweep": (kd or "no KD lines") + " — flat if the interval includes 0"},
        {"finding": "2. sparse beats dense", "paper": "yes", "this sweep": sparse},
    ]


def summary_markdown(sweep: str, metric: str, lines: Mapping, found: Sequence[Mapping[str, str]]) -> str:
    out = [f"# Scaling curves of sweep `{sweep}` — {metric}", "",
           "| finding | paper | this sweep |", "|---|---|---|"]
    out += [f"| {f['finding']} | {f['paper']} | {f['this sweep']} |" for f in found]
    out += ["", "| paradigm | loss | points | sizes | α | 95% interval | E | notes |",
            "|---|---|---|---|---|---|---|---|"]
    for (paradigm, loss), entry in lines.items():
        fit: Fit | None = entry["fit"]
        sizes = len({p["params_non_embedding"] for p in entry["points"]})
        if fit is None:
            out.append(f"| {paradigm} | {loss} | {len(entry['points'])} | {sizes} | – | – | – | {entry['why']} |")
            continue
        ci = f"[{fit.alpha_ci[0]:.3f}, {fit.alpha_ci[1]:.3f}]" if fit.alpha_ci else "–"
        out.append(f"| {paradigm} | {loss} | {fit.n_points} | {fit.n_sizes} | {fit.alpha:.3f} | {ci} | "
                   f"{fit.E:.3f} | {'; '.join(fit.notes)} |")
    return "\n".join(out) + "\n"


def write_curves(uri: str, sweep: str, metric: str, out_dir: Path, bootstrap: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Gather, fit, plot and write; returns {"points", "lines", "findings", "files"}."""
    from .errors import UserError

    points = gather_points(uri, sweep, metric)
    if not points:
        raise UserError(f"sweep '{sweep}': no FINISHED cell with metric '{metric}' in {uri}. Run the sweep "
                        "first, or name another metric (metric=<collection>/<measure>).")
    lines = fit_lines(points, bootstrap, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "points.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    fits = {f"{p}/{lo}": (e["fit"].to_dict() if e["fit"] else {"why": e["why"]}) for (p, lo), e in lines.items()}
    (out_dir / "fits.json").write_text(json.dumps({"metric": metric, "x": "params_non_embedding",
                                                   "law": "1 - metric = E + A * x^-alpha", "lines": fits},
                                                  indent=2))
    plot(lines, metric, out_dir / "scaling.png")
    found = findings(lines)
    (out_dir / "summary.md").write_text(summary_markdown(sweep, metric, lines, found))
    files = [out_dir / n for n in ("scaling.png", "points.csv", "fits.json", "summary.md")]
    return {"points": points, "lines": lines, "findings": found, "files": files}


def log_to_parent(uri: str, sweep: str, files: Sequence[Path]) -> str | None:
    from .tracking import find_parent_run
    from .tracking_client import client

    c = client(uri)
    exp = c.get_experiment_by_name(sweep)
    parent = find_parent_run(c, exp.experiment_id) if exp else None
    if parent is None:
        return None
    for f in files:
        c.log_artifact(parent.info.run_id, str(f), artifact_path="curves")
    return parent.info.run_id


def main(argv: Sequence[str]) -> int:
    from .cli import run_verb

    return run_verb(lambda: fit(argv))


def fit(argv: Sequence[str]) -> int:
    from .cli import key_value_args
    from .config_checks import check_number
    from .tracking_client import tracking_uri

    args = key_value_args(argv, DEFAULTS, USAGE)
    root = Path(args["root"] or os.environ.get("RS_SWEEPS_DIR", "sweeps"))
    uri = tracking_uri({"uri": args["uri"] or os.environ.get("MLFLOW_TRACKING_URI")}, root)
    result = write_curves(uri, args["sweep"], args["metric"], root / args["sweep"] / "curves",
                          check_number("bootstrap", args["bootstrap"], int, 0, False),
                          check_number("seed", args["seed"], int, 0, False))
    parent = log_to_parent(uri, args["sweep"], result["files"])
    print((root / args["sweep"] / "curves" / "summary.md").read_text())
    where = f"logged to parent run {parent}" if parent else "no parent run to log to"
    print(f"curves: {root / args['sweep'] / 'curves'} ({len(result['points'])} cells; {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
