"""SLURM dispatch: a backbone's stages job, then its cells as array jobs (one per resource shape and
stages job) that wait for it with `afterok`; every job id goes into the ledger."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cell import run_cell
from .jobs import Job, Requeueable, run_stages_job
from .ledger import Ledger

log = logging.getLogger(__name__)


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
        cfg["launcher"].update(threads_per_job=res["cpus_per_task"], time_limit_min=res["time_min"])
        (job_id,) = slurm.submit(folder, launcher_cfg, res, f"rs-{sweep}-stages", [Requeueable(run_stages_job, cfg)])
        ledger.stage_submitted(job.stage, job_id)
        live_stage[job.stage] = job_id
        log.info("submitted %s as job %s", job.name, job_id)
    groups: dict[tuple[str, str | None], list[Job]] = {}
    for job in (j for j in jobs if j.cell):
        cfg = cfg_of[job.cell]
        res = slurm.resources_for(launcher_cfg, cfg["model"]["name"])
        cfg["launcher"].update(threads_per_job=res["cpus_per_task"], time_limit_min=res["time_min"])
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
