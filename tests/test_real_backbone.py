"""The real-model path on a real pretrained model that installs offline: SmolLM2-135M from its GGUF
file, converted once to a cached HF directory; bidirectional attention switched on and off."""

from pathlib import Path

import pytest
import torch

from retrieval_scaling.backbone import load_backbone
from retrieval_scaling.gguf import ensure_converted, gguf_location
from retrieval_scaling.layout import converted_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=["model=smollm2_135m"]), resolve=True)["model"]
    cache = tmp_path_factory.mktemp("cache")
    return cfg, cache, ensure_converted(cfg, cache)


def test_gguf_converts_once_to_a_directory_with_the_same_logits(smollm2):
    from transformers import AutoModelForCausalLM

    cfg, cache, directory = smollm2
    assert directory == converted_dir(cache, cfg) and ensure_converted(cfg, cache) == directory  # cached
    model, tokenizer = load_backbone({**cfg, "bidirectional": False}, directory)
    arch = cfg["arch"]
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
        arch["hidden_size"], arch["num_hidden_layers"], arch["vocab_size"])
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied head
    where, name = gguf_location(cfg["gguf"])
    original = AutoModelForCausalLM.from_pretrained(str(where), gguf_file=name, dtype=torch.float32)
    ids = torch.tensor([tokenizer("Sparse retrieval with decoder-only models.")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)
    assert tokenizer.convert_tokens_to_ids(cfg["mntp"]["mask_token"]) != tokenizer.unk_token_id


@pytest.mark.parametrize("bidirectional", [True, False])
def test_a_later_token_reaches_earlier_positions_only_when_bidirectional(smollm2, bidirectional):
    cfg, _, directory = smollm2
    model, tokenizer = load_backbone({**cfg, "bidirectional": bidirectional}, directory)
    ids = torch.tensor([tokenizer("the cat sat on the mat today")["input_ids"]])
    changed = ids.clone()
    changed[0, -1] = tokenizer.convert_tokens_to_ids("_")
    with torch.no_grad():
        a = model.model(input_ids=ids).last_hidden_state
        b = model.model(input_ids=changed).last_hidden_state
    earlier = (a[0, :-1] - b[0, :-1]).abs().max().item()
    if bidirectional:
        assert earlier > 1e-3
    else:  # exact: same shapes, same process, same kernels; masked keys add exact zeros
        assert earlier == 0.0
