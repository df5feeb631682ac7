"""The units of work a sweep dispatches: a cell, or the shared stages of one backbone, as a submitit
call whose process ends as soon as its successful result is saved."""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from .cell_model import stage_dirs
from .passages import training_collection

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


def run_stages_job(cfg: Mapping[str, Any]) -> None:
    from .backbone import load_tokenizer
    from .cell_model import deepspeed_config, ensure_backbone
    from .cli import setup_logging
    from .distributed import configure_threads, init_distributed
    from .training_data import ensure_training_data
    from .training_tokens import ensure_training_tokens, training_max_len

    setup_logging()
    configure_threads(int(cfg["launcher"]["threads_per_job"] or 1))
    init_distributed()  # every rank of the stages job builds the stages together (parts of the data, DeepSpeed)
    cache = Path(cfg["sweep"]["cache_dir"])
    data_dir = ensure_training_data(cfg["data"], cache)
    corpus = training_collection(cfg["data"], cache)  # the passages the training data mapped, not a dict
    local_dir, _ = ensure_backbone(cfg["model"], corpus, cache, deepspeed_config(cfg))
    # the training tokens for this backbone's tokenizer, so that no cell's GPUs wait while they are built
    tokenizer = load_tokenizer(cfg["model"], local_dir)
    ensure_training_tokens(data_dir, tokenizer, training_max_len(cfg["data"]), cache)


class JobCall:
    """`fn(*args)` as a submitit job whose process ends as soon as submitit has saved its successful
    result (see `end_after_saved_result`)."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        from .distributed import TIMEOUT_ENV
        from .inputs import work_offline

        end_after_saved_result()
        cfg = self.args[0] if self.args else None
        if isinstance(cfg, Mapping) and "inputs_dir" in cfg.get("sweep", {}):  # a cell's or stages job's config
            work_offline(cfg)
            seconds = collective_timeout_s(cfg["launcher"])
            if seconds:
                os.environ[TIMEOUT_ENV] = str(seconds)
        return self.fn(*self.args)


def collective_timeout_s(launcher: Mapping[str, Any]) -> float | None:
    """The launcher's `collective_timeout_s`, else the job's time limit: long waits between ranks happen
    outside collectives (see `distributed`), so a collective that waits longer than that is stuck."""
    explicit = launcher.get("collective_timeout_s")
    minutes = launcher.get("time_limit_min") or launcher.get("timeout_min")
    return float(explicit) if explicit else 60.0 * float(minutes) if minutes else None


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
