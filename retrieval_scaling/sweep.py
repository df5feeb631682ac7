"""`python -m retrieval_scaling.sweep +grid=tiny [overrides]` — plan and run a grid of cells.

`+grid=<name>` makes Hydra compose every (model, paradigm, loss) cell; our launcher plans them all,
skips the ones that are done, and dispatches the rest (see `scheduler`). Without a grid, the
command runs the one cell the overrides describe. `sweep.dry_run=true` writes the plan only.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from .errors import UserError

EXIT: dict[str, int] = {}


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Single-run mode (no grid): the same scheduler with one cell."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from .budget import resolve_budget
    from .scheduler import run_sweep

    cell = OmegaConf.to_container(cfg, resolve=True)
    overrides = list(HydraConfig.get().overrides.task)
    resolve_budget(cell, overrides, lambda ov: OmegaConf.to_container(compose("config", overrides=ov), resolve=True))
    EXIT["code"] = run_sweep([cell])


def cli() -> int:
    from .cell import setup_logging

    setup_logging()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from hydra_plugins.retrieval_scaling_launcher import OUTCOME

    return EXIT.get("code", OUTCOME.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(cli())
