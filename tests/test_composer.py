"""The launcher's Composer derives each cell from a few compositions; every cell must equal what Hydra's
full composition of that cell gives."""

import itertools
from pathlib import Path

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from hydra_plugins.retrieval_scaling_launcher import Composer

ROOT = Path(__file__).resolve().parents[1]


def loader_and_master(conf: Path, overrides: list[str]):
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf)))
    return loader, loader.load_configuration("config", overrides=overrides, run_mode=RunMode.MULTIRUN)


def hydras_own(loader, master, overrides: list[str]) -> dict:
    cfg = loader.load_sweep_config(master, overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("grid, axes, values", [
    ("tiny", {"model": ["tiny_s", "tiny_m", "tiny_l"], "paradigm": ["sparse", "dense", "multivector"],
              "loss": ["cl", "kd", "cl_kd"]}, [[], ["seed=1"], ["seed=2", "train.lr=0.002", "sweep.name=x"]]),
    ("full", {"model": ["llama3_1b", "llama3_8b"], "paradigm": ["sparse", "dense"], "loss": ["cl", "kl"]},
     [[], ["seed=7", "flops_lambda.q=0.1", "eval.batch_size=64"]]),
    ("qwen3", {"model": ["qwen3_0_6b", "qwen3_14b"], "paradigm": ["dense"], "loss": ["kd", "cl_kd"]},
     [["++model.lora.dropout=0.1", "+model.note=x", "sparse_temperature.kd=0.5"]]),
])
def test_every_derived_cell_equals_hydras_own_composition(grid, axes, values):
    loader, master = loader_and_master(ROOT / "conf", [f"+grid={grid}"])
    composer = Composer(loader, master)
    cells = [[f"{k}={v}" for k, v in zip(axes, choice, strict=True)] + extra
             for choice in itertools.product(*axes.values()) for extra in values]
    for overrides in cells:
        assert composer.cell(overrides) == hydras_own(loader, master, overrides), overrides
    # the point of it: one full composition, one per axis option other than the first cell's
    assert len(composer.options) == sum(len(v) - 1 for v in axes.values())


def test_an_option_that_reaches_outside_its_node_is_composed_in_full(tmp_path):
    conf = tmp_path / "conf"
    (conf / "size").mkdir(parents=True)
    (conf / "config.yaml").write_text("defaults:\n  - _self_\n  - size: small\nwidth: 1\nlabel: w${width}\n")
    (conf / "size" / "small.yaml").write_text("n: 1\n")
    (conf / "size" / "big.yaml").write_text("# @package _global_\nsize:\n  n: 2\nwidth: 8\n")
    loader, master = loader_and_master(conf, [])
    composer = Composer(loader, master)
    for overrides in (["size=small"], ["size=big"], ["size=big", "width=3"], ["size=small", "width=5"]):
        assert composer.cell(overrides) == hydras_own(loader, master, overrides), overrides
    assert composer.options == {("size", "size=big"): None}  # refused as a swap: composed with its job
    assert composer.cell(["size=small", "width=5"])["label"] == "w5"  # read by an interpolation: Hydra's path
