import json
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


def build_dl19_ir_datasets_home(data_root: Path, home: Path) -> None:
    """An ir_datasets home holding what it would download for msmarco-passage/trec-dl-2019/judged, with
    the real DL19 topics and judgements over the relevant-only passages (4,103) in place of the 8.8M."""
    base = home / "msmarco-passage"
    (base / "trec-dl-2019").mkdir(parents=True)
    (base / "irds_version.txt").write_text("v2")
    with (base / "collection.tsv").open("w") as out:
        for line in (data_root / "msmarco-dl19-relevant" / "corpus.jsonl").open():
            row = json.loads(line)
            out.write(f"{row['_id']}\t{row['text']}\n")
    (base / "trec-dl-2019" / "queries.tsv").write_text((data_root / "trec-dl" / "topics.dl19-passage.txt").read_text())
    (base / "trec-dl-2019" / "qrels").write_text((data_root / "trec-dl" / "qrels.dl19-passage.txt").read_text())
