"""A sweep's finished cells as the scaling analyses read them: one row per cell from MLflow, and the
per-query values each cell kept in its directory (`layout.PER_QUERY`)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .resampling import Cell


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
                     "loss": tags.get("loss"), "teacher": tags.get("teacher", "none"), "seed": params.get("seed", ""),
                     "budget": float(params.get("flops_budget") or params["flops_total"]),
                     "params_non_embedding": float(params["params_non_embedding"]),
                     "flops": float(params["flops_total"]), "metric": float(run.data.metrics[metric])})
    return sorted(rows, key=lambda r: (r["paradigm"], r["loss"], r["budget"], r["params_non_embedding"], r["seed"]))


def read_per_query(root: Path, sweep: str, cell: str, metric: str) -> list[dict[str, float]] | None:
    """The per-query values behind a cell's `metric`: one {query: value} per collection it averages
    (a group's members), from the cell's directory; None when the cell kept none."""
    from .errors import ConfigError
    from .layout import PER_QUERY, cell_path

    try:
        path = cell_path(root, sweep, cell) / "runs" / PER_QUERY
    except ConfigError:  # not a cell id of ours (a run logged by hand)
        return None
    if not path.is_file():
        return None
    stored = json.loads(gzip.decompress(path.read_bytes()))
    collection, measure = metric.rsplit("/", 1)
    members = stored.get("groups", {}).get(collection, [collection])
    tables = [stored["collections"].get(m, {}).get(measure) for m in members]
    return None if any(t is None for t in tables) else tables


def line_cells(points: Sequence[Mapping[str, Any]], per_query: Mapping[str, list | None]) -> list[Cell]:
    """A line's points as `Cell`s, their per-query values aligned on the queries every cell has."""
    tables = [per_query.get(p["cell_id"]) for p in points]
    arrays: list[list[np.ndarray] | None] = [None] * len(points)
    if all(t is not None for t in tables) and len({len(t) for t in tables}) == 1:
        members = len(tables[0])
        shared = [sorted(set.intersection(*(set(t[j]) for t in tables))) for j in range(members)]
        if all(shared):
            arrays = [[np.array([t[j][q] for q in shared[j]]) for j in range(members)] for t in tables]
    return [Cell(p["params_non_embedding"], p["metric"], a, str(p["seed"]))
            for p, a in zip(points, arrays, strict=True)]
