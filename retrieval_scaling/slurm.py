"""SLURM through submitit: cells go out as array jobs (one per resource shape), and job states come
back from `sacct`, the only source that survives the job (squeue forgets it, MLflow never hears of a
SIGKILL)."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

# sacct's job states → a cell's state (DONE is decided by the cell's marker, not by SLURM).
SACCT_TO_CELL = {
    "PENDING": "PENDING", "REQUEUED": "PENDING", "REQUEUE_HOLD": "PENDING", "REQUEUE_FED": "PENDING",
    "RESV_DEL_HOLD": "PENDING", "SUSPENDED": "RUNNING", "STOPPED": "RUNNING",
    "RUNNING": "RUNNING", "COMPLETING": "RUNNING", "CONFIGURING": "RUNNING", "RESIZING": "RUNNING",
    "SIGNALING": "RUNNING", "STAGE_OUT": "RUNNING",
    "COMPLETED": "COMPLETED",
    "FAILED": "FAILED", "NODE_FAIL": "FAILED", "BOOT_FAIL": "FAILED", "OUT_OF_MEMORY": "FAILED",
    "DEADLINE": "FAILED", "SPECIAL_EXIT": "FAILED",
    "TIMEOUT": "TIMEOUT", "PREEMPTED": "PREEMPTED", "CANCELLED": "CANCELLED", "REVOKED": "CANCELLED",
}
RESOURCE_KEYS = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min")


def resources_for(launcher_cfg: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The launcher's resources for a model size: `resources.default` overlaid by `resources.<model>`."""
    table = launcher_cfg.get("resources") or {}
    res = {**(table.get("default") or {}), **(table.get(model) or {})}
    missing = [k for k in RESOURCE_KEYS if res.get(k) is None]
    if missing:
        raise ConfigError(f"launcher.resources: {', '.join(missing)} not set for model '{model}' "
                          "(set them under resources.default or resources.<model>)")
    return {k: res[k] for k in RESOURCE_KEYS}


def stage_resources_for(launcher_cfg: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A backbone's stages job: its cells' resources, one rank and `stage_time_min` unless
    `stage_resources.default` / `stage_resources.<model>` say otherwise (the 8B MNTP on 4 GPUs, say)."""
    table = launcher_cfg.get("stage_resources") or {}
    res = {**resources_for(launcher_cfg, model), "nodes": 1, "tasks_per_node": 1}
    if launcher_cfg.get("stage_time_min"):
        res["time_min"] = launcher_cfg["stage_time_min"]
    res.update({k: v for k, v in {**(table.get("default") or {}), **(table.get(model) or {})}.items()
                if v is not None})
    unknown = sorted(set(res) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(f"launcher.stage_resources: unknown key(s) {unknown}; use {list(RESOURCE_KEYS)}")
    return res


def executor(folder: Path, launcher_cfg: Mapping[str, Any], res: Mapping[str, Any], name: str,
             dependency: str | None = None):
    """A submitit SLURM executor for one resource shape."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                               slurm_max_num_timeout=int(launcher_cfg["max_requeues"]))
    params: dict[str, Any] = {
        "name": name, "timeout_min": int(res["time_min"]), "nodes": int(res["nodes"]),
        "tasks_per_node": int(res["tasks_per_node"]), "cpus_per_task": int(res["cpus_per_task"]),
        "mem_gb": float(res["mem_gb"]),
        "slurm_array_parallelism": int(launcher_cfg["array_parallelism"]),
        "slurm_signal_delay_s": int(launcher_cfg["signal_delay_s"]),
        "slurm_additional_parameters": dict(launcher_cfg.get("additional_parameters") or {}),
        "slurm_setup": list(launcher_cfg.get("setup") or []),
    }
    for key in ("partition", "account", "qos", "constraint"):
        if launcher_cfg.get(key):
            params[f"slurm_{key}"] = launcher_cfg[key]
    if dependency:  # and if the stage job fails, cancel the cells instead of leaving them pending forever
        params["slurm_dependency"] = dependency
        params["slurm_additional_parameters"]["kill-on-invalid-dep"] = "yes"
    if int(res["gpus_per_node"]):
        params["gpus_per_node"] = int(res["gpus_per_node"])
    ex.update_parameters(**params)
    return ex


def submit(folder: Path, launcher_cfg: Mapping[str, Any], res: Mapping[str, Any], name: str,
           calls: Sequence[Any], dependency: str | None = None) -> list[str]:
    """Submit callables as one array job (one task each); returns their job ids (`<array>_<i>`)."""
    ex = executor(folder, launcher_cfg, res, name, dependency)
    if len(calls) == 1:
        return [str(ex.submit(calls[0]).job_id)]
    with ex.batch():
        jobs = [ex.submit(call) for call in calls]
    return [str(j.job_id) for j in jobs]


_ARRAY = re.compile(r"^(\d+)_\[(.+)\]$")


def _expand(job_id: str) -> list[str]:
    """`12_[0-2,5]` (a pending array's row in sacct) → 12_0, 12_1, 12_2, 12_5."""
    m = _ARRAY.match(job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _query(cmd: list[str]) -> dict[str, str]:
    try:
        # Not checked: squeue exits 1 when none of the ids is live any more, which is an answer.
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s unavailable (%s): SLURM job states unknown", cmd[0], exc)
        return {}
    states: dict[str, str] = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        word = state.split()[0] if state.strip() else ""  # "CANCELLED by 0" → CANCELLED
        for jid in _expand(job.strip()):
            states[jid] = word
    return states


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """job id → SLURM state word (PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, …) of the
    latest instance of each job (a requeued job shows its last run). squeue answers for live jobs (a
    job just submitted may not have reached accounting yet), sacct for ended ones. Ids neither
    knows are left out."""
    ids = sorted({j for j in job_ids if j})
    if not ids:
        return {}
    # An array cancelled while pending is known to sacct only by its base id (`12`, row `12_[0-3]`).
    joined = ",".join(sorted(set(ids) | {j.split("_")[0] for j in ids}))
    states = _query(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", joined])
    states.update(_query(["squeue", "-h", "-r", "-o", "%i|%T", "-j", joined]))
    return {j: states[j] for j in ids if j in states}


def cancel(job_ids: Iterable[str]) -> None:
    ids = [j for j in job_ids if j]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60, check=False)
