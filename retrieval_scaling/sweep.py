"""`python -m retrieval_scaling.sweep +grid=tiny [overrides]` — plan and run a grid of cells.

`+grid=<name>` makes Hydra compose every (model, paradigm, loss) cell; our launcher plans them all,
skips the ones that are done, and dispatches the rest (see `scheduler`). Without a grid, the
command runs the one cell the overrides describe. `sweep.dry_run=true` writes the plan only.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, UserError

EXIT: dict[str, int] = {}
ERROR: list[UserError] = []
# What the verb does with the cells Hydra composed: run the sweep, or (`prepare`) fetch their inputs.
ACTION: dict[str, Callable[[list[dict[str, Any]]], int]] = {}


def act(cfgs: list[dict[str, Any]]) -> int:
    from .scheduler import run_sweep

    return ACTION.get("verb", run_sweep)(cfgs)


# An absolute path: `prepare` runs this same main from another module, and Hydra resolves a relative
# path against the module that is __main__.
CONF = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(cfg: DictConfig) -> None:
    """Single-run mode (no grid): the same checks and scheduler as a grid, with one cell."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from .budget import resolve_budget
    from .config_checks import check_cell

    cell = OmegaConf.to_container(cfg, resolve=True)
    overrides = list(HydraConfig.get().overrides.task)
    try:
        check_cell(cell)
        resolve_budget(cell, overrides, lambda ov: OmegaConf.to_container(compose("config", overrides=ov),
                                                                          resolve=True))
        EXIT["code"] = act([cell])
    except UserError as exc:  # raised out of here, Hydra would print its own line about the job first
        ERROR.append(exc)


def hydra_errors() -> tuple[type[BaseException], ...]:
    """What Hydra and OmegaConf raise for a bad override or config choice: the user's input."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return HydraException, OmegaConfBaseException


def hydra_message(text: str) -> str:
    """Hydra's message for a bad override, as a user needs it: an override its grammar cannot read says
    what to do; option lists leave out the bases other configs build on (`_tiny_family`) and the
    search path."""
    text = " ".join(text.split())
    unreadable = re.match(r"LexerNoViableAltException: (\S+)", text)
    if unreadable:
        return (f"cannot read the override {unreadable.group(1)!r}: an unquoted value may hold letters, digits "
                "and _-./:@+ only; quote it for Hydra (e.g. 'sweep.name=\"…\"') or use plain ASCII")
    text = re.sub(r" ?Config search path:.*$", "", text)
    text = re.sub(r"(Available options in '[^']+':)((?: \S+)+)",
                  lambda m: m.group(1) + "".join(f" {o}" for o in m.group(2).split() if not o.startswith("_")), text)
    return f"{text} (see `--help` for the config groups and their options)"


def run() -> int | None:
    try:
        main()
    except hydra_errors() as exc:
        raise ConfigError(hydra_message(str(exc))) from None
    if ERROR:
        raise ERROR[0]
    from hydra_plugins.retrieval_scaling_launcher import OUTCOME

    return EXIT.get("code", OUTCOME.get("exit_code", 0))


def print_help(overrides: list[str]) -> int:
    """Hydra's `--help`, less the configs other configs build on (`_tiny_family`): the groups a user
    picks from, their options, and the config the overrides compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = {g: [o for o in sorted(loader.get_group_options(g)) if not o.startswith("_")]
                  for g in sorted(loader.list_groups("")) if g != "hydra"}
        config = OmegaConf.to_yaml(compose("config", overrides=overrides))
    verb = getattr(sys.modules["__main__"].__spec__, "name", None) or "retrieval_scaling.sweep"  # or prepare
    print(f"python -m {verb} [+grid=<name>] [group=option ...] [key=value ...]\n\n== Configuration groups ==\n"
          "Compose your configuration from those groups (group=option)\n")
    print("\n".join(f"{g}: {', '.join(options)}" for g, options in groups.items() if options))
    print("\n== Config ==\nOverride anything in the config (foo.bar=value)\n")
    print(config)
    return 0


def cli() -> int:
    from .cli import run_verb

    # Hydra's own reporting (a traceback, exit 1) gives way to the verbs' one error path.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        return run_verb(lambda: print_help([a for a in args if a not in ("--help", "-h")]))
    return run_verb(run)


if __name__ == "__main__":
    sys.exit(cli())
