"""`python -m retrieval_scaling.curves sweep=<name>` — scaling curves, fits, checks and the paper's findings.

Gathers the sweep's finished cells from MLflow (and each cell's per-query measures from its directory),
fits a law per line — (paradigm, loss, FLOP budget) — against model size (non-embedding parameters),
with intervals over paired query resamples and seeds (`resampling`), and writes `sweeps/<name>/curves/`:
`scaling.png`, `points.csv`, `fits.json`, `summary.md`. Per line it reports the residuals and, with
three sizes or more, the leave-largest-out check; with several budgets, the compute-optimal size of
each; it judges every prediction the sweep stored before training (`predictions`). The files are
logged to the sweep's parent run, whose description they refresh.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .resampling import compute_optimal, fit_line, leave_largest_out, residuals
from .scaling import Target, fittable, target_for
from .sweep_results import gather_points, line_cells, read_per_query

DEFAULTS = {"sweep": None, "metric": "scifact/ndcg_10", "root": None, "uri": None, "bootstrap": "1000", "seed": "0",
            "out": None}
USAGE = ("usage: python -m retrieval_scaling.curves sweep=<name> [metric=scifact/ndcg_10] [root=sweeps] "
         "[uri=<tracking uri>] [bootstrap=1000] [seed=0] [out=<dir>: write there, touch neither sweep nor store]")
Line = tuple[str, str, float]  # (paradigm, loss, FLOP budget)
log = logging.getLogger(__name__)


def fit_lines(points: Sequence[Mapping[str, Any]], target: Target, bootstrap: int, seed: int,
              per_query: Mapping[str, list | None] | None = None) -> dict[Line, dict]:
    """(paradigm, loss, budget) → {"points", "cells", "fit" (None: "why"), "resampled", "residuals",
    "extrapolation"}."""
    lines: dict[Line, list] = defaultdict(list)
    for p in points:
        lines[p["paradigm"], p["loss"], p["budget"]].append(p)
    out = {}
    for key, pts in sorted(lines.items()):
        cells = line_cells(pts, per_query or {})
        entry: dict[str, Any] = {"points": pts, "cells": cells, "fit": None, "why": None}
        ok = fittable(target.error([c.value for c in cells]))
        if len({c.x for c in cells}) < 2:
            entry["why"] = "1 size: nothing to fit"
        elif not ok.all():
            edge = ", ".join(sorted({p["model"] for p, good in zip(pts, ok, strict=True) if not good}))
            entry["why"] = (f"{edge} at the edge of the metric's range (0 or 1): no law of the odds of missing fits "
                            "there; try the contrastive entropy")
        else:
            entry["fit"], entry["resampled"] = fit_line(cells, target, bootstrap, seed)
            entry["residuals"] = residuals(entry["fit"], cells, target)
            entry["extrapolation"] = leave_largest_out(cells, target, bootstrap, seed)
        out[key] = entry
    return out


def isoflop(lines: Mapping[Line, Mapping], target: Target, bootstrap: int, seed: int) -> dict[tuple[str, str], list]:
    """(paradigm, loss) → the compute-optimal size of each budget, where the sweep has several budgets."""
    budgets: dict[tuple[str, str], list[float]] = defaultdict(list)
    for paradigm, loss, budget in lines:
        budgets[paradigm, loss].append(budget)
    out = {}
    for (paradigm, loss), values in budgets.items():
        if len(values) < 2:
            continue
        out[paradigm, loss] = []
        for budget in sorted(values):
            cells = lines[paradigm, loss, budget]["cells"]
            if len({c.x for c in cells}) >= 2:
                out[paradigm, loss].append({"budget": budget, **compute_optimal(cells, target, bootstrap, seed)})
    return out


def write_curves(uri: str, sweep: str, metric: str, out_dir: Path, bootstrap: int = 1000, seed: int = 0,
                 root: Path | None = None) -> dict[str, Any]:
    """Gather, fit, check, plot and write; returns {"points", "lines", "optima", "predictions", "findings",
    "files"}."""
    from .curves_plot import plot
    from .curves_summary import findings, fits_json, summary_markdown
    from .errors import UserError
    from .predictions import judge_predictions

    points = gather_points(uri, sweep, metric)
    if not points:
        raise UserError(f"sweep '{sweep}': no FINISHED cell with metric '{metric}' in {uri}. Run the sweep "
                        "first, or name another metric (metric=<collection>/<measure>).")
    target = target_for(metric)
    per_query = {p["cell_id"]: read_per_query(root, sweep, p["cell_id"], metric) for p in points} if root else {}
    lines = fit_lines(points, target, bootstrap, seed, per_query)
    optima = isoflop(lines, target, bootstrap, seed)
    judged = judge_predictions(root, sweep, metric, points) if root else []
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "points.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    found = findings(lines, target)
    (out_dir / "fits.json").write_text(json.dumps(fits_json(metric, target, lines, optima, judged), indent=2))
    plot(lines, optima, judged, target, out_dir / "scaling.png")
    (out_dir / "summary.md").write_text(summary_markdown(sweep, metric, lines, optima, judged, found))
    files = [out_dir / n for n in ("scaling.png", "points.csv", "fits.json", "summary.md")]
    return {"points": points, "lines": lines, "optima": optima, "predictions": judged, "findings": found,
            "files": files}


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


def curves_for_sweep(uri: str, sweep: str, metric: str, root: Path, bootstrap: int = 1000, seed: int = 0,
                     out: Path | None = None) -> dict:
    """Write the curves under `<root>/<sweep>/curves`, log them to the parent run and make them the
    description of the parent run and the experiment; the result of `write_curves` with "parent" added.
    With `out`, the curves go there and neither the sweep nor its tracking store is written (a sweep
    read from an archive or a read-only mount)."""
    from .curves_summary import description, set_description
    from .layout import curves_dir
    from .tracking_client import client

    result = write_curves(uri, sweep, metric, out or curves_dir(root, sweep), bootstrap, seed, root)
    result["parent"] = None if out else log_to_parent(uri, sweep, result["files"])
    if result["parent"]:
        text = description(sweep, metric, result["points"], result["findings"], result["parent"])
        set_description(client(uri), sweep, result["parent"], text)
    return result


def sweep_curves(uri: str, sweep: str, root: Path, cfg: Mapping[str, Any]) -> Path | None:
    """A local sweep's closing curves of its primary metric: the PNG's path, None when no line has two
    finished sizes."""
    from .errors import UserError
    from .predictions import primary_metrics

    try:
        result = curves_for_sweep(uri, sweep, primary_metrics(cfg)[0], root)
    except UserError as exc:
        log.info("no curves: %s", exc)
        return None
    return result["files"][0] if any(e["fit"] for e in result["lines"].values()) else None


def main(argv: Sequence[str]) -> int:
    from .cli import run_verb

    return run_verb(lambda: fit(argv))


def fit(argv: Sequence[str]) -> int:
    from .cli import key_value_args
    from .config_checks import check_number
    from .layout import curves_dir
    from .tracking_client import tracking_uri

    args = key_value_args(argv, DEFAULTS, USAGE)
    root = Path(args["root"] or os.environ.get("RS_SWEEPS_DIR", "sweeps"))
    uri = tracking_uri({"uri": args["uri"] or os.environ.get("MLFLOW_TRACKING_URI")}, root)
    out = Path(args["out"]) if args["out"] else curves_dir(root, args["sweep"])
    result = curves_for_sweep(uri, args["sweep"], args["metric"], root,
                              check_number("bootstrap", args["bootstrap"], int, 0, False),
                              check_number("seed", args["seed"], int, 0, False), out if args["out"] else None)
    print((out / "summary.md").read_text())
    where = (f"logged to parent run {result['parent']}" if result["parent"]
             else "the sweep and its tracking store untouched" if args["out"] else "no parent run to log to")
    print(f"curves: {out / 'scaling.png'} ({len(result['points'])} cells; {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
