"""Predictions stored before training: when a sweep submits a cell at a size its line has not finished
yet, the law fitted to the sizes it has finished predicts the cell's metrics, with 95 % intervals.

Each prediction is written once, before the cell runs, to `sweeps/<name>/predictions/<cell>.json` and
logged to the sweep's parent run as the artifact `predictions/<cell>.json`; a later submission never
rewrites it (a prediction made after the cell trained would not be one). `curves` judges each against
the cell's measured metric: inside or outside its interval.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
BOOTSTRAP = 1000


def primary_metrics(cfg: Mapping[str, Any]) -> list[str]:
    """The metrics a prediction is made for: the first collection's (or its group's) first measure,
    and its contrastive entropy when the evaluation logs it."""
    from .contrastive_entropy import metric_name

    eval_cfg = cfg["eval"]
    spec = next(iter(eval_cfg["collections"].values()))
    prefix = spec.get("group") or spec.get("name")
    out = [f"{prefix}/{next(iter(spec['measures']))}"]
    if eval_cfg.get("contrastive_entropy"):
        out.append(f"{prefix}/{metric_name(eval_cfg['contrastive_entropy'])}")
    return out


def line_of(plan: Mapping[str, Any]) -> str:
    from .curves_summary import line_name

    return line_name(plan["paradigm"], plan["loss"], plan["flops_budget"])


def predict_metric(finished: Sequence[Mapping[str, Any]], root: Path, sweep: str, metric: str,
                   plan: Mapping[str, Any]) -> dict[str, Any]:
    """The prediction of one cell's `metric` from its line's `finished` cells (`gather_points`), or why
    there is none."""
    from .resampling import fit_line, measurement_noise, predict
    from .scaling import fittable, target_for
    from .sweep_results import line_cells, read_per_query

    points = [p for p in finished
              if (p["paradigm"], p["loss"]) == (plan["paradigm"], plan["loss"])
              and abs(p["budget"] - float(plan["flops_budget"])) <= 1e-9 * p["budget"]]
    sizes = sorted({p["params_non_embedding"] for p in points})
    x = float(plan["params_non_embedding"])
    if x in sizes:
        return {"why": "its size has finished cells already: nothing to predict"}
    if len(sizes) < 2:
        return {"why": f"{len(sizes)} finished size(s) on its line: a law needs 2"}
    target = target_for(metric)
    cells = line_cells(points, {p["cell_id"]: read_per_query(root, sweep, p["cell_id"], metric) for p in points})
    if not fittable(target.error([c.value for c in cells])).all():
        return {"why": f"a finished cell's {metric} is at the edge of its range: no law there"}
    fit, resampled = fit_line(cells, target, BOOTSTRAP)
    out = predict(fit, target, x, measurement_noise(cells, BOOTSTRAP))
    out.update(from_sizes=sizes, from_cells=[p["cell_id"] for p in points], interval_from=resampled,
               alpha=fit.alpha, law=target.law)
    return out


def predict_before_training(uri: str, root: Path, sweep: str, todo: Sequence[tuple[Mapping, Mapping]],
                            parent: str | None) -> list[dict[str, Any]]:
    """Store a prediction for each cell about to be submitted that has none yet; returns the new ones."""
    from .layout import predictions_dir, write_json
    from .sweep_results import gather_points
    from .tracking_client import client

    made, finished, reasons = [], {}, defaultdict(set)
    for cfg, plan in todo:
        path = predictions_dir(root, sweep) / f"{plan['cell_id']}.json"
        if path.is_file():
            continue
        wanted = primary_metrics(cfg)
        for m in wanted:
            if m not in finished:
                finished[m] = gather_points(uri, sweep, m)
        metrics = {m: predict_metric(finished[m], root, sweep, m, plan) for m in wanted}
        for metric, p in metrics.items():
            if "why" in p:
                reasons[line_of(plan), p["why"]].add(metric)
            else:
                interval = "" if p["low"] is None else f" [{p['low']:.4f}, {p['high']:.4f}]"
                log.info("cell %s (%s): %s predicted %.4f%s from sizes %s", plan["cell_id"], plan["model"], metric,
                         p["predicted"], interval, p["from_sizes"])
        if all("why" in p for p in metrics.values()):
            continue  # nothing to store: a later submission may predict it, once its line has two sizes
        record = {"cell_id": plan["cell_id"], "model": plan["model"], "line": line_of(plan),
                  "x": float(plan["params_non_embedding"]), "made_at": time.time(), "parent_run": parent,
                  "predictions": metrics}
        write_json(path, record)
        if parent:
            client(uri).log_artifact(parent, str(path), artifact_path="predictions")
        made.append(record)
    for (line, why), metrics in sorted(reasons.items()):  # once per line, not per cell
        log.info("line %s: no prediction of %s before training: %s", line, ", ".join(sorted(metrics)), why)
    return made


def store_predictions(uri: str, root: Path, sweep: str, todo: Sequence[tuple[Mapping, Mapping]],
                      parent: str | None) -> None:
    """`predict_before_training`, whose failure is logged: a prediction never holds back training."""
    from mlflow.exceptions import MlflowException

    try:
        predict_before_training(uri, root, sweep, todo, parent)
    except (MlflowException, ValueError, OSError) as exc:
        log.warning("no predictions stored before training: %s", exc)


def judge_predictions(root: Path, sweep: str, metric: str, points: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Every stored prediction of `metric`, with the measured value when its cell has finished and
    whether it fell inside the interval."""
    from .layout import predictions_dir, read_json

    measured = {p["cell_id"]: p["metric"] for p in points}
    out = []
    for path in sorted(predictions_dir(root, sweep).glob("*.json")):
        record = read_json(path, "move the damaged prediction aside; curves judges the others")
        p = record["predictions"].get(metric)
        if not p or "why" in p:
            continue
        observed = measured.get(record["cell_id"])
        if observed is None:
            verdict = "pending (not finished)"
        elif p["low"] is None:
            verdict = "no interval"
        else:
            verdict = "inside" if p["low"] <= observed <= p["high"] else "**outside**"
        out.append({"cell_id": record["cell_id"], "model": record["model"], "line": record["line"], "x": record["x"],
                    "predicted": p["predicted"], "low": p["low"], "high": p["high"], "observed": observed,
                    "verdict": verdict, "stored": f"predictions/{path.name} (run {record.get('parent_run')})"})
    return out
