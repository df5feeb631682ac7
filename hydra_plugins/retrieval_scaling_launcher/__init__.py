"""Hydra sweeper and launcher of retrieval-scaling: compose every cell of the multirun, then hand
them to the verb (`retrieval_scaling.scheduler`, or `prepare`) in one go (Hydra's own launchers run or
submit jobs one by one and cannot plan, skip done cells, or cap concurrency)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

OUTCOME: dict[str, int] = {}


class CellSweeper(BasicSweeper):
    """Hydra's basic sweeper without its up-front composition of every job (CellLauncher composes
    each job itself, in the same process and before anything runs, so a bad override still stops
    the sweep first — and composing twice made a 1,008-cell plan take minutes), and without its
    `multirun.yaml`: written before any check, it went wherever `sweep.name` pointed and held the
    command line's values, a tracking URI's password among them. plan.json and MLflow keep the configs."""

    def sweep(self, arguments: list[str]) -> Any:
        params = [*self._parse_config(), *arguments]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params), self.max_batch_size)
        returns, first = [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            returns.append(self.launcher.launch(batch, initial_job_idx=first))
            first += len(batch)
        return returns


class Composer:
    """Each job's config as Hydra composes it, with the defaults tree built once per distinct set of
    config-group choices. Hydra itself composes the defaults from the group overrides, then applies
    the value overrides (`seed=3`, `train.lr=…`) to the result; this does the same, reusing the
    first step across jobs that differ only in values (all 56 seeds of a cell, say)."""

    def __init__(self, config_loader, master: DictConfig):
        self.loader, self.master = config_loader, master
        self.parser = OverridesParser.create(config_loader=config_loader)
        self.cache: dict[tuple[str, ...], DictConfig] = {}

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        groups, values = [], []
        for override in self.parser.parse_overrides(list(overrides)):
            (groups if self.loader.repository.group_exists(override.key_or_group) else values).append(override)
        key = tuple(o.input_line for o in groups)
        if key not in self.cache:
            self.cache[key] = self.loader.load_sweep_config(self.master, list(key))
        cfg = copy.deepcopy(self.cache[key])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        return cfg

    def cell(self, overrides: Sequence[str]) -> dict:
        """A cell's resolved config as the scheduler takes it (no Hydra node)."""
        cfg = self.compose(overrides)
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True)


class CellLauncher(Launcher):
    def __init__(self, **_: object) -> None:
        self.config: DictConfig | None = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:  # noqa: ARG002
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from retrieval_scaling.budget import resolve_budget
        from retrieval_scaling.config_checks import check_cell
        from retrieval_scaling.sweep import act

        composer = Composer(self.hydra_context.config_loader, self.config)
        matched: dict[tuple[str, ...], dict] = {}  # cells that differ only in their axes match the same cell

        def compose_matched(overrides: Sequence[str]) -> dict:
            key = tuple(overrides)
            if key not in matched:
                matched[key] = composer.cell(list(overrides))
            return matched[key]

        cfgs = []  # a UserError goes up to the verb's one error line (retrieval_scaling.cli)
        for overrides in job_overrides:
            cfg = composer.cell(overrides)
            check_cell(cfg)
            resolve_budget(cfg, list(overrides), compose_matched)
            cfgs.append(cfg)
        OUTCOME["exit_code"] = act(cfgs)
        returns = []
        for idx, overrides in enumerate(job_overrides):
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)
            ret.task_name, ret.working_dir = "cell", str(initial_job_idx + idx)
            returns.append(ret)
        return returns
