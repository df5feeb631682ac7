"""Two-phase dispatch of a sweep: decide (compose, identify, plan, check, skip what is done), then
commit (prepare shared stages, submit through submitit, at most N at once, record the ledger).
A dry run stops after the first phase."""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from .cell import run_cell, stage_dirs
from .data import DATA_ROOT_ENV, load_training_collection, resolve_data_root, training_spec
from .errors import ConfigError, DataError
from .layout import cell_dir, ledger_path, plan_path, sweep_dir, write_json
from .ledger import Ledger
from .plan import check_budget, plan_cell

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A unit of work for the executor: a shared stage or a cell."""

    name: str
    fn: Callable[..., Any]
    args: tuple
    folder: Path
    cell: str | None = None
    stage: str | None = None  # the stage key this job builds
    needs: str | None = None  # the stage key of this sweep's stages job this cell waits for (SLURM: afterok)
    handle: Any = field(default=None, repr=False)


def normalise_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """Absolute paths for everything a job process reads (its cwd and environment may differ)."""
    sweep = cfg["sweep"]
    root = Path(sweep["root"]).resolve()
    sweep["cache_dir"] = str(Path(sweep["cache_dir"]).resolve())
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


def stage_targets(cfg: Mapping[str, Any]) -> tuple[Path, ...]:
    """The shared stages a cell needs: its training data, and its backbone's tiny pretraining or GGUF
    conversion and MNTP."""
    from .layout import training_data_dir

    cache = Path(cfg["sweep"]["cache_dir"])
    backbone = stage_dirs(cfg["model"], cfg["data"]["name"], cache)
    return (training_data_dir(cfg["data"], cache), *(d for d in backbone if d is not None))


def stage_key(targets: Sequence[Path]) -> str:
    return "+".join(t.name for t in targets)


def stage_jobs(cfgs: Sequence[Mapping[str, Any]], folder: Path) -> list[Job]:
    """One job per backbone whose shared stages (training data, tiny pretraining, MNTP) are not all
    built, to run before the cells that need them (a dependency, not a per-cell redo)."""
    from .stages import is_built

    jobs, seen = [], set()
    for cfg in cfgs:
        targets = stage_targets(cfg)
        key = stage_key(targets)
        if key in seen or all(is_built(t) for t in targets):
            continue
        seen.add(key)
        jobs.append(Job(f"stages {cfg['model']['name']}", run_stages_job, (cfg,),
                        folder / f"{cfg['model']['name']}", cell=None, stage=key))
    return jobs


def local_order(jobs: Sequence[Job], params: Mapping[str, float]) -> list[Job]:
    """The order local workers take jobs in (a cell also waits for its stages job, see `dispatch_local`):
    the biggest backbones first, stages before cells, because the biggest backbone's stages and then its
    cells are the sweep's longest chain — begun last, they would end the sweep alone on one worker.
    Within a backbone, cells alternate over paradigms (sparse/cl, dense/cl, sparse/kd, …): the cells of
    one (backbone, paradigm) share one step-0 evaluation, and the second of two started together would
    only wait for the first to build it. `params`: backbone (model name) → its parameter count."""
    turn: dict[int, int] = {}  # id(job) → its place among its (backbone, paradigm)'s cells
    counts: dict[tuple[str, str], int] = {}
    for job in jobs:
        if job.cell:
            group = (job.args[0]["model"]["name"], job.args[0]["paradigm"]["name"])
            turn[id(job)] = counts.get(group, 0)
            counts[group] = turn[id(job)] + 1
    return sorted(jobs, key=lambda j: (j.cell is not None, -params[j.args[0]["model"]["name"]], turn.get(id(j), 0)))


def run_stages_job(cfg: Mapping[str, Any]) -> None:
    from .cell import deepspeed_config, ensure_backbone
    from .cli import setup_logging
    from .distributed import configure_threads, init_distributed
    from .prepare import ensure_training_data

    setup_logging()
    configure_threads(int(cfg["launcher"]["threads_per_job"] or 1))
    init_distributed()  # every rank of the stages job builds the stages together (parts of the data, DeepSpeed)
    ensure_training_data(cfg["data"], Path(cfg["sweep"]["cache_dir"]))
    corpus = load_training_collection(cfg["data"])
    ensure_backbone(cfg["model"], corpus, Path(cfg["sweep"]["cache_dir"]), deepspeed_config(cfg))


class JobCall:
    """`fn(*args)` as a submitit job whose process ends as soon as submitit has saved its successful
    result (see `end_after_saved_result`)."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        end_after_saved_result()
        return self.fn(*self.args)


class Requeueable(JobCall, submitit.helpers.Checkpointable):
    """A `JobCall` SLURM may requeue: on its warning signal, `checkpoint()` (inherited) resubmits this
    same call. A cell then resumes from the checkpoint its training loop took at the signal (see
    `requeue`); a stages job rebuilds only what is not built yet."""


def end_after_saved_result() -> None:
    """In a submitit job process: at exit, once submitit has saved a *successful* result, end the
    process at once (status 0) instead of tearing the interpreter down, which took a cell job 1.2-2 s
    here (its models, data and thousands of modules) while the next job waited for the worker. A failed
    job exits as usual. Registered when the job starts, before it imports torch, MLflow & co., so their
    exit hooks, registered later, still run first (atexit is last-in, first-out); logging's and the
    standard streams' flushes come from earlier and are done here. Outside a submitit job: nothing."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return
    atexit.register(_exit_if_succeeded, submitit.JobEnvironment().paths.result_pickle)


def _exit_if_succeeded(result_pickle: Path) -> None:
    try:
        with result_pickle.open("rb") as f:
            succeeded = pickle.load(f)[0] == "success"
    except Exception:  # noqa: BLE001 — no readable result: leave the exit to Python
        return
    if succeeded:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def dispatch_local(jobs: Sequence[Job], launcher_cfg: Mapping[str, Any], ledger: Ledger,
                   axes: Mapping[str, Mapping[str, str]],
                   on_cell_failed: Callable[[str], Any] = lambda cell: None,
                   earlier: Sequence[Mapping[str, Any]] = ()) -> dict[str, str]:
    """Run jobs as local submitit processes, at most `max_parallel` at once, each free worker taking the
    first job in `jobs`' order whose stages job (`needs`) has ended, as SLURM's afterok would let it.
    A cell whose stages job failed still runs: it tries to build them itself and fails with the cause in
    its own log and run. `earlier`: ledger attempts of jobs an earlier sweep process started, which hold
    a worker while they live. Returns job name → COMPLETED / FAILED."""
    import submitit

    from . import local_jobs

    threads = str(launcher_cfg["threads_per_job"] or 1)
    cap = launcher_cfg.get("max_parallel") or (os.cpu_count() or 1) // int(threads)
    cap = max(1, int(cap))
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    queue, running, outcome, ended_stages = list(jobs), [], {}, set()
    while queue or running:
        earlier = [a for a in earlier if local_jobs.alive(a["job_id"], a)]
        while len(running) + len(earlier) < cap:
            job = next((j for j in queue if j.needs is None or j.needs in ended_stages), None)
            if job is None:
                break
            queue.remove(job)
            executor = submitit.LocalExecutor(folder=job.folder)
            executor.update_parameters(timeout_min=int(launcher_cfg["timeout_min"]))
            job.handle = executor.submit(JobCall(job.fn, *job.args))
            log.info("started %s (job %s)", job.name, job.handle.job_id)
            if job.cell:
                ledger.submitted(job.cell, str(job.handle.job_id), axes[job.cell], "local",
                                 **local_jobs.identity(int(job.handle.job_id)))
            running.append(job)
        time.sleep(0.25)  # a finished job frees its worker within a quarter second
        for job in [j for j in running if j.handle.done()]:
            running.remove(job)
            error = job.handle.exception()
            state = "FAILED" if error else "COMPLETED"
            outcome[job.name] = state
            if job.stage:
                ended_stages.add(job.stage)
            if job.cell:
                ledger.ended(job.cell, state, str(error) if error else None)
                if error:
                    on_cell_failed(job.cell)
            if error:
                log.error("%s failed: %s (log: %s)", job.name, str(error).strip().splitlines()[-1],
                          job.handle.paths.stderr)
            else:
                log.info("%s done", job.name)
    return outcome


def submit_slurm(jobs: Sequence[Job], cfg_of: Mapping[str, dict[str, Any]], launcher_cfg: Mapping[str, Any],
                 ledger: Ledger, axes: Mapping[str, Mapping[str, str]], folder: Path, sweep: str) -> list[str]:
    """Stage jobs first (one per backbone, unless an earlier one is still queued or running), then the
    cells as array jobs, one per (resource shape, stage dependency). Returns the array job ids."""
    from . import slurm

    live_stage = {}
    earlier = {k: v["job_id"] for k, v in ledger.stages.items()}
    states = slurm.job_states(earlier.values())
    for job in (j for j in jobs if j.stage):
        cfg = job.args[0]
        old = earlier.get(job.stage)
        if old and slurm.SACCT_TO_CELL.get(states.get(old, "")) in ("PENDING", "RUNNING"):
            live_stage[job.stage] = old
            continue
        # Stages under their own resources: every rank of them trains the stages (DeepSpeed), see run_stages_job.
        res = slurm.stage_resources_for(launcher_cfg, cfg["model"]["name"])
        cfg["launcher"]["threads_per_job"] = res["cpus_per_task"]
        (job_id,) = slurm.submit(folder, launcher_cfg, res, f"rs-{sweep}-stages", [Requeueable(run_stages_job, cfg)])
        ledger.stage_submitted(job.stage, job_id)
        live_stage[job.stage] = job_id
        log.info("submitted %s as job %s", job.name, job_id)
    groups: dict[tuple[str, str | None], list[Job]] = {}
    for job in (j for j in jobs if j.cell):
        cfg = cfg_of[job.cell]
        res = slurm.resources_for(launcher_cfg, cfg["model"]["name"])
        cfg["launcher"]["threads_per_job"] = res["cpus_per_task"]
        dep = live_stage[job.needs] if job.needs else None
        groups.setdefault((json.dumps(res, sort_keys=True), dep), []).append(job)
    arrays = []
    for (res_json, dep), group in groups.items():
        calls = [Requeueable(run_cell, cfg_of[j.cell]) for j in group]
        ids = slurm.submit(folder, launcher_cfg, json.loads(res_json), f"rs-{sweep}", calls,
                           dependency=f"afterok:{dep}" if dep else None)
        for job, job_id in zip(group, ids, strict=True):
            ledger.submitted(job.cell, job_id, axes[job.cell], "slurm")
        arrays.append(ids[0].split("_")[0])
        log.info("submitted %d cells as job %s%s", len(group), arrays[-1], f" (after stages job {dep})" if dep else "")
    return arrays


def print_plan(cfgs: Sequence[Mapping[str, Any]], plans: Sequence[Mapping[str, Any]],
               states: Mapping[str, Mapping[str, Any]], plan_file: Path, totals: Mapping[str, float]) -> None:
    """The dry run's table and the study's GPU-hours."""
    from .status import RESUBMIT, print_table

    first, sweep = cfgs[0], cfgs[0]["sweep"]
    todo = [p for p in plans if states[p["cell_id"]]["state"] in RESUBMIT]
    rows = [{**p, "batch": p["queries_per_step"], "group": p["passages_per_query"],
             "lengths": f"{p['query_len']}/{p['passage_len']}", "params": p["params_total"],
             "trainable": p["params_trainable"], "flops/step": p["flops_per_step"],
             "gpus": f"{p['gpus']}/{p['nodes']}n", "train_gpu_h": f"{p['gpu_hours']:.4g}",
             "mntp_gpu_h": f"{p['mntp_gpu_hours']:.4g}", "eval_gpu_h": f"{p['eval_gpu_hours']:.4g}"
             + ("*" if p["eval_unpriced"] else ""),
             "state": states[p["cell_id"]]["state"],
             "action": "submit" if states[p["cell_id"]]["state"] in RESUBMIT else "skip"} for p in plans]
    print_table(rows, title=f"plan of sweep '{sweep['name']}' ({len(plans)} cells, {len(todo)} to submit, "
                            f"{totals['total_gpu_hours']:.4g} GPU-hours on {first['planner']['accelerator']} "
                            f"at {first['planner']['utilization']:.0%} of peak)",
                columns=("cell_id", "model", "paradigm", "loss", "batch", "group", "lengths", "params",
                         "trainable", "flops/step", "steps", "tokens", "flops_total", "gpus", "train_gpu_h",
                         "mntp_gpu_h", "eval_gpu_h", "state", "action"))
    unpriced = sorted({c for p in plans for c in p["eval_unpriced"]})
    print("GPU-hours of the study (shared stages and step-0 evaluations counted once): "
          f"MNTP {totals['mntp_gpu_hours']:.4g}, training {totals['train_gpu_hours']:.4g}, evaluation "
          f"{totals['eval_gpu_hours']:.4g}, total {totals['total_gpu_hours']:.4g}"
          + (f"; * not priced (no declared or readable size): {', '.join(unpriced)}" if unpriced else ""))
    print(f"plan written to {plan_file} (dry run: nothing submitted)")


def end_stale(ledger: Ledger, cells: Sequence[str]) -> None:
    """End the last job of each STALE cell the way its launcher can: scancel on SLURM, SIGKILL of
    the process tree for a local job still on this host (a PID is never passed to scancel)."""
    from . import local_jobs, slurm

    last = {c: ledger.cells[c]["attempts"][-1] for c in cells if ledger.cells.get(c, {}).get("attempts")}
    slurm.cancel([a["job_id"] for a in last.values() if a.get("launcher") == "slurm" and a.get("job_id")])
    for cell, attempt in last.items():
        if attempt.get("launcher") == "local" and attempt.get("job_id") and local_jobs.kill(attempt["job_id"], attempt):
            log.warning("cell %s: killed its stalled local job %s", cell, attempt["job_id"])


def live_local_attempts(ledger: Ledger) -> list[dict[str, Any]]:
    """Local attempts whose process still runs: earlier sweeps' jobs that keep using a worker."""
    from . import local_jobs

    attempts = [e["attempts"][-1] for e in ledger.cells.values() if e.get("attempts")]
    return [a for a in attempts if a.get("launcher") == "local" and a.get("state") == "SUBMITTED"
            and local_jobs.alive(a.get("job_id"), a)]


def run_sweep(cfgs: list[dict[str, Any]]) -> int:
    """Plan; then (unless dry run) submit every cell that is not DONE, RUNNING or PENDING. Locally,
    wait for them (exit 0 when all are done, 1 otherwise); on SLURM, return once submitted.
    Deciding and submitting happen under the sweep's lock, and a local sweep records the cells it will
    run as QUEUED before it lets go: a second sweep of the same name, started at the same time, sees
    them taken and runs none of them again."""
    from . import local_jobs
    from .config_checks import check_cell
    from .credentials import redact
    from .stages import holding_lock
    from .status import RESUBMIT, print_table, sweep_rows
    from .tracking import close_run, fail_if_running, hide_secret, open_parent_run, tracking_uri

    for cfg in cfgs:
        check_cell(cfg)
    cfgs = [normalise_paths(c) for c in cfgs]
    first = cfgs[0]
    sweep, launcher = first["sweep"], first["launcher"]
    plans = plan_sweep(cfgs)
    from .pricing import price_study

    totals = price_study(cfgs, plans)  # each plan gets its GPU-hours, written into plan.json
    uri = tracking_uri(first["tracking"], sweep["root"])
    for cfg in cfgs:  # jobs' configs, pickles and artifacts hold the URI without its secret
        if cfg["tracking"].get("uri"):
            cfg["tracking"]["uri"] = hide_secret(uri)
    stale_after = float(sweep["stale_after_s"])
    base = sweep_dir(sweep["root"], sweep["name"])

    def decide() -> tuple[Path, dict[str, dict[str, Any]], list[tuple[dict[str, Any], dict[str, Any]]]]:
        plan_file = write_plan(cfgs, plans)
        states = {r["cell_id"]: r for r in sweep_rows(sweep["name"], sweep["root"], uri, stale_after)}
        todo = [(c, p) for c, p in zip(cfgs, plans, strict=True) if states[p["cell_id"]]["state"] in RESUBMIT]
        return plan_file, states, todo

    if sweep["dry_run"]:
        with holding_lock(base / "dispatch"):
            plan_file, states, _ = decide()
        print_plan(cfgs, plans, states, plan_file, totals)
        return 0
    check_inputs(cfgs)
    axes_values = {axis: sorted({p[axis] for p in plans}) for axis in ("model", "paradigm", "loss")}
    with holding_lock(base / "dispatch"):
        plan_file = write_plan(cfgs, plans)
    parent = open_parent_run(uri, sweep["name"], first["tracking"]["artifacts"],
                             {**{f"grid.{k}": ",".join(v) for k, v in axes_values.items()},
                              "grid.cells": len(plans), "budget.flops": first["budget"]["flops"],
                              "budget.match": first["budget"].get("match")},
                             [plan_file])
    try:
        from .relog import relog_sweep

        relog_sweep(sweep["root"], sweep["name"], uri, first["tracking"]["artifacts"])
        ledger = Ledger(ledger_path(sweep["root"], sweep["name"]))
        with holding_lock(base / "dispatch"):  # two sweeps of one name decide one after the other
            _, states, todo = decide()
            log.info("%d cells: %d to submit, the others done, running or pending", len(cfgs), len(todo))
            jobs: list[Job] = []
            axes = {p["cell_id"]: {k: p[k] for k in ("model", "paradigm", "loss")} for _, p in todo}
            if todo:
                end_stale(ledger, [p["cell_id"] for _, p in todo if states[p["cell_id"]]["state"] == "STALE"])
                for _, plan in todo:  # a dead attempt's run must not stay RUNNING; the new attempt reopens it
                    fail_if_running(uri, sweep["name"], plan["cell_id"])
                jobs = stage_jobs([c for c, _ in todo], base / "stages")
                pending_stages = {j.stage for j in jobs}
                cfg_of = {p["cell_id"]: c for c, p in todo}
                for cfg, plan in todo:
                    needs = stage_key(stage_targets(cfg))
                    jobs.append(Job(f"cell {plan['cell_id']} {plan['model']}/{plan['paradigm']}/{plan['loss']}",
                                    run_cell, (cfg,), cell_dir(cfg) / "logs", cell=plan["cell_id"],
                                    needs=needs if needs in pending_stages else None))
                if launcher["name"] == "slurm":
                    arrays = submit_slurm(jobs, cfg_of, launcher, ledger, axes, base / "slurm", sweep["name"])
                    print(f"submitted {len(todo)} cells to SLURM (jobs {', '.join(arrays)}); follow them with "
                          f"`python -m retrieval_scaling.status sweep={sweep['name']}`, resubmit with this same "
                          "command")
                else:
                    me = {"pid": os.getpid(), **local_jobs.identity(os.getpid())}
                    for cell in axes:
                        ledger.queued(cell, axes[cell], owner=me)
            else:
                print("nothing to submit: every cell is done, running or pending")
        if todo and launcher["name"] == "local":
            dispatch_local(local_order(jobs, {p["model"]: p["params_total"] for p in plans}), launcher, ledger, axes,
                           on_cell_failed=lambda cell: fail_if_running(uri, sweep["name"], cell),
                           earlier=live_local_attempts(ledger))
    except BaseException:
        close_run(uri, parent, "FAILED")
        raise
    close_run(uri, parent)  # reopened by the next invocation (resubmission, widened grid)
    rows = sweep_rows(sweep["name"], sweep["root"], uri, stale_after)
    print_table(rows, title=f"sweep '{sweep['name']}'")
    print(f"results: {base}  ·  MLflow store: {redact(uri)}  ·  UI: make ui "
          f"(mlflow ui --backend-store-uri {redact(uri)})")
    if launcher["name"] == "slurm":
        return 0
    return 0 if all(r["state"] == "DONE" for r in rows) else 1
