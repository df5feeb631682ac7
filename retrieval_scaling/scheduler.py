"""Two-phase dispatch of a sweep: decide (compose, identify, plan, check, skip what is done), then
commit (prepare shared stages, submit through submitit, at most N at once, record the ledger).
A dry run stops after the first phase."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cell import cell_dir, is_done
from .data import load_collection, resolve_data_root
from .errors import ConfigError
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
    handle: Any = field(default=None, repr=False)


def sweep_dir(cfg: Mapping[str, Any]) -> Path:
    return Path(cfg["sweep"]["root"]) / cfg["sweep"]["name"]


def normalise_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """Absolute paths for everything a job process reads (its cwd and environment may differ)."""
    sweep = cfg["sweep"]
    root = Path(sweep["root"]).resolve()
    sweep["cache_dir"] = str(Path(sweep["cache_dir"]).resolve())
    sweep["root"] = str(root)
    cfg["tracking"]["artifacts"] = str(Path(cfg["tracking"]["artifacts"]).resolve())
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
    out = sweep_dir(cfgs[0])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(list(plans), indent=2))
    os.replace(tmp, path)
    return path


class Ledger:
    """`sweeps/<name>/ledger.json`: cell → attempts (job id, when, how it ended). Written only by the
    sweep process, atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.cells: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def submitted(self, cell: str, job_id: str, axes: Mapping[str, str]) -> None:
        entry = self.cells.setdefault(cell, {**axes, "attempts": []})
        entry["attempts"].append({"job_id": job_id, "submitted_at": time.time(), "state": "SUBMITTED"})
        self.save()

    def ended(self, cell: str, state: str, error: str | None = None) -> None:
        attempt = self.cells[cell]["attempts"][-1]
        attempt.update(state=state, ended_at=time.time())
        if error:
            attempt["error"] = error[-2000:]
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cells, indent=2))
        os.replace(tmp, self.path)


def check_inputs(cfgs: Sequence[Mapping[str, Any]]) -> None:
    """Load every collection the sweep reads once, so bad data fails before any job starts."""
    seen = set()
    for cfg in cfgs:
        specs = [(cfg["data"]["root"], cfg["data"]["name"], cfg["data"]["split"])]
        specs += [(cfg["eval"]["root"], c["name"], c["split"]) for c in cfg["eval"]["collections"]]
        for spec in specs:
            if spec not in seen:
                seen.add(spec)
                load_collection(*spec)


def stage_jobs(cfgs: Sequence[Mapping[str, Any]], folder: Path) -> list[Job]:
    """One job per backbone whose shared stages (tiny pretraining, MNTP) are not built yet, queued
    before the cells that need them."""
    from .backbone import pretrained_dir
    from .mntp import mntp_dir
    from .stages import is_built

    jobs, seen = [], set()
    for cfg in cfgs:
        model, cache, corpus = cfg["model"], Path(cfg["sweep"]["cache_dir"]), cfg["data"]["name"]
        targets = []
        if model.get("source") == "pretrain":
            targets.append(pretrained_dir(cache, model, corpus))
        if model.get("mntp"):
            targets.append(mntp_dir(cache, model, corpus))
        key = tuple(targets)
        if not targets or key in seen or all(is_built(t) for t in targets):
            continue
        seen.add(key)
        jobs.append(Job(f"backbone {model['name']}", run_backbone_stage, (cfg,), folder / f"backbone-{model['name']}"))
    return jobs


def run_backbone_stage(cfg: Mapping[str, Any]) -> None:
    from .cell import ensure_backbone, setup_logging
    from .distributed import configure_threads

    setup_logging()
    configure_threads(int(cfg["launcher"]["threads_per_job"]))
    corpus = load_collection(cfg["data"]["root"], cfg["data"]["name"], cfg["data"]["split"])
    ensure_backbone(cfg["model"], corpus, Path(cfg["sweep"]["cache_dir"]))


def run_cell_job(cfg: dict[str, Any]) -> dict[str, float]:
    from .cell import run_cell

    return run_cell(cfg)


def dispatch_local(jobs: Sequence[Job], launcher_cfg: Mapping[str, Any], ledger: Ledger,
                   axes: Mapping[str, Mapping[str, str]],
                   on_cell_failed: Callable[[str], Any] = lambda cell: None) -> dict[str, str]:
    """Run jobs as local submitit processes, in order, at most `max_parallel` at once.
    Returns job name → COMPLETED / FAILED."""
    import submitit

    threads = str(launcher_cfg["threads_per_job"])
    cap = launcher_cfg.get("max_parallel") or (os.cpu_count() or 1) // int(threads)
    cap = max(1, int(cap))
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    queue, running, outcome = list(jobs), [], {}
    while queue or running:
        while queue and len(running) < cap:
            job = queue.pop(0)
            executor = submitit.LocalExecutor(folder=job.folder)
            executor.update_parameters(timeout_min=int(launcher_cfg["timeout_min"]))
            job.handle = executor.submit(job.fn, *job.args)
            log.info("started %s (job %s)", job.name, job.handle.job_id)
            if job.cell:
                ledger.submitted(job.cell, str(job.handle.job_id), axes[job.cell])
            running.append(job)
        time.sleep(1.0)
        for job in [j for j in running if j.handle.done()]:
            running.remove(job)
            error = job.handle.exception()
            state = "FAILED" if error else "COMPLETED"
            outcome[job.name] = state
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


def run_sweep(cfgs: list[dict[str, Any]]) -> int:
    """Plan, then (unless dry run) run every cell that is not done. Exit code: 0 when all cells are
    done, 1 when some failed."""
    from .status import print_table, sweep_rows

    cfgs = [normalise_paths(c) for c in cfgs]
    first = cfgs[0]
    plans = plan_sweep(cfgs)
    plan_path = write_plan(cfgs, plans)
    if first["sweep"]["dry_run"]:
        print_table(plans, title=f"plan of sweep '{first['sweep']['name']}' ({len(plans)} cells)",
                    columns=("cell_id", "model", "paradigm", "loss", "params_total", "params_trainable",
                             "flops_per_step", "steps", "flops_total"))
        print(f"plan written to {plan_path} (dry run: nothing submitted)")
        return 0
    if first["launcher"]["name"] != "local":
        raise ConfigError(f"launcher={first['launcher']['name']}: only `local` is available in this version")
    check_inputs(cfgs)

    from .prepare import ensure_training_data
    from .tracking import ensure_experiment, fail_if_running, tracking_uri

    uri = tracking_uri(first["tracking"], first["sweep"]["root"])
    ensure_experiment(uri, first["sweep"]["name"], first["tracking"]["artifacts"])
    todo = [(c, p) for c, p in zip(cfgs, plans, strict=True) if not is_done(c)]
    log.info("%d cells, %d done, %d to run", len(cfgs), len(cfgs) - len(todo), len(todo))
    if todo:
        for data_cfg in {json.dumps(c["data"], sort_keys=True): c["data"] for c, _ in todo}.values():
            ensure_training_data(data_cfg, Path(first["sweep"]["cache_dir"]))
        jobs = stage_jobs([c for c, _ in todo], sweep_dir(first) / "stages")
        axes = {}
        for cfg, plan in todo:
            axes[plan["cell_id"]] = {k: plan[k] for k in ("model", "paradigm", "loss")}
            jobs.append(Job(f"cell {plan['cell_id']} {plan['model']}/{plan['paradigm']}/{plan['loss']}",
                            run_cell_job, (cfg,), cell_dir(cfg) / "logs", cell=plan["cell_id"]))
        dispatch_local(jobs, first["launcher"], Ledger(sweep_dir(first) / "ledger.json"), axes,
                       on_cell_failed=lambda cell: fail_if_running(uri, first["sweep"]["name"], cell))
    rows = sweep_rows(first["sweep"]["name"], first["sweep"]["root"], uri)
    print_table(rows, title=f"sweep '{first['sweep']['name']}'")
    print(f"results: {sweep_dir(first)}  ·  MLflow store: {uri}  ·  UI: make ui "
          f"(mlflow ui --backend-store-uri {uri})")
    return 0 if all(r["state"] == "DONE" for r in rows) else 1
