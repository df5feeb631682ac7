"""`python -m retrieval_scaling.relog sweep=<name> [root=…] [uri=…]` — log DONE cells that the MLflow
store has lost (a deleted `mlflow.db`, a new tracking server) back into it, from their directories.

A cell's directory keeps what its run showed at the end: its config (params, tags), its DONE marker
(final metrics) and its run files. What only the lost store held — the training curve, system
metrics, the step-0 metrics — does not come back; the run is tagged `relogged` to say so. A sweep
run again does the same for the cells it skips as DONE.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import DataError, UserError
from .layout import DONE, read_done, run_artifacts, sweep_dir

log = logging.getLogger(__name__)
USAGE = ("usage: python -m retrieval_scaling.relog sweep=<name> [root=<sweeps dir>] [uri=<mlflow uri>] "
         "[dry_run=false|true: list the cells, log nothing]")


def lost_cells(root: str | os.PathLike, sweep: str, uri: str) -> list[str]:
    """Cells with a DONE marker and no run in the store."""
    from .tracking import cell_runs
    from .tracking_client import store_exists

    cells = sweep_dir(root, sweep) / "cells"
    done = sorted(p.parent.name for p in cells.glob(f"*/{DONE}")) if cells.is_dir() else []
    runs = cell_runs(uri, sweep) if store_exists(uri) else {}
    return [c for c in done if c not in runs]


def relog_cell(uri: str, artifacts: str | os.PathLike, out: Path) -> str:
    """One DONE cell's run, made again from `out` (its directory); returns the new run's id."""
    from omegaconf import OmegaConf

    from .cell import PLAN_PARAMS, cell_params, cell_tags
    from .plan import plan_cell
    from .tracking import CellRun

    if not (out / "config.yaml").is_file():
        raise DataError(f"{out / 'config.yaml'} is missing: the cell cannot be logged again without its config")
    cfg = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=True)
    done = read_done(out / DONE)
    plan = plan_cell(cfg)
    run = CellRun(uri, cfg["sweep"]["name"], artifacts, out.name, {**cell_tags(cfg), "relogged": "true"},
                  {**cell_params(cfg), **{k: str(plan[k]) for k in PLAN_PARAMS}},
                  attempt_tags={"relogged_from": str(out)})
    run.log_metrics({"flops_spent": plan["flops_total"], **done["metrics"]}, step=plan["steps"])
    run.log_artifact(out / "config.yaml")
    for run_file in run_artifacts(out / "runs"):
        run.log_artifact(run_file, "runs")
    run.finish("FINISHED")
    return run.run_id


def relog_sweep(root: str | os.PathLike, sweep: str, uri: str, artifacts: str | os.PathLike) -> list[str]:
    """Relog every lost cell of a sweep that can be; returns their ids. A cell whose directory cannot
    say what it was is reported and left (it stays DONE; the sweep goes on)."""
    done = []
    for cell in lost_cells(root, sweep, uri):
        try:
            run_id = relog_cell(uri, artifacts, sweep_dir(root, sweep) / "cells" / cell)
        except UserError as exc:
            log.warning("cell %s: DONE but missing from the tracking store, and not logged again: %s", cell, exc)
            continue
        log.info("cell %s: DONE but missing from the tracking store; logged again as run %s", cell, run_id)
        done.append(cell)
    return done


def relog(argv: Sequence[str]) -> int:
    from .cli import key_value_args
    from .credentials import redact
    from .tracking import ensure_experiment
    from .tracking_client import tracking_uri

    args = key_value_args(argv, {"sweep": None, "root": os.environ.get("RS_SWEEPS_DIR", "sweeps"), "uri": None,
                                 "dry_run": "false"}, USAGE, choices={"dry_run": ("false", "true")})
    uri = tracking_uri({"uri": args["uri"] or os.environ.get("MLFLOW_TRACKING_URI")}, args["root"])
    if args["dry_run"] == "true":
        cells = lost_cells(args["root"], args["sweep"], uri)
        print(f"{len(cells)} DONE cell(s) missing from {redact(uri)} would be logged again"
              + (f": {', '.join(cells)}" if cells else "") + " (dry run: nothing written)")
        return 0
    artifacts = Path(args["root"]) / "mlartifacts"
    ensure_experiment(uri, args["sweep"], artifacts)
    cells = relog_sweep(args["root"], args["sweep"], uri, artifacts)
    print(f"{len(cells)} DONE cell(s) logged again to {redact(uri)}" + (f": {', '.join(cells)}" if cells else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_verb

    return run_verb(lambda: relog(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
