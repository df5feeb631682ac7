"""Hydra launcher of retrieval-scaling: compose every cell of the multirun, then hand them to
`retrieval_scaling.scheduler` in one go (Hydra's own launchers run or submit jobs one by one and
cannot plan, skip done cells, or cap concurrency)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

OUTCOME: dict[str, int] = {}


class CellLauncher(Launcher):
    def __init__(self, **_: object) -> None:
        self.config: DictConfig | None = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:  # noqa: ARG002
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from retrieval_scaling.errors import UserError
        from retrieval_scaling.scheduler import run_sweep

        cfgs = []
        for overrides in job_overrides:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            cfgs.append(OmegaConf.to_container(cfg, resolve=True))
        try:
            OUTCOME["exit_code"] = run_sweep(cfgs)
        except UserError as exc:  # bad input: one clear line, no traceback, nothing submitted
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        returns = []
        for idx, overrides in enumerate(job_overrides):
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)
            ret.task_name, ret.working_dir = "cell", str(initial_job_idx + idx)
            returns.append(ret)
        return returns
