"""Two-phase dispatch of a sweep: decide (compose, identify, plan, check, skip what is done), then
commit (prepare shared stages, submit through submitit, at most N at once, record the ledger).
A dry run stops after the first phase."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cell import run_cell
from .data import DATA_ROOT_ENV, resolve_data_root, training_spec
from .disk import remove_stale_stores
from .errors import ConfigError, DataError
from .inputs import check_prepared, print_inputs
from .jobs import Job, stage_jobs, stage_key, stage_targets
from .layout import cell_dir, ledger_path, plan_path, sweep_dir, write_json
from .ledger import Ledger
from .plan import check_budget, check_memory, plan_cell
from .plan_report import print_plan

log = logging.getLogger(__name__)


def normalise_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """Absolute paths for everything a job process reads (its cwd and environment may differ)."""
    sweep = cfg["sweep"]
    root = Path(sweep["root"]).resolve()
    sweep["cache_dir"] = str(Path(sweep["cache_dir"]).resolve())
    sweep["inputs_dir"] = str(Path(sweep["inputs_dir"]).resolve())
    sweep["root"] = str(root)
    cfg["tracking"]["artifacts"] = str(Path(cfg["tracking"]["artifacts"]).resolve())
    if sweep["dry_run"] and not (cfg["data"].get("root") or os.environ.get(DATA_ROOT_ENV)):
        return cfg  # a plan reads configs only: it may be made where the data is not
    reads_root = cfg["data"].get("source", "beir") == "beir" or any(
        c.get("source", "beir") == "beir" and not c.get("path") for c in cfg["eval"]["collections"].values())
    if not reads_root:  # ir_datasets ids and explicit paths only
        return cfg
    cfg["data"]["root"] = str(resolve_data_root(cfg["data"].get("root")))
    cfg["eval"]["root"] = str(resolve_data_root(cfg["eval"].get("root") or cfg["data"]["root"]))
    return cfg


def plan_sweep(cfgs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    plans = [plan_cell(c) for c in cfgs]
    seen: dict[str, dict] = {}
    for p in plans:
        other = seen.setdefault(p["cell_id"], p)
        if other is not p:
            raise ConfigError(f"cells {other['model']}/{other['paradigm']}/{other['loss']} and "
                              f"{p['model']}/{p['paradigm']}/{p['loss']} have the same identity {p['cell_id']}")
    check_budget(plans)
    check_memory(cfgs, plans)
    return plans


def write_plan(cfgs: Sequence[dict[str, Any]], plans: Sequence[dict[str, Any]]) -> Path:
    """`plan.json` holds every cell the sweep has planned: a grid run again with a new model size adds
    its cells and keeps the earlier ones (their results are part of the same study)."""
    path = plan_path(cfgs[0]["sweep"]["root"], cfgs[0]["sweep"]["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {p["cell_id"]: p for p in (json.loads(path.read_text()) if path.is_file() else [])}
    merged.update({p["cell_id"]: p for p in plans})
    write_json(path, list(merged.values()))
    return path


def check_inputs(cfgs: Sequence[Mapping[str, Any]]) -> None:
    """Load every collection the sweep reads from disk once, so bad data fails before any job starts.
    ir_datasets collections are checked by id only here (ir_datasets verifies its downloads)."""
    from .data import load_source

    seen = set()
    for cfg in cfgs:
        specs = [(cfg["data"]["root"], training_spec(cfg["data"]))]
        specs += [(cfg["eval"]["root"], dict(c)) for c in cfg["eval"]["collections"].values()]
        for root, spec in specs:
            key = json.dumps([root, spec], sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            if spec.get("source") == "ir_datasets":
                check_ir_datasets_id(spec)
            else:
                load_source(spec, root)


def check_ir_datasets_id(spec: Mapping[str, Any]) -> None:
    import ir_datasets

    try:
        ir_datasets.load(spec["id"])
    except KeyError:
        raise DataError(f"collection {spec['name']}: ir_datasets has no dataset '{spec['id']}'.") from None


def end_stale(ledger: Ledger, cells: Sequence[str]) -> None:
    """End the last job of each STALE cell the way its launcher can: scancel on SLURM, SIGKILL of
    the process tree for a local job still on this host (a PID is never passed to scancel)."""
    from . import local_jobs, slurm

    last = {c: ledger.cells[c]["attempts"][-1] for c in cells if ledger.cells.get(c, {}).get("attempts")}
    slurm.cancel([a["job_id"] for a in last.values() if a.get("launcher") == "slurm" and a.get("job_id")])
    for cell, attempt in last.items():
        if attempt.get("launcher") == "local" and attempt.get("job_id") and local_jobs.kill(attempt["job_id"], attempt):
            log.warning("cell %s: killed its stalled local job %s", cell, attempt["job_id"])


def cell_jobs(todo: Sequence[tuple[dict[str, Any], dict[str, Any]]], stages_folder: Path) -> list[Job]:
    """The stages jobs still needed, then one job per cell, each waiting for its backbone's stages job."""
    jobs = stage_jobs([c for c, _ in todo], stages_folder)
    pending = {j.stage for j in jobs}
    for cfg, plan in todo:
        needs = stage_key(stage_targets(cfg))
        jobs.append(Job(f"cell {plan['cell_id']} {plan['model']}/{plan['paradigm']}/{plan['loss']}", run_cell, (cfg,),
                        cell_dir(cfg) / "logs", cell=plan["cell_id"], needs=needs if needs in pending else None))
    return jobs


class Sweep:
    """One invocation of a sweep over its composed cells: checked, planned and priced on creation."""

    def __init__(self, cfgs: list[dict[str, Any]]):
        from .config_checks import check_cell
        from .pricing import price_study
        from .tracking_client import hide_secret, tracking_uri

        for cfg in cfgs:
            check_cell(cfg)
        self.cfgs = [normalise_paths(c) for c in cfgs]
        self.first = self.cfgs[0]
        self.sweep, self.launcher = self.first["sweep"], self.first["launcher"]
        self.plans = plan_sweep(self.cfgs)
        self.totals = price_study(self.cfgs, self.plans)  # each plan gets its GPU-hours, written into plan.json
        self.uri = tracking_uri(self.first["tracking"], self.sweep["root"])
        for cfg in self.cfgs:  # jobs' configs, pickles and artifacts hold the URI without its secret
            if cfg["tracking"].get("uri"):
                cfg["tracking"]["uri"] = hide_secret(self.uri)
        self.base = sweep_dir(self.sweep["root"], self.sweep["name"])
        self.ledger = Ledger(ledger_path(self.sweep["root"], self.sweep["name"]))

    def rows(self) -> list[dict[str, Any]]:
        from .status import sweep_rows

        return sweep_rows(self.sweep["name"], self.sweep["root"], self.uri, float(self.sweep["stale_after_s"]))

    def decide(self) -> tuple[Path, dict[str, dict[str, Any]], list[tuple[dict[str, Any], dict[str, Any]]]]:
        """(plan.json, cell → its status row, the (config, plan) of each cell to submit)."""
        from .status import RESUBMIT

        plan_file = write_plan(self.cfgs, self.plans)
        states = {r["cell_id"]: r for r in self.rows()}
        todo = [(c, p) for c, p in zip(self.cfgs, self.plans, strict=True) if states[p["cell_id"]]["state"] in RESUBMIT]
        return plan_file, states, todo

    def open_parent(self, plan_file: Path) -> str:
        from .curves_summary import describe_sweep
        from .tracking import open_parent_run

        axes = {axis: sorted({p[axis] for p in self.plans}) for axis in ("model", "paradigm", "loss")}
        budgets = ",".join(f"{b:.6g}" for b in sorted({float(p["flops_budget"]) for p in self.plans}))
        grid = {f"grid.{k}": ",".join(v) for k, v in axes.items()}
        parent = open_parent_run(self.uri, self.sweep["name"], self.first["tracking"]["artifacts"],
                                 {**grid, "grid.cells": len(self.plans), "budget.flops": budgets,
                                  "budget.match": self.first["budget"].get("match")}, [plan_file])
        describe_sweep(self.uri, self.sweep["name"], parent, {**grid, "budget.flops": budgets}, len(self.plans))
        return parent

    def commit(self, states: Mapping[str, Mapping[str, Any]], todo: Sequence[tuple[dict[str, Any], dict[str, Any]]],
               axes: Mapping[str, Mapping[str, str]]) -> list[Job]:
        """Under the sweep's lock: end stale jobs, close dead runs, then submit to SLURM, or record the
        cells as QUEUED by this process for the local workers. Returns the jobs."""
        from . import local_jobs
        from .slurm_dispatch import submit_slurm
        from .tracking import fail_if_running

        end_stale(self.ledger, [p["cell_id"] for _, p in todo if states[p["cell_id"]]["state"] == "STALE"])
        for _, plan in todo:  # a dead attempt's run must not stay RUNNING; the new attempt reopens it
            fail_if_running(self.uri, self.sweep["name"], plan["cell_id"])
        jobs = cell_jobs(todo, self.base / "stages")
        if self.launcher["name"] == "slurm":
            arrays = submit_slurm(jobs, {p["cell_id"]: c for c, p in todo}, self.launcher, self.ledger, axes,
                                  self.base / "slurm", self.sweep["name"])
            print(f"submitted {len(todo)} cells to SLURM (jobs {', '.join(arrays)}); follow them with "
                  f"`python -m retrieval_scaling.status sweep={self.sweep['name']}`, resubmit with this same command")
        else:
            me = {"pid": os.getpid(), **local_jobs.identity(os.getpid())}
            for cell in axes:
                self.ledger.queued(cell, axes[cell], owner=me)
        return jobs

    def run(self) -> int:
        """Submit (and locally, run) every cell that is not DONE, RUNNING or PENDING."""
        from .local_dispatch import dispatch_local, live_local_attempts, local_order
        from .predictions import store_predictions
        from .relog import relog_sweep
        from .stages import holding_lock
        from .tracking import close_run, fail_if_running

        check_prepared(self.cfgs)  # jobs run offline: what they read must be prepared before anything is submitted
        check_inputs(self.cfgs)
        with holding_lock(self.base / "dispatch"):  # one parent run and one description, however many start
            plan_file = write_plan(self.cfgs, self.plans)
            parent = self.open_parent(plan_file)
        try:
            relog_sweep(self.sweep["root"], self.sweep["name"], self.uri, self.first["tracking"]["artifacts"])
            with holding_lock(self.base / "dispatch"):  # two sweeps of one name decide one after the other
                freed = remove_stale_stores(self.sweep["root"], self.sweep["name"], self.sweep["cache_dir"])
                if freed:
                    log.info("removed %.2f GB of encodings no evaluation reads again", freed / 1e9)
                _, states, todo = self.decide()
                log.info("%d cells: %d to submit, the others done, running or pending", len(self.cfgs), len(todo))
                axes = {p["cell_id"]: {k: p[k] for k in ("model", "paradigm", "loss")} for _, p in todo}
                store_predictions(self.uri, Path(self.sweep["root"]), self.sweep["name"], todo, parent)
                jobs = self.commit(states, todo, axes) if todo else []
            if not todo:
                print("nothing to submit: every cell is done, running or pending")
            elif self.launcher["name"] == "local":
                dispatch_local(local_order(jobs, {p["model"]: p["params_total"] for p in self.plans}), self.launcher,
                               self.ledger, axes, earlier=live_local_attempts(self.ledger),
                               on_cell_failed=lambda cell: fail_if_running(self.uri, self.sweep["name"], cell))
        except BaseException:
            close_run(self.uri, parent, "FAILED")
            raise
        close_run(self.uri, parent)  # reopened by the next invocation (resubmission, widened grid)
        return self.report()

    def report(self) -> int:
        from .credentials import redact
        from .curves import sweep_curves
        from .status import print_table

        rows = self.rows()
        print_table(rows, title=f"sweep '{self.sweep['name']}'")
        print(f"results: {self.base}  ·  MLflow store: {redact(self.uri)}  ·  UI: make ui "
              f"(mlflow ui --backend-store-uri {redact(self.uri)})")
        if self.launcher["name"] == "slurm":
            return 0
        png = sweep_curves(self.uri, self.sweep["name"], Path(self.sweep["root"]), self.first)
        if png is not None:
            print(f"scaling curves: {png}  ·  summary: {png.with_name('summary.md')}")
        return 0 if all(r["state"] == "DONE" for r in rows) else 1


def run_sweep(cfgs: list[dict[str, Any]]) -> int:
    """Plan; then (unless dry run) submit every cell that is not DONE, RUNNING or PENDING. Locally,
    wait for them (exit 0 when all are done, 1 otherwise); on SLURM, return once submitted.
    Deciding and submitting happen under the sweep's lock, and a local sweep records the cells it will
    run as QUEUED before it lets go: a second sweep of the same name, started at the same time, sees
    them taken and runs none of them again."""
    from .stages import holding_lock

    sweep = Sweep(cfgs)
    if sweep.sweep["dry_run"]:
        with holding_lock(sweep.base / "dispatch"):
            plan_file, states, _ = sweep.decide()
        print_plan(sweep.cfgs, sweep.plans, states, plan_file, sweep.totals)
        print_inputs(sweep.cfgs)
        return 0
    return sweep.run()
