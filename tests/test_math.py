"""Pooling heads, losses and the FLOPS regulariser against hand-computed values."""

import math

import pytest
import torch

from retrieval_scaling.encoders import MaxPooledLogits, dense_pool, encode_inputs, position_ids_for, sparse_pool
from retrieval_scaling.losses import (
    ContrastiveDistillationLoss,
    ContrastiveLoss,
    KLDistillationLoss,
    MarginMSELoss,
    Scores,
)
from retrieval_scaling.paradigms.dense import Dense
from retrieval_scaling.regularizers import flops_regularizer, quadratic_warmup


def test_dense_pool_normalises_tokens_then_means_over_non_pad():
    hidden = torch.tensor([[[9.0, 9.0], [3.0, 4.0], [0.0, 2.0]]])  # first position is padding
    mask = torch.tensor([[0, 1, 1]])
    # tokens → [0.6, 0.8] and [0, 1]; mean → [0.3, 0.9]; not re-normalised
    assert torch.allclose(dense_pool(hidden, mask), torch.tensor([[0.3, 0.9]]))


def test_sparse_pool_scales_masks_max_and_log1p_relu():
    logits = torch.tensor([[[100.0, 100.0, 100.0], [2.0, -4.0, 0.0], [0.0, 2.0, 6.0]]])
    mask = torch.tensor([[0, 1, 1]])
    # hidden 16 → scale 16^-1/4 = 0.5: [1, -2, 0] and [0, 1, 3] → log1p∘relu → max per term
    expected = torch.tensor([[math.log(2), math.log(2), math.log(4)]])
    assert torch.allclose(sparse_pool(logits, mask, hidden_size=16), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_inference_pools_each_sequence_alone_as_training_pools_the_batch(dtype):
    """Without grad, the sparse head pools one sequence's real tokens at a time; the reps are those of
    the batched, masked pooling that training differentiates (left padding included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_scaling.encoders import SparseEncoder

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).to(dtype)
    encoder = SparseEncoder(model).eval()
    ids, mask = encode_inputs([[5, 6, 7, 8], [9], [10, 11]], bos_id=1, pad_id=2, max_len=8)
    batched = encoder(ids, mask)  # grad enabled: the (N, L, V) logits, masked, max over L
    with torch.no_grad():
        alone = encoder(ids, mask)
    assert alone.dtype == batched.dtype == torch.float32
    assert (batched > 0).sum() > 0
    # the same products, summed in another blocking: equal up to rounding (bf16 logits: one ulp)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(alone, batched.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("mask", "pooled", "grad_hidden", "grad_weight"), [
    # logits per position [2, -2] and [3, -3]: term 0 peaks at position 1, term 1 at position 0
    ([[1, 1]], [[3.0, -2.0]], [[[-10.0], [1.0]]], [[3.0], [20.0]]),
    # position 0 is padding: both terms take position 1, which gets both gradients
    ([[0, 1]], [[3.0, -3.0]], [[[0.0], [-9.0]]], [[3.0], [30.0]]),
])
def test_max_pooled_logits_routes_each_terms_gradient_to_its_argmax(mask, pooled, grad_hidden, grad_weight):
    hidden = torch.tensor([[[2.0], [3.0]]], requires_grad=True)
    weight = torch.tensor([[1.0], [-1.0]], requires_grad=True)
    out = MaxPooledLogits.apply(hidden, weight, torch.tensor(mask))
    assert out.tolist() == pooled
    (out * torch.tensor([[1.0, 10.0]])).sum().backward()  # d/d pooled = [1, 10]
    assert hidden.grad.tolist() == grad_hidden
    assert weight.grad.tolist() == grad_weight


@pytest.mark.parametrize("chunk_elements", [2**26, 300, 900])  # whole; one sequence (6 × 50); 3, then 1
@pytest.mark.parametrize("autocast", [False, True])
def test_max_pooled_logits_equals_autograd_through_the_masked_logits(autocast, chunk_elements, monkeypatch):
    """The sparse head's training path: the values and gradients autograd gets through the (N, L, V)
    logits, masked fill and amax (fp32: to rounding; bf16 autocast: the same logits, close gradients),
    whether the logits are built whole or a chunk of sequences at a time."""
    from retrieval_scaling import encoders

    monkeypatch.setattr(encoders, "POOL_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, :2] = mask[2, :5] = 0
    grad = torch.randn(4, 50)
    outs = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                pooled = MaxPooledLogits.apply(hidden, weight, mask)
            else:
                logits = torch.nn.functional.linear(hidden, weight)
                pooled = logits.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(logits.dtype).min).amax(dim=1)
        (pooled.float() * grad).sum().backward()
        outs.append((pooled.detach().float(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    (fused_out, fused_gh, fused_gw), (ref_out, ref_gh, ref_gw) = outs
    tol = 2e-2 if autocast else 1e-5
    if chunk_elements == 2**26:
        assert torch.equal(fused_out, ref_out)  # exact: the same linear on the same tensors, then a max
    else:  # a linear over fewer rows may round its last bit otherwise (another BLAS blocking)
        torch.testing.assert_close(fused_out, ref_out, rtol=tol, atol=tol)
    assert (fused_gh[0, :2] == 0).all() and (fused_gh[2, :5] == 0).all()  # padding gets no gradient
    torch.testing.assert_close(fused_gh, ref_gh, rtol=tol, atol=tol)
    torch.testing.assert_close(fused_gw, ref_gw, rtol=tol, atol=tol)


def test_sparse_encoder_keeps_no_logits_for_the_backward():
    """Training through the sparse head saves no (N, L, V) tensor for autograd (the point of
    `MaxPooledLogits`): peak memory of the head is one logits tensor at a time, not several."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_scaling.encoders import SparseEncoder

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    encoder = SparseEncoder(model).train()
    ids, mask = encode_inputs([[5, 6, 7, 8], [9]], bos_id=1, pad_id=2, max_len=8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        reps = encoder(ids, mask)
    assert reps.shape == (2, 40) and saved
    assert (2, 5, 40) not in saved
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sparse_pool(model.get_output_embeddings()(encoder.hidden_states(ids, mask)), mask, 16)
    assert (2, 5, 40) in saved  # the hook sees them where autograd does keep them


def test_inputs_get_bos_and_left_padding_with_positions_from_first_token():
    ids, mask = encode_inputs([[5, 6, 7, 8], [9]], bos_id=1, pad_id=2, max_len=4)
    assert ids.tolist() == [[1, 5, 6, 7], [2, 2, 1, 9]]  # truncated to max_len with BOS; pad on the left
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert position_ids_for(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    padded, _ = encode_inputs([[5]], bos_id=1, pad_id=2, max_len=4, pad_to=4)
    assert padded.tolist() == [[2, 2, 1, 5]]


def test_flops_regularizer_is_sum_of_squared_mean_activations():
    reps = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    assert flops_regularizer(reps).item() == pytest.approx(2.0**2 + 0 + 1.0**2)


def test_quadratic_warmup_counts_optimizer_steps():
    assert quadratic_warmup(0.04, 0, 10) == 0.0
    assert quadratic_warmup(0.04, 5, 10) == pytest.approx(0.01)
    assert quadratic_warmup(0.04, 10, 10) == pytest.approx(0.04)
    assert quadratic_warmup(0.04, 25, 10) == pytest.approx(0.04)


def scored(q: torch.Tensor, p: torch.Tensor, group: int, temperature: float) -> Scores:
    """A step's scores as a one-vector-per-text paradigm gives them (a dot product) at `temperature`."""
    return Scores(q, p, group, Dense(temperature=temperature))


def test_contrastive_loss_uses_every_in_batch_passage():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # G=2, positives at 0 and 2
    out = ContrastiveLoss()(scored(q, p, 2, 1.0), None)
    # each query: scores [1, 0, 0, 0] with the positive first → log(e + 3) - 1
    assert out.total.item() == pytest.approx(math.log(math.e + 3) - 1, rel=1e-6)
    # the temperature divides the scores
    out = ContrastiveLoss()(scored(q, p, 2, 0.5), None)
    assert out.total.item() == pytest.approx(math.log(math.e**2 + 3) - 2, rel=1e-6)


def test_margin_mse_divides_student_margin_by_temperature():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[5.0, 2.0]])
    out = MarginMSELoss()(scored(q, p, 2, 0.5), teacher)
    assert out.total.item() == pytest.approx(((2 - 1) / 0.5 - 3) ** 2)


def test_cl_kd_is_half_ce_half_kl_teacher_to_student():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0]])  # uniform teacher
    out = ContrastiveDistillationLoss()(scored(q, p, 2, 1.0), teacher)
    ce = math.log(math.e + 1) - 1
    kl = math.log(0.5) + math.log(math.e + 1) - 0.5  # KL(uniform ‖ softmax([1, 0]))
    assert out.parts["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out.parts["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert out.total.item() == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-6)
    kl_only = KLDistillationLoss()(scored(q, p, 2, 1.0), teacher)
    assert kl_only.total.item() == pytest.approx(kl, rel=1e-6)


def test_margin_mse_refuses_groups_other_than_two():
    with pytest.raises(ValueError, match="group 2"):
        MarginMSELoss()(scored(torch.ones(1, 2), torch.ones(3, 2), 3, 1.0), torch.ones(1, 3))


def test_sparse_pool_without_padding_takes_the_plain_max():
    logits = torch.tensor([[[2.0, -4.0], [0.0, 6.0]]])
    assert torch.allclose(sparse_pool(logits, torch.ones(1, 2, dtype=torch.long), hidden_size=16),
                          torch.tensor([[math.log(2), math.log(4)]]))
