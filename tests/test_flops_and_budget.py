"""The FLOP model and the budget arithmetic, hand-computed on a 1-layer toy architecture."""

import pytest

from retrieval_scaling.errors import ConfigError
from retrieval_scaling.flops import Architecture, StepShape, step_flops
from retrieval_scaling.paradigms.dense import Dense
from retrieval_scaling.paradigms.sparse import Sparse
from retrieval_scaling.plan import check_budget, plan_cell

TOY = Architecture(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                   intermediate_size=8, vocab_size=10)
SHAPE = dict(queries=2, passages_per_query=2, query_len=3, passage_len=5, in_batch=True)

DENSE, SPARSE = Dense(), Sparse()

def test_parameter_counts():
    assert TOY.linear_params_per_layer() == 4 * 16 + 3 * 32
    assert TOY.lora_params_per_layer(rank=1) == 4 * 8 + 3 * 12
    assert TOY.params_total() == 10 * 4 + (160 + 8) + 4  # tied embeddings, 2 norms per layer, final norm


def test_dense_step_flops_by_hand():
    # T = 2·3 + 4·5 = 26 tokens, Σ S² = 2·9 + 4·25 = 118, similarity 2 × 4 pairs of width 4
    terms = step_flops(TOY, StepShape(**SHAPE), DENSE, lora_rank=1)
    assert terms["frozen_forward"] == 2 * 26 * 160
    assert terms["frozen_backward"] == 2 * 26 * (160 - 48)  # no input gradient for layer-0 q/k/v
    assert terms["lora_forward"] == 2 * 26 * 68
    assert terms["lora_backward"] == 4 * 26 * 68 - 2 * 26 * 12
    assert terms["attention_forward"] == 4 * 1 * 4 * 118
    assert terms["attention_backward"] == 8 * 1 * 4 * 118
    assert terms["lm_head"] == terms["lm_head_weight_grad"] == 0
    assert terms["similarity"] == 6 * 8 * 4
    assert terms["total"] == 29984


def test_sparse_cells_pay_for_the_lm_head_and_vocab_wide_similarity():
    terms = step_flops(TOY, StepShape(**SHAPE), SPARSE, lora_rank=1)
    assert terms["lm_head"] == 4 * 26 * 4 * 10
    assert terms["similarity"] == 6 * 8 * 10
    assert terms["total"] == 29984 - 192 + 480 + 4160


def test_steps_are_the_floor_of_budget_over_step_flops(compose):
    cfg = compose("model=tiny_s", "paradigm=dense", "loss=cl", "budget.flops=1e12")
    plan = plan_cell(cfg)
    assert plan["steps"] == int(1e12 // plan["flops_per_step"])
    assert plan["flops_total"] == plan["steps"] * plan["flops_per_step"]
    assert 0 <= 1e12 - plan["flops_total"] < plan["flops_per_step"]


def test_a_budget_below_one_step_is_refused_with_the_minimum(compose):
    plan = plan_cell(compose("model=tiny_l", "paradigm=sparse", "loss=cl", "budget.flops=1e6"))
    assert plan["steps"] == 0
    with pytest.raises(ConfigError, match=r"smaller than one optimizer step.*tiny_l/sparse/cl.*at least"):
        check_budget([plan])


def test_trained_tied_embeddings_add_the_lm_head_weight_gradient_and_layer0_input_gradients():
    # Trained embeddings need layer 0's input gradient: its q/k/v (48 weights) and their LoRA A-paths
    # (r·in = 3·4) now compute it: 2·26·48 + 2·26·12 = 3,120 more than with frozen embeddings.
    sparse = step_flops(TOY, StepShape(**SHAPE), SPARSE, lora_rank=1, train_embeddings=True)
    assert sparse["lm_head_weight_grad"] == 2 * 26 * 4 * 10
    assert sparse["frozen_backward"] == 2 * 26 * 160 and sparse["lora_backward"] == 4 * 26 * 68
    assert sparse["total"] == 34432 + 2080 + 3120
    dense = step_flops(TOY, StepShape(**SHAPE), DENSE, lora_rank=1, train_embeddings=True)
    assert dense["total"] == 29984 + 3120  # no LM head: a dense cell's embedding gradient is a scatter-add


# A real training step of the cell (random weights of its architecture, its LoRA, head, loss and
# FLOPS term, forward + backward) counted by torch.utils.flop_counter. The contract is 5 %; the model
# counts exactly what torch counts today, so the check is tight.
@pytest.mark.parametrize("model,paradigm,loss,shapes", [
    ("tiny_s", "sparse", "cl_kd", None),
    ("tiny_s", "dense", "kd", None),
    ("tiny_m", "sparse", "kd", None),
    ("tiny_m", "dense", "cl_kd", None),
    ("tiny_l", "sparse", "cl", None),
    ("tiny_l", "dense", "kl", None),
    # MaxSim over every (query token, passage token) pair and the projection: 2 queries keep it fast
    ("tiny_s", "multivector", "cl_kd", dict(queries=2, passages_per_query=2, query_len=8, passage_len=16)),
    ("tiny_m", "multivector", "kd", dict(queries=4, passages_per_query=2, query_len=16, passage_len=32)),
    # SmolLM2-135M's architecture at a smaller batch; even so a real step of it belongs with the slow tests
    pytest.param("smollm2_135m", "dense", "cl", dict(queries=2, passages_per_query=4, query_len=16, passage_len=48),
                 marks=pytest.mark.slow),
    pytest.param("smollm2_135m", "sparse", "kd", dict(queries=4, passages_per_query=2, query_len=16, passage_len=48),
                 marks=pytest.mark.slow),
])
def test_the_flop_model_matches_torchs_count_of_a_real_step(compose, model, paradigm, loss, shapes):
    import dataclasses

    from retrieval_scaling.backbone import architecture
    from retrieval_scaling.flopcheck import measured_step_flops
    from retrieval_scaling.paradigms import paradigm_of
    from retrieval_scaling.plan import step_shape

    cfg = compose(f"model={model}", f"paradigm={paradigm}", f"loss={loss}")
    measured, _ = measured_step_flops(cfg, **(shapes or {}))
    shape = dataclasses.replace(step_shape(cfg), **(shapes or {}))
    lora = cfg["model"]["lora"]
    modelled = step_flops(architecture(cfg["model"]), shape, paradigm_of(cfg["paradigm"]), lora["r"],
                          tuple(lora["targets"]), cfg["model"]["train_embeddings"])["total"]
    assert modelled == pytest.approx(measured, rel=1e-3)
    assert modelled == pytest.approx(measured, rel=0.05)  # the contract


def test_gradient_checkpointing_recompute_is_counted_as_hardware_flops_only(compose):
    from retrieval_scaling.flopcheck import measured_step_flops
    from retrieval_scaling.plan import plan_cell, step_cost

    plain = compose("model=tiny_m", "paradigm=dense", "loss=cl")
    ckpt = compose("model=tiny_m", "paradigm=dense", "loss=cl", "train.gradient_checkpointing=true")
    terms = step_cost(ckpt)
    assert terms["total"] == step_cost(plain)["total"] == plan_cell(ckpt)["flops_per_step"]
    assert terms["recompute"] == terms["frozen_forward"] + terms["lora_forward"] + terms["attention_forward"] > 0
    measured, _ = measured_step_flops(ckpt)
    # An upper bound by a hair: non-reentrant checkpointing stops recomputing once every tensor backward
    # needs is back, so each layer's last matmul (down_proj's LoRA B) is not redone: 2·T·r·d per layer.
    assert 0 < terms["hardware_total"] - measured <= 2 * 8448 * 16 * 128 * 3
    assert plan_cell(ckpt)["hardware_flops_per_step"] == terms["hardware_total"] > terms["total"]


def test_own_group_scores_of_teacher_losses_are_counted_once_per_query_and_passage():
    shape = dict(queries=2, passages_per_query=2, query_len=3, passage_len=5)
    cl_kd = step_flops(TOY, StepShape(in_batch=True, own_group=True, **shape), DENSE, lora_rank=1)
    kl = step_flops(TOY, StepShape(in_batch=False, own_group=True, **shape), DENSE, lora_rank=1)
    assert cl_kd["similarity"] == 6 * (2 * 4 + 2 * 2) * 4  # every passage + each query's own two
    assert kl["similarity"] == 6 * (2 * 2) * 4


def test_budget_match_buys_that_cells_steps_under_this_cells_settings(compose):
    from retrieval_scaling.budget import resolve_budget
    from retrieval_scaling.plan import step_cost

    def compose_cell(overrides):
        return compose(*overrides)

    overrides = ["model=tiny_s", "paradigm=dense", "loss=cl", "budget.flops=null",
                 "budget.match=tiny_l/sparse/kd", "budget.match_steps=10", "data.passage_max_len=64"]
    cfg = compose(*overrides)
    resolve_budget(cfg, overrides, compose_cell)
    matched = compose("model=tiny_l", "paradigm=sparse", "loss=kd", "data.passage_max_len=64")
    assert cfg["budget"]["flops"] == 10 * step_cost(matched)["total"]
    # the matched cell itself gets exactly those 10 steps; another cell gets the same FLOPs
    matched["budget"]["flops"] = cfg["budget"]["flops"]
    assert plan_cell(matched)["steps"] == 10
    plan = plan_cell(cfg)
    assert plan["flops_total"] <= cfg["budget"]["flops"] < plan["flops_total"] + plan["flops_per_step"]


@pytest.mark.parametrize("overrides,message", [
    (["budget.match=tiny_l/sparse/kd", "budget.match_steps=10"], "both set"),
    (["budget.flops=null", "budget.match=tiny_l/sparse/kd"], "budget.match_steps"),
    (["budget.flops=null", "budget.match=tiny_l-sparse", "budget.match_steps=3"], "expected <model>/<paradigm>/<loss>"),
    (["budget.flops=null", "budget.match=tiny_xl/sparse/kd", "budget.match_steps=3"], "cannot be composed"),
    (["budget.flops=null"], "set budget.flops"),
])
def test_a_budget_that_says_too_much_or_too_little_is_refused(compose, overrides, message):
    from retrieval_scaling.budget import resolve_budget

    with pytest.raises(ConfigError, match=message):
        resolve_budget(compose(*overrides), overrides, lambda ov: compose(*ov))


def test_the_planner_prices_cells_in_gpu_hours_from_hardware_flops(compose):
    cfg = compose("model=llama3_8b", "+grid=full", "paradigm=sparse", "loss=cl", "budget.flops=1e20",
                  "budget.match=null", "planner.peak_flops=1e15", "planner.utilization=0.5")
    plan = plan_cell(cfg)
    assert plan["hardware_flops_per_step"] > plan["flops_per_step"]  # gradient checkpointing in +grid=full
    assert plan["gpu_hours"] == pytest.approx(plan["steps"] * plan["hardware_flops_per_step"] / 5e14 / 3600)
    assert (plan["nodes"], plan["gpus"]) == (1, 4) and plan["wall_hours"] == pytest.approx(plan["gpu_hours"] / 4)
    on_slurm = plan_cell(compose("model=llama3_8b", "+grid=full", "launcher=example_a100", "budget.flops=1e20",
                                 "budget.match=null", "launcher.resources.default.nodes=2"))
    assert (on_slurm["nodes"], on_slurm["gpus"]) == (2, 8)


def test_the_full_grid_spends_one_budget_and_sparse_steps_cost_more(planned):
    plans = {(m, p, lo): planned(f"model={m}", "+grid=full", f"paradigm={p}", f"loss={lo}")
             for m in ("llama3_1b", "llama3_3b", "llama3_8b") for p in ("sparse", "dense")
             for lo in ("cl", "kd", "cl_kd")}
    budget = plans["llama3_1b", "dense", "cl"]["flops_budget"]
    assert plans["llama3_1b", "dense", "cl"]["steps"] == 33250  # the paper's 1B CL schedule, matched
    for (m, p, lo), plan in plans.items():
        assert plan["flops_budget"] == budget
        assert plan["flops_total"] <= budget < plan["flops_total"] + plan["flops_per_step"]
        if p == "sparse":
            assert plan["flops_per_step"] > plans[m, "dense", lo]["flops_per_step"]


def test_mntp_flops_charge_the_head_only_at_predicted_tokens():
    from retrieval_scaling.mntp import mntp_flops

    model_cfg = {"arch": {"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
                          "intermediate_size": 8, "vocab_size": 10},
                 "lora": {"r": 1, "targets": ["q_proj"]}}
    # linears 4·16 + 3·32 = 160 (frozen: 4N per token); LoRA on q: 1·(4 + 4) = 8 (6N); attention
    # 12·1·4·block 10 = 480 per token; the head 4·4·10 = 160 per predicted token
    assert mntp_flops(model_cfg, tokens=100, block_len=10, predicted=20) == 100 * (640 + 48 + 480) + 20 * 160


def test_mntp_under_gradient_checkpointing_is_priced_with_each_layers_forward_again(compose):
    """tiny_s: d=64, 2 layers, MLP 176, LoRA r16 on all 7 projections. Per token, a layer's forward again:
    frozen linears 2·(4·64² + 3·64·176) = 2·50,176; LoRA 2·(4·16·128 + 3·16·240) = 2·19,712; attention
    4·d·S = 4·64·128; over 2 layers and 1,000 tokens of 128-token blocks: 1000·2·(100,352+39,424+32,768)."""
    from retrieval_scaling.mntp import mntp_flops

    model = compose("model=tiny_s")["model"]
    assert mntp_flops(model, 1000, 128, 0, recompute=True) - mntp_flops(model, 1000, 128, 0) == 345_088_000
    full = compose("model=llama3_8b", "+grid=full")["model"]
    assert full["mntp"]["gradient_checkpointing"] is True  # the paper's backbones recompute in MNTP
