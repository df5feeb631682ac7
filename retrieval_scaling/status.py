"""`python -m retrieval_scaling.status sweep=<name> [format=json]` — one row per cell.

A cell's state is reconciled from its DONE marker (written after evaluation), its MLflow run and the
sweep's ledger; each alone can lie (MLflow leaves a killed run RUNNING forever).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEADLINE = "ndcg_10"


def reconcile(done: bool, run_status: str | None, ledger_state: str | None) -> str:
    """One state per cell from the three sources, most trustworthy first."""
    if done:
        return "DONE"
    if ledger_state == "FAILED" or run_status in ("FAILED", "KILLED"):
        return "FAILED"
    if run_status == "RUNNING":
        return "RUNNING"
    if ledger_state == "SUBMITTED":
        return "PENDING"
    if ledger_state == "COMPLETED" or run_status == "FINISHED":
        return "FAILED"  # the job ended without writing DONE
    return "MISSING"


def sweep_rows(sweep: str, root: str | os.PathLike, uri: str) -> list[dict[str, Any]]:
    from .tracking import cell_runs

    base = Path(root) / sweep
    plan_path = base / "plan.json"
    if not plan_path.is_file():
        raise FileNotFoundError(f"no sweep '{sweep}' under {root} (no {plan_path})")
    plans = json.loads(plan_path.read_text())
    ledger_path = base / "ledger.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    runs = cell_runs(uri, sweep)
    rows = []
    for plan in plans:
        cid = plan["cell_id"]
        done_path = base / "cells" / cid / "DONE"
        attempts = ledger.get(cid, {}).get("attempts", [])
        run = runs.get(cid)
        metrics = dict(run.data.metrics) if run else {}
        if done_path.is_file():
            metrics.update(json.loads(done_path.read_text())["metrics"])
        state = reconcile(done_path.is_file(), run.info.status if run else None,
                          attempts[-1]["state"] if attempts else None)
        rows.append({
            "cell_id": cid, "model": plan["model"], "paradigm": plan["paradigm"], "loss": plan["loss"],
            "state": state, "job_id": attempts[-1]["job_id"] if attempts else None,
            "attempt": int(run.data.tags.get("attempt", 0)) if run else len(attempts),
            "flops_spent": metrics.get("flops_spent", 0.0), "flops_budget": plan["flops_budget"],
            "flops_total": plan["flops_total"],
            "metrics": {k: v for k, v in metrics.items() if "/" in k and not k.startswith("train/")},
        })
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    if isinstance(value, int) and abs(value) >= 1e6:
        return f"{value:.3e}"
    return "" if value is None else str(value)


def print_table(rows: Sequence[Mapping[str, Any]], title: str, columns: Sequence[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if columns is None:
        columns = ("cell_id", "model", "paradigm", "loss", "state", "job_id", "attempt", "progress", HEADLINE)
    table = Table(title=title)
    for col in columns:
        text = col in ("cell_id", "model", "paradigm", "loss", "state")
        table.add_column(col, justify="left" if text else "right")
    for row in rows:
        cells = []
        for col in columns:
            if col == "progress":
                spent, planned = row.get("flops_spent", 0.0), row.get("flops_total") or 1
                cells.append(f"{100 * spent / planned:.0f}%")
            elif col == HEADLINE:
                cells.append(_fmt(next((v for k, v in row.get("metrics", {}).items() if k.endswith("/" + HEADLINE)),
                                       None)))
            else:
                cells.append(_fmt(row.get(col)))
        table.add_row(*cells)
    Console(width=200).print(table)


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """`key=value` arguments, as the other verbs take them through Hydra."""
    args = {"sweep": None, "format": "table", "root": os.environ.get("RS_SWEEPS_DIR", "sweeps"), "uri": None}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in args:
            raise SystemExit(f"usage: python -m retrieval_scaling.status sweep=<name> [format=table|json] "
                             f"[root=<sweeps dir>] [uri=<mlflow uri>] (got {item!r})")
        args[key] = value
    if not args["sweep"]:
        raise SystemExit("usage: python -m retrieval_scaling.status sweep=<name> [format=table|json]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from .tracking import tracking_uri

    args = parse_args(sys.argv[1:] if argv is None else argv)
    uri = args["uri"] or tracking_uri({"uri": os.environ.get("MLFLOW_TRACKING_URI")}, args["root"])
    try:
        rows = sweep_rows(args["sweep"], args["root"], uri)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args["format"] == "json":
        keys = ("cell_id", "model", "paradigm", "loss", "state", "flops_spent", "flops_budget", "flops_total",
                "metrics", "job_id", "attempt")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
    else:
        print_table(rows, title=f"sweep '{args['sweep']}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
