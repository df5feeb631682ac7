"""Hydra sweeper and launcher of retrieval-scaling: compose every cell of the multirun, then hand
them to the verb (`retrieval_scaling.scheduler`, or `prepare`) in one go (Hydra's own launchers run or
submit jobs one by one and cannot plan, skip done cells, or cap concurrency)."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

from retrieval_scaling.config_checks import assign, check_cell, lookup

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
    """Each job's config as Hydra composes it, with Hydra's composition run a handful of times per grid,
    not once per cell. The first job is composed in full: the base. A job that chooses other options of
    some groups (`model=…`, `loss=…`) is the base with those groups' nodes swapped for the options' own,
    each option composed once against the base; an option whose composition changes anything outside
    its own node (a `_global_` package, say) is composed in full with its job instead. Value overrides
    (`seed=3`) are then applied as Hydra applies them; where no interpolation reads the key, straight onto
    the resolved config. `tests/test_composer.py` checks every cell equal to Hydra's own composition."""

    def __init__(self, config_loader, master: DictConfig):
        self.loader, self.master = config_loader, master
        self.parser = OverridesParser.create(config_loader=config_loader)
        self.base: tuple[dict[str, str], DictConfig] | None = None  # the first job's group overrides, config
        self.options: dict[tuple[str, str], DictConfig | None] = {}  # (group, option) → its node; None: global
        self.combos: dict[tuple[str, ...], DictConfig] = {}
        self.resolved: dict[tuple[str, ...], tuple[dict, str]] = {}  # combo → resolved, interpolations' text

    def _load(self, groups: Sequence[str]) -> DictConfig:
        composed = self.loader.load_sweep_config(self.master, list(groups))
        with open_dict(composed):  # a cell reads none of Hydra's own node: half of what a copy copies
            del composed["hydra"]
        return composed

    def _option(self, group: str, option: str) -> DictConfig | None:
        """The node the override `option` (`model=tiny_m`) of `group` gives against the base; None when it
        changes more than that node."""
        if (group, option) not in self.options:
            lines, base = self.base
            cfg = self._load(list({**lines, group: option}.values()))
            top = group.split("/")[0]
            outside = [{k: v for k, v in OmegaConf.to_container(c).items() if k != top} for c in (cfg, base)]
            self.options[group, option] = cfg[top] if outside[0] == outside[1] else None
        return self.options[group, option]

    def compose(self, overrides: Sequence[str]) -> tuple[tuple[str, ...], list]:
        """(the job's group choices as a cache key, its value overrides), its combination composed."""
        groups, values = [], []
        for override in self.parser.parse_overrides(list(overrides)):
            (groups if self.loader.repository.group_exists(override.key_or_group) else values).append(override)
        key = tuple(o.input_line for o in groups)
        if key not in self.combos:
            choices = {o.key_or_group: o.input_line for o in groups}
            if self.base is None:
                self.base = choices, self._load(list(key))
                self.combos[key] = self.base[1]
            else:
                self.combos[key] = self._derived(choices, list(key))
        return key, values

    def _derived(self, choices: dict[str, str], groups: list[str]) -> DictConfig:
        base_choices, base = self.base
        if set(choices) != set(base_choices):
            return self._load(groups)
        changed = {g: o for g, o in choices.items() if base_choices[g] != o}
        nodes = {g: self._option(g, o) for g, o in changed.items()}
        if any(node is None for node in nodes.values()):
            return self._load(groups)
        cfg = copy.deepcopy(base)
        for group, node in nodes.items():
            cfg[group.split("/")[0]] = copy.deepcopy(node)
        return cfg

    def cell(self, overrides: Sequence[str]) -> dict:
        """A cell's resolved config as the scheduler takes it (no Hydra node)."""
        key, values = self.compose(overrides)
        if key not in self.resolved:
            plain = OmegaConf.to_container(self.combos[key], resolve=False)
            self.resolved[key] = OmegaConf.to_container(self.combos[key], resolve=True), interpolations(plain)
        resolved, read = self.resolved[key]
        if all(plain_assignment(o, resolved, read) for o in values):
            cfg = copy.deepcopy(resolved)
            for o in values:
                assign(cfg, o.key_or_group, o.value())
            return cfg
        cfg = copy.deepcopy(self.combos[key])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        return OmegaConf.to_container(cfg, resolve=True)


def interpolations(node: Any) -> str:
    """Every interpolation's text in an unresolved config, joined: what a changed key could be read by."""
    if isinstance(node, dict):
        return " ".join(interpolations(v) for v in node.values())
    if isinstance(node, list):
        return " ".join(interpolations(v) for v in node)
    return node if isinstance(node, str) and "${" in node else ""


def plain_assignment(override, resolved: dict, read: str) -> bool:
    """Whether a value override can go straight onto the resolved config: `key=value` of a key that exists
    and holds a plain value, no interpolation reads it, and the value is a plain one."""
    if override.is_add() or override.is_delete() or override.is_force_add() or override.is_sweep_override():
        return False
    key = override.key_or_group
    present, node = lookup(resolved, key)
    if not present:
        return False
    value = override.value()
    plain = (str, int, float, bool, type(None))
    parts = key.split(".")
    # `${a.b}`, `${a}` (the whole node above it) or `${oc.select:a.b,…}` read `a.b`; `${a.c}` does not
    readers = [re.compile(r"(\$\{|:)" + re.escape(".".join(parts[:n])) + (r"[}.,]" if n == len(parts) else r"[},]"))
               for n in range(1, len(parts) + 1)]
    return (isinstance(node, plain) and isinstance(value, plain) and not (isinstance(value, str) and "${" in value)
            and not any(r.search(read) for r in readers))


class CellLauncher(Launcher):
    def __init__(self, **_: object) -> None:
        self.config: DictConfig | None = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:  # noqa: ARG002
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from retrieval_scaling.budget import resolve_budget
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
