import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("RS_DATA_DIR") or SHARED_DATA)
    if not (root / "scifact" / "corpus.jsonl").is_file():
        pytest.fail(f"SciFact not found under {root}: set RS_DATA_DIR to the BEIR collections directory")
    return root


@pytest.fixture
def compose():
    """Compose the real configs through Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    def _compose(*overrides: str, resolve: bool = True):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True) if resolve else cfg

    return _compose


@pytest.fixture
def planned(compose):
    """The plan of the cell these overrides compose, its budget resolved as the sweep resolves it."""
    from retrieval_scaling.budget import resolve_budget
    from retrieval_scaling.plan import plan_cell

    def _planned(*overrides: str):
        cfg = compose(*overrides)
        resolve_budget(cfg, list(overrides), lambda ov: compose(*ov))
        return plan_cell(cfg)

    return _planned
