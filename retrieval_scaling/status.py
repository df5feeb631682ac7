"""`python -m retrieval_scaling.status sweep=<name> [format=json]` — one row per cell.

A cell's state is reconciled from its DONE marker (written after evaluation), its last job (sacct and
squeue for SLURM, the process for local jobs; the ledger says which job) and its MLflow run (status and
heartbeat). Each alone can lie: SLURM calls a Python failure COMPLETED, MLflow leaves a SIGKILLed run
RUNNING forever, a hung process looks RUNNING to SLURM but stops beating.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import UserError

HEADLINE = "ndcg_10"
STEP0_HEADLINE = f"step0 {HEADLINE}"  # the untrained model's, beside the final one
STATES = ("DONE", "RUNNING", "PENDING", "FAILED", "TIMEOUT", "PREEMPTED", "CANCELLED", "STALE", "MISSING")
# What a second `sweep` submits again; never DONE, RUNNING or PENDING.
RESUBMIT = ("FAILED", "TIMEOUT", "PREEMPTED", "CANCELLED", "STALE", "MISSING")
STALE_AFTER_S = 600.0
STATUS_RETRY_S = 10


def reconcile(done: bool, job_state: str | None, run_status: str | None, heartbeat_age: float | None,
              stale_after: float = STALE_AFTER_S) -> str:
    """One state per cell from three sources, most trustworthy first: the DONE marker (written after
    evaluation), the job's state (sacct/squeue for SLURM, the process for local jobs; None when
    unknown), then the MLflow run (status + age of its last heartbeat, in seconds)."""
    if done:
        return "DONE"
    if job_state == "PENDING":
        return "PENDING"
    if job_state == "RUNNING":
        return "STALE" if heartbeat_age is not None and heartbeat_age > stale_after else "RUNNING"
    if job_state == "COMPLETED":
        return "FAILED"  # the job ended without writing DONE
    if job_state in ("FAILED", "TIMEOUT", "PREEMPTED", "CANCELLED"):
        return job_state
    # No job to ask (purged from accounting, ledger lost, another machine): MLflow alone.
    if run_status == "RUNNING":
        return "RUNNING" if heartbeat_age is not None and heartbeat_age <= stale_after else "STALE"
    if run_status is not None:
        return "FAILED"  # FAILED, KILLED, FINISHED without DONE, SCHEDULED without a job
    return "MISSING"


def _local_job_state(attempt: Mapping[str, Any]) -> str | None:
    """A local attempt: the ledger's outcome; else PENDING while the sweep that queued it lives,
    RUNNING while its process lives, FAILED once that process is gone without an outcome (killed
    with its sweep, OOM, reboot); None when this host cannot tell (another machine's process)."""
    from . import local_jobs

    if attempt.get("state") in ("COMPLETED", "FAILED"):
        return attempt["state"]
    if attempt.get("state") == "QUEUED":
        owner = attempt.get("owner") or {}
        return "PENDING" if local_jobs.alive(owner.get("pid"), owner) else None
    live = local_jobs.alive(attempt.get("job_id"), attempt)
    return None if live is None else "RUNNING" if live else "FAILED"


def job_states(ledger: Mapping[str, Any]) -> dict[str, str | None]:
    """cell → state of its last job (None when unknown)."""
    from .slurm import SACCT_TO_CELL
    from .slurm import job_states as slurm_states

    last = {cell: entry["attempts"][-1] for cell, entry in ledger.items() if entry.get("attempts")}
    slurm_ids = [a["job_id"] for a in last.values() if a.get("launcher") == "slurm"]
    live = slurm_states(slurm_ids) if slurm_ids else {}
    out: dict[str, str | None] = {}
    for cell, attempt in last.items():
        if attempt.get("launcher") == "slurm":
            word = live.get(attempt["job_id"])
            out[cell] = SACCT_TO_CELL.get(word, "FAILED") if word else None
        else:
            out[cell] = _local_job_state(attempt)
    return out


def sweep_rows(sweep: str, root: str | os.PathLike, uri: str,
               stale_after: float = STALE_AFTER_S) -> list[dict[str, Any]]:
    from .layout import ledger_path, plan_path, read_done, read_json, sweep_dir
    from .ledger import Ledger
    from .tracking import cell_runs
    from .tracking_client import client, store_exists

    base = sweep_dir(root, sweep)
    plan_file = plan_path(root, sweep)
    if not plan_file.is_file():
        raise UserError(f"no sweep '{sweep}' under {root} (no {plan_file}); pass root=<sweeps dir> or sweep=<a name "
                        "that `ls` shows there>")
    plans = read_json(plan_file, "rerun the sweep's command with sweep.dry_run=true to write it again")
    ledger = Ledger(ledger_path(root, sweep)).cells
    jobs = job_states(ledger)
    runs = cell_runs(uri, sweep) if store_exists(uri) else {}
    store = client(uri) if runs else None
    now = time.time()
    rows = []
    for plan in plans:
        cid = plan["cell_id"]
        done_path = base / "cells" / cid / "DONE"
        attempts = ledger.get(cid, {}).get("attempts", [])
        run = runs.get(cid)
        metrics = dict(run.data.metrics) if run else {}
        done = done_path.is_file()
        final = read_done(done_path)["metrics"] if done else {}  # the final evaluation's, and only those
        metrics.update(final)
        beat = metrics.pop("heartbeat", None)
        age = now - beat if beat else None
        state = reconcile(done, jobs.get(cid), run.info.status if run else None, age, stale_after)
        job_state = jobs.get(cid)
        if done and job_state == "FAILED" and attempts and attempts[-1].get("state") not in ("COMPLETED", "FAILED"):
            job_state = "COMPLETED"  # its process went (a killed local sweep) after the cell had finished
        rows.append({
            "cell_id": cid, "model": plan["model"], "paradigm": plan["paradigm"], "loss": plan["loss"],
            "state": state, "job_id": attempts[-1]["job_id"] if attempts else None,
            "job_state": job_state, "run_status": run.info.status if run else None,
            "attempt": int(run.data.tags.get("attempt", 0)) if run else 0, "submissions": len(attempts),
            "flops_spent": metrics.get("flops_spent", plan["flops_total"] if state == "DONE" else 0.0),
            "flops_budget": plan["flops_budget"],
            "flops_total": plan["flops_total"], "heartbeat_age_s": None if age is None else round(age, 1),
            # the final evaluation's metrics once DONE (never a step-0-only one, such as a sparse cell's
            # scifact:top256/ndcg_10); before, the run's latest values are its step-0 evaluation's
            "metrics": {k: v for k, v in final.items() if "/" in k and not k.startswith("train/")},
            "step0_metrics": step0_headline(store, run, metrics),
        })
    return rows


def step0_headline(store, run, metrics: Mapping[str, float]) -> dict[str, float]:
    """The headline metric(s) of a cell's step-0 evaluation (their points at step 0), whatever it logged
    since; `store`: a tracking client."""
    if run is None:
        return {}
    out = {}
    for key in (k for k in metrics if k.endswith("/" + HEADLINE)):
        at_zero = [m.value for m in store.get_metric_history(run.info.run_id, key) if m.step == 0]
        if at_zero:
            out[key] = at_zero[-1]
    return out


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
        columns = ("cell_id", "model", "paradigm", "loss", "state", "job_id", "attempt", "progress", "heartbeat",
                   STEP0_HEADLINE, HEADLINE)
    table = Table(title=title)
    for col in columns:
        text = col in ("cell_id", "model", "paradigm", "loss", "state")
        table.add_column(col, justify="left" if text else "right")
    for row in rows:
        cells = []
        for col in columns:
            if col == "progress":
                spent, budget = row.get("flops_spent", 0.0), row.get("flops_budget") or 1
                cells.append(f"{100 * spent / budget:.0f}%")
            elif col == "heartbeat":
                age = row.get("heartbeat_age_s")
                cells.append("" if age is None or row.get("state") == "DONE" else f"{age:.0f}s ago")
            elif col in (HEADLINE, STEP0_HEADLINE):
                found = row.get("metrics" if col == HEADLINE else "step0_metrics", {})
                cells.append(_fmt(next((v for k, v in found.items() if k.endswith("/" + HEADLINE)), None)))
            else:
                cells.append(_fmt(row.get(col)))
        table.add_row(*cells)
    Console(width=200).print(table)


USAGE = ("usage: python -m retrieval_scaling.status sweep=<name> [format=table|json] [root=<sweeps dir>] "
         "[uri=<mlflow uri>] [stale_after=<seconds>]")


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    from .cli import key_value_args

    return key_value_args(argv, {"sweep": None, "format": "table", "root": os.environ.get("RS_SWEEPS_DIR", "sweeps"),
                                 "uri": None, "stale_after": str(STALE_AFTER_S)}, USAGE,
                          choices={"format": ("table", "json")})


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_verb

    return run_verb(lambda: show(parse_args(sys.argv[1:] if argv is None else argv)))


def show(args: Mapping[str, str]) -> int:
    from .config_checks import check_number
    from .credentials import redact
    from .tracking_client import RETRY_ENV, tracking_uri

    uri = tracking_uri({"uri": args["uri"] or os.environ.get("MLFLOW_TRACKING_URI")}, args["root"])
    stale_after = check_number("stale_after", args["stale_after"], float, 1.0, False)
    os.environ[RETRY_ENV] = os.environ.get(RETRY_ENV) or str(STATUS_RETRY_S)  # an answer, or why not, in seconds
    rows = sweep_rows(args["sweep"], args["root"], uri, stale_after)
    lost = [r["cell_id"] for r in rows if r["state"] == "DONE" and r["run_status"] is None]
    if lost:
        print(f"warning: {len(lost)} DONE cell(s) have no run in the tracking store {redact(uri)} (deleted, or "
              f"another store): {', '.join(lost[:8])}{' …' if len(lost) > 8 else ''}. Log them again from their "
              f"directories with `python -m retrieval_scaling.relog sweep={args['sweep']}` (a sweep run does too)",
              file=sys.stderr)
    if args["format"] == "json":
        keys = ("cell_id", "model", "paradigm", "loss", "state", "flops_spent", "flops_budget", "flops_total",
                "metrics", "step0_metrics", "job_id", "job_state", "run_status", "attempt", "submissions",
                "heartbeat_age_s")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
    else:
        from .disk import cache_dir_of, disk_line, sweep_disk

        print_table(rows, title=f"sweep '{args['sweep']}'")
        print(disk_line(sweep_disk(args["root"], args["sweep"], cache_dir_of(args["root"], args["sweep"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
