"""Decoder families beyond Llama (Mistral, Qwen2/Qwen2.5, Qwen3) on small random-weight configs: attention
made bidirectional, both heads (and the multi-vector one) encoding, parameters and FLOPs as the planner
counts them, MNTP running; and the model ladders composed and priced."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval_scaling.backbone import architecture, check_shapes, decoder_config, set_bidirectional
from retrieval_scaling.encoders import encode_inputs
from retrieval_scaling.errors import ConfigError
from retrieval_scaling.flops import FAMILIES, Architecture, StepShape, step_flops
from retrieval_scaling.paradigms import paradigm_of

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 64, "vocab_size": 64, "head_dim": 8}


def random_decoder(family: str, attn: str = "sdpa", tied: bool = True):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    arch = Architecture(**SHAPES, tie_word_embeddings=tied, family=family)
    return AutoModelForCausalLM.from_config(decoder_config(arch, attn_implementation=attn)).eval(), arch


@pytest.mark.parametrize("family", FAMILIES)
def test_the_config_picks_the_family_and_the_planner_counts_its_parameters(family):
    model, arch = random_decoder(family, tied=family != "mistral")
    assert model.config.model_type == family
    # Qwen2's q/k/v biases: 2 layers × (32 + 16 + 16); Qwen3's q/k norms: 2 layers × (8 + 8)
    assert arch.extra_params_per_layer() * 2 == {"qwen2": 128, "qwen3": 32}.get(family, 0)
    assert arch.params_total() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_bidirectional_in_every_family(family, attn):
    """Changing the last token changes the first token's state once bidirectional, never before."""
    model, _ = random_decoder(family, attn)
    ids, other = torch.tensor([[1, 5, 6, 7]]), torch.tensor([[1, 5, 6, 9]])
    mask = torch.ones_like(ids)

    def first(x):
        with torch.no_grad():
            return model.get_decoder()(input_ids=x, attention_mask=mask).last_hidden_state[0, 0]

    set_bidirectional(model, False)
    assert torch.equal(first(ids), first(other))
    set_bidirectional(model, True)
    assert not torch.allclose(first(ids), first(other))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("paradigm", ["dense", "sparse", "multivector"])
def test_every_head_encodes_a_left_padded_batch_in_every_family(family, paradigm):
    model, _ = random_decoder(family, tied=family != "mistral")
    set_bidirectional(model, True)
    encoder = paradigm_of({"name": paradigm}).encoder(model)
    ids, mask = encode_inputs([[5, 6, 7, 8], [9], [10, 11]], bos_id=1, pad_id=2, max_len=8)
    alone_ids, alone_mask = encode_inputs([[9]], bos_id=1, pad_id=2, max_len=8)
    for training in (True, False):  # the sparse head's training pooling and its inference one
        encoder.train(training)
        with torch.set_grad_enabled(training):
            reps = encoder(ids, mask)
            alone = encoder(alone_ids, alone_mask)
        width = {"dense": (32,), "sparse": (64,), "multivector": (5, 128)}[paradigm]
        assert reps.shape == (3, *width) and torch.isfinite(reps).all()
        # left padding changes nothing: the second text alone gives its rep (its real tokens, for multivector)
        got = reps[1][-1:] if paradigm == "multivector" else reps[1]
        want = alone[0][-1:] if paradigm == "multivector" else alone[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_a_familys_step_flops_are_llamas_by_hand_and_torchs_count(compose, family):
    """No family adds a matmul to Llama's layer (biases and norms are not counted), so the hand count of
    the Llama test holds; and torch counts the same on a real step of a random model of the family."""
    from retrieval_scaling.flopcheck import measured_step_flops
    from retrieval_scaling.plan import step_shape

    shape = StepShape(queries=2, passages_per_query=2, query_len=3, passage_len=5, in_batch=True)
    dense = paradigm_of({"name": "dense"})
    llama = step_flops(Architecture(**SHAPES), shape, dense, lora_rank=1)
    assert step_flops(Architecture(**SHAPES, family=family), shape, dense, lora_rank=1) == llama
    cfg = compose("model=tiny_s", "paradigm=sparse", "loss=cl_kd", f"+model.arch.family={family}")
    small = {"queries": 2, "passages_per_query": 2, "query_len": 8, "passage_len": 16}
    measured, _ = measured_step_flops(cfg, **small)
    lora = cfg["model"]["lora"]
    modelled = step_flops(architecture(cfg["model"]), dataclasses.replace(step_shape(cfg), **small),
                          paradigm_of(cfg["paradigm"]), lora["r"], tuple(lora["targets"]),
                          cfg["model"]["train_embeddings"])["total"]
    assert modelled == measured


def test_weights_that_are_not_the_configs_architecture_are_refused_in_one_line():
    model, _ = random_decoder("qwen2")
    cfg = {"name": "qwen_wrong", "arch": {**SHAPES, "family": "qwen3", "hidden_size": 48}}
    with pytest.raises(ConfigError, match=r"^model 'qwen_wrong': the weights at 'x' have family 'qwen2' \(arch "
                                          r"says 'qwen3'\); hidden_size 32 \(arch says 48\): fix model.arch"):
        check_shapes(cfg, model.config, "x")
    with pytest.raises(ConfigError, match="model.arch.family='gpt2'.*not a supported decoder family"):
        architecture({"name": "g", "arch": {**SHAPES, "family": "gpt2"}})


def test_mntp_runs_two_steps_in_every_family(tmp_path, data_root):
    script = ROOT / "tests" / "family_mntp_run.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(data_root)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {family: {"steps": 2, "lora_b": 6, "moved": True} for family in FAMILIES}


@pytest.mark.parametrize("grid, sizes", [("qwen2_5", ["0_5b", "1_5b", "3b", "7b", "14b"]),
                                         ("qwen3", ["0_6b", "1_7b", "4b", "8b", "14b"])])
def test_each_ladder_grid_plans_five_sizes_priced_and_fitting(tmp_path, data_root, grid, sizes):
    env = {**os.environ, "RS_SWEEPS_DIR": str(tmp_path), "RS_DATA_DIR": str(data_root)}
    proc = subprocess.run([sys.executable, "-m", "retrieval_scaling.sweep", f"+grid={grid}", "sweep.dry_run=true"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((tmp_path / grid / "plan.json").read_text())
    assert len({c["cell_id"] for c in plan}) == 30
    by_size = {c["model"]: c for c in plan if (c["paradigm"], c["loss"]) == ("dense", "cl")}
    assert list(by_size) == [f"{grid}_{s}" for s in sizes]
    params = [c["params_non_embedding"] for c in by_size.values()]
    steps = [c["steps"] for c in by_size.values()]
    assert params == sorted(params) and steps == sorted(steps, reverse=True)  # one budget: bigger, fewer steps
    assert len({c["flops_budget"] for c in plan}) == 1
    assert all(c["gpu_memory_gb"] <= 80 and c["eval_gpu_hours"] > 0 for c in plan)
