"""The FLOP model and the budget arithmetic, hand-computed on a 1-layer toy architecture."""

import pytest

from retrieval_scaling.errors import ConfigError
from retrieval_scaling.flops import Architecture, StepShape, step_flops
from retrieval_scaling.plan import check_budget, plan_cell

TOY = Architecture(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                   intermediate_size=8, vocab_size=10)
SHAPE = dict(queries=2, passages_per_query=2, query_len=3, passage_len=5, in_batch=True)


def test_parameter_counts():
    assert TOY.linear_params_per_layer() == 4 * 16 + 3 * 32
    assert TOY.lora_params_per_layer(rank=1) == 4 * 8 + 3 * 12
    assert TOY.params_total() == 10 * 4 + (160 + 8) + 4  # tied embeddings, 2 norms per layer, final norm


def test_dense_step_flops_by_hand():
    # T = 2·3 + 4·5 = 26 tokens, Σ S² = 2·9 + 4·25 = 118, similarity 2 × 4 pairs of width 4
    terms = step_flops(TOY, StepShape(sparse=False, **SHAPE), lora_rank=1)
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
    terms = step_flops(TOY, StepShape(sparse=True, **SHAPE), lora_rank=1)
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


def test_trained_tied_embeddings_add_the_lm_head_weight_gradient_to_sparse_cells_only():
    sparse = step_flops(TOY, StepShape(sparse=True, **SHAPE), lora_rank=1, train_embeddings=True)
    assert sparse["lm_head_weight_grad"] == 2 * 26 * 4 * 10
    assert sparse["total"] == 34432 + 2080
    dense = step_flops(TOY, StepShape(sparse=False, **SHAPE), lora_rank=1, train_embeddings=True)
    assert dense["total"] == 29984  # the embedding gradient of a dense cell is a scatter-add
