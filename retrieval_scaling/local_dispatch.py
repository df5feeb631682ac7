"""Local dispatch: cells and stages jobs as local submitit processes, at most `max_parallel` at once,
in the order that ends the sweep soonest, each cell after its backbone's stages job."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .jobs import Job, JobCall
from .ledger import Ledger

log = logging.getLogger(__name__)


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
                log.error("%s failed: %s (log: %s)", job.name, failure_cause(str(error)), job.handle.paths.stderr)
            else:
                log.info("%s done", job.name)
    return outcome


TRACE_RULE = "----------------------"  # what submitit puts around a failed job's traceback


def failure_cause(message: str) -> str:
    """What made a job fail, in one line: the exception line that ends the traceback submitit reports
    (its message continues past the log paths it appends), else the message's first line."""
    lines = message.strip().splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip() == TRACE_RULE]
    trace = lines[rules[0] + 1:rules[-1]] if len(rules) >= 2 else lines
    cause = next((line.strip() for line in reversed(trace) if line.strip()), "")
    return cause or (lines[0].strip() if lines else "no message")


def live_local_attempts(ledger: Ledger) -> list[dict[str, Any]]:
    """Local attempts whose process still runs: earlier sweeps' jobs that keep using a worker."""
    from . import local_jobs

    attempts = [e["attempts"][-1] for e in ledger.cells.values() if e.get("attempts")]
    return [a for a in attempts if a.get("launcher") == "local" and a.get("state") == "SUBMITTED"
            and local_jobs.alive(a.get("job_id"), a)]
