"""MLflow: one experiment per sweep, holding a parent run for the sweep (grid, plan, curves) and one
child run per cell (`mlflow.parentRunId`), continued across attempts.

Uses the client API only: the fluent API's atexit hook would mark a crashed run FINISHED.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .tracking_client import _store_lock, client

log = logging.getLogger(__name__)

AXES = ("model", "paradigm", "loss")
KIND = "run_kind"  # tag: "sweep" (the parent run) or "cell"


def git_commit() -> str:
    """The commit of the code that runs (with "+dirty" for uncommitted changes), or "unknown"."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def ensure_experiment(uri: str, name: str, artifacts: str | os.PathLike) -> str:
    """Create the store and the experiment once, before cells fan out (concurrent first use of a
    fresh SQLite store races on schema migration): under a lock, so that concurrent sweeps may too."""
    c = client(uri)
    with _store_lock(uri):
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        return c.create_experiment(name, artifact_location=Path(artifacts).resolve().as_uri())


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def log_param_batches(c, run_id: str, params: Mapping[str, Any]) -> None:
    """Params in batches of 100 (MLflow's limit per call), values cut to MLflow's 6,000 characters."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def find_parent_run(c, experiment_id: str):
    runs = c.search_runs([experiment_id], filter_string=f"tags.{KIND} = 'sweep'", max_results=1)
    return runs[0] if runs else None


def open_parent_run(uri: str, experiment: str, artifacts: str | os.PathLike, params: Mapping[str, Any],
                    files: list[Path]) -> str:
    """The sweep's parent run (created once, reopened by later invocations): grid and plan as params
    and artifacts. Returns its id."""
    c = client(uri)
    exp_id = ensure_experiment(uri, experiment, artifacts)
    run = find_parent_run(c, exp_id)
    if run is None:
        run = c.create_run(exp_id, run_name=f"sweep {experiment}", tags={KIND: "sweep", "sweep": experiment})
    else:
        c.update_run(run.info.run_id, status="RUNNING")
    run_id = run.info.run_id
    c.set_tag(run_id, "git_commit", git_commit())
    have = c.get_run(run_id).data.params
    log_param_batches(c, run_id, {k: v for k, v in params.items() if k not in have})
    for f in files:
        c.log_artifact(run_id, str(f))
    return run_id


def close_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def find_cell_run(c, experiment_id: str, cell: str):
    runs = c.search_runs([experiment_id], filter_string=f"tags.cell_id = '{cell}'", max_results=5)
    return runs[0] if runs else None


def cell_runs(uri: str, experiment: str) -> dict[str, Any]:
    """cell_id → latest MLflow run of a sweep (empty when the experiment does not exist)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = c.search_runs([exp.experiment_id], max_results=50000)
    out: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        if "cell_id" in run.data.tags:
            out[run.data.tags["cell_id"]] = run
    return out


def fail_if_running(uri: str, experiment: str, cell: str) -> bool:
    """Close a cell's run as FAILED when its process died without doing so (SIGKILL, OOM): MLflow
    would otherwise show it RUNNING forever. Returns whether a run was closed."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    run = find_cell_run(c, exp.experiment_id, cell) if exp else None
    if run is None or run.info.status != "RUNNING":
        return False
    c.set_terminated(run.info.run_id, status="FAILED")
    return True


class CellRun:
    """The MLflow run of one cell: created on the first attempt, continued by later ones."""

    def __init__(self, uri: str, experiment: str, artifacts: str | os.PathLike, cell: str,
                 tags: Mapping[str, str], params: Mapping[str, str], attempt_tags: Mapping[str, str] | None = None):
        from mlflow.entities import RunTag

        self.client = client(uri)
        self.last_steps: dict[str, int] = {}  # a metric's last logged step, as `log_new_metrics` found it
        exp_id = ensure_experiment(uri, experiment, artifacts)
        existing = find_cell_run(self.client, exp_id, cell)
        if existing is None:
            parent = find_parent_run(self.client, exp_id)
            tags = {**tags, "cell_id": cell, KIND: "cell",
                    **({"mlflow.parentRunId": parent.info.run_id} if parent else {})}
            run = self.client.create_run(exp_id, tags=tags, run_name=tags.get("run_name"))
            self.run_id, self.attempt = run.info.run_id, 1
            log_param_batches(self.client, self.run_id, params)
        else:
            self.run_id = existing.info.run_id
            self.attempt = int(existing.data.tags.get("attempt", "1")) + 1
            self.client.update_run(self.run_id, status="RUNNING")
        per_attempt = {"attempt": str(self.attempt), "git_commit": git_commit(), **(attempt_tags or {})}
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in per_attempt.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_new_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """`log_metrics`, less each metric an earlier attempt already logged at this step or a later one:
        a cell resumed from a checkpoint replays the steps since it, and their points would show twice."""
        for key in metrics:
            if key not in self.last_steps:
                history = self.client.get_metric_history(self.run_id, key)
                self.last_steps[key] = max((m.step for m in history), default=-1)
        new = {k: v for k, v in metrics.items() if step > self.last_steps[k]}
        if new:
            self.log_metrics(new, step)
            self.last_steps.update(dict.fromkeys(new, step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        have = self.client.get_run(self.run_id).data.params
        log_param_batches(self.client, self.run_id, {k: v for k, v in params.items() if k not in have})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_status(self, status: str) -> None:
        """A non-terminal status (SCHEDULED: requeued, waiting to resume)."""
        self.client.update_run(self.run_id, status=status)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
