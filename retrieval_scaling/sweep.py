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


def cli() -> int:
    from .cli import run_verb

    # Hydra's own reporting (a traceback, exit 1) gives way to the verbs' one error path.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return run_verb(run)


if __name__ == "__main__":
    sys.exit(cli())
