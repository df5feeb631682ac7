"""Bidirectional attention switch and MNTP masking on real transformers models."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from retrieval_scaling.backbone import set_bidirectional
from retrieval_scaling.mntp import IGNORE, masked_lm_loss, mntp_mask


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, attn_implementation=attn)).eval()


def lora_encoder(paradigm: str, checkpointing: bool = False, dropout: float = 0.0):
    """`tiny_llama`, bidirectional, with LoRA on q, v and down (B ≠ 0: the adapters change the output)
    and the paradigm's head."""
    from peft import LoraConfig, get_peft_model

    from retrieval_scaling.backbone import enable_gradient_checkpointing
    from retrieval_scaling.paradigms import paradigm_of

    model = tiny_llama("eager")
    set_bidirectional(model, True)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    if checkpointing:
        enable_gradient_checkpointing(model)
    return paradigm_of({"name": paradigm}).encoder(model)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_later_token_reaches_earlier_positions_only_when_bidirectional(attn):
    model = tiny_llama(attn)
    a = torch.tensor([[1, 5, 6, 7]])
    b = torch.tensor([[1, 5, 6, 9]])  # only the last token differs
    mask = torch.ones_like(a)

    def first_position(ids):
        with torch.no_grad():
            return model.model(input_ids=ids, attention_mask=mask).last_hidden_state[0, 0]

    set_bidirectional(model, False)
    # Exact on any CPU: the same shapes in one process run the same kernels, and a masked key adds an exact 0.
    assert torch.equal(first_position(a), first_position(b))
    set_bidirectional(model, True)
    assert not torch.allclose(first_position(a), first_position(b))


def test_left_padding_does_not_change_bidirectional_hidden_states():
    from retrieval_scaling.encoders import encode_inputs, position_ids_for

    model = tiny_llama("eager")
    set_bidirectional(model, True)
    ids, mask = encode_inputs([[5, 6, 7], [8]], bos_id=1, pad_id=2, max_len=8)
    alone, alone_mask = encode_inputs([[8]], bos_id=1, pad_id=2, max_len=8)
    with torch.no_grad():
        padded = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).last_hidden_state
        single = model.model(input_ids=alone, attention_mask=alone_mask,
                             position_ids=position_ids_for(alone_mask)).last_hidden_state
    assert torch.allclose(padded[1, -2:], single[0], atol=1e-5)


def test_mntp_masks_the_rate_with_80_10_10_and_unshifted_labels():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (200, 500), generator=gen)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False
    inputs, labels = mntp_mask(ids, maskable, mask_id=3, vocab_size=1000, rate=0.2, generator=gen)
    selected = labels != IGNORE
    n = selected.sum().item()
    assert abs(n / maskable.sum().item() - 0.2) < 0.005            # the rate, over maskable positions only
    assert not selected[:, 0].any()                                 # BOS is never a target
    assert torch.equal(labels[selected], ids[selected])             # labels: the original token, unshifted
    as_mask = (inputs == 3) & selected
    kept = (inputs == ids) & selected
    assert abs(as_mask.sum().item() / n - 0.8) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01                 # (random draws rarely hit the original)
    assert torch.equal(inputs[~selected], ids[~selected])           # unselected positions untouched


def test_causal_lm_loss_shift_makes_position_i_minus_1_predict_token_i():
    model = tiny_llama("eager")
    ids = torch.tensor([[1, 5, 6, 7]])
    labels = torch.tensor([[IGNORE, IGNORE, 6, IGNORE]])  # token 6 at position 2 is the only target
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, 1:2], torch.tensor([6]))  # from position 1
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_inference_encoder_merges_lora_on_a_copy_and_keeps_results(paradigm):
    """Evaluation's encoder: LoRA merged, sdpa, weights in eval.dtype — on a copy. In float32 it
    computes what the trained encoder computes (eager, adapters unmerged); in bfloat16 nearly so; the
    trained encoder is left exactly as it was."""
    from retrieval_scaling.encoders import encode_inputs
    from retrieval_scaling.errors import ConfigError
    from retrieval_scaling.inference import inference_encoder

    encoder = lora_encoder(paradigm)
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    ids, mask = encode_inputs([[5, 6, 7, 8], [9, 10]], bos_id=1, pad_id=2, max_len=8)  # left padding
    with torch.no_grad():
        reference = encoder.eval()(ids, mask)
        full = inference_encoder(encoder, "float32", "sdpa")
        half = inference_encoder(encoder, "bfloat16", "sdpa")
        assert torch.allclose(full(ids, mask), reference, atol=1e-5)
        assert torch.allclose(half(ids, mask).float(), reference, rtol=0.05, atol=0.05)
    for copy, dtype in ((full, torch.float32), (half, torch.bfloat16)):
        assert not any("lora" in n for n, _ in copy.named_parameters())
        assert {p.dtype for p in copy.parameters()} == {dtype}
        assert copy.backbone.config._attn_implementation == "sdpa"
        assert not any(p.requires_grad for p in copy.parameters())
    assert encoder.backbone.config._attn_implementation == "eager"
    assert {n for n, p in encoder.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(p, before[n]) for n, p in encoder.named_parameters())
    for bad in ("bf16", "int8"):
        with pytest.raises(ConfigError, match=f"eval.dtype='{bad}'"):
            inference_encoder(encoder, bad)


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_gradient_checkpointing_keeps_the_loss_and_the_lora_gradients(paradigm):
    """Recomputing activations in backward is a memory trade only: same loss, same LoRA gradients."""
    from retrieval_scaling.encoders import encode_inputs

    ids, mask = encode_inputs([[5, 6, 7, 8], [9, 10]], bos_id=1, pad_id=2, max_len=8)

    def loss_and_grads(checkpointing: bool):
        encoder = lora_encoder(paradigm, checkpointing).train()
        reps = encoder(ids, mask)
        loss = (reps[0] * reps[1]).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}
        return loss.item(), grads, encoder.backbone.base_model.model.model.layers[0].gradient_checkpointing

    plain, plain_grads, plain_flag = loss_and_grads(False)
    ckpt, ckpt_grads, ckpt_flag = loss_and_grads(True)
    assert (plain_flag, ckpt_flag) == (False, True)
    assert ckpt == pytest.approx(plain, rel=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


class CountUpcasts(TorchDispatchMode):
    """Counts the bf16 → fp32 copies the ops below it make."""

    def __init__(self):
        super().__init__()
        self.upcasts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 \
                and kwargs.get("dtype") == torch.float32:
            self.upcasts += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_lora_inputs_uncast_drops_one_upcast_per_adapter_and_changes_no_value_or_gradient(paradigm):
    """Under bf16 autocast, peft's cast of a bf16 LoRA input to fp32 is a lossless round trip: without
    it the loss and every gradient are bitwise the same, and each forward makes one bf16 → fp32 copy
    fewer per LoRA layer whose input is bf16: down_proj's (the MLP's bf16 product), in each of the 2
    layers; q_proj's and v_proj's input, the RMS norm's output, is fp32 already. Afterwards peft casts
    again."""
    from retrieval_scaling.backbone import lora_inputs_uncast
    from retrieval_scaling.encoders import encode_inputs

    encoder = lora_encoder(paradigm).train()
    encoder.backbone.get_input_embeddings().weight.requires_grad_(True)
    ids, mask = encode_inputs([[5, 6, 7, 8], [9, 10]], bos_id=1, pad_id=2, max_len=8)

    def step():
        encoder.zero_grad(set_to_none=True)
        counter = CountUpcasts()
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            reps = encoder(ids, mask).float()
        loss = (reps[0] * reps[1]).sum()
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}, counter.upcasts

    loss, grads, upcasts = step()
    with lora_inputs_uncast(encoder, autocast=True):
        uncast_loss, uncast_grads, uncast_upcasts = step()
    with lora_inputs_uncast(encoder, autocast=False):  # without autocast: peft's casts stay
        assert step()[2] == upcasts
    assert step()[2] == upcasts  # restored after the block
    assert upcasts - uncast_upcasts == 2
    # Exact on any CPU: bf16 → fp32 → bf16 is lossless, so the same kernels get the same bits.
    assert torch.equal(uncast_loss, loss)
    assert uncast_grads.keys() == grads.keys() and len(grads) == 2 * 3 * 2 + 1  # A, B; the embeddings
    for name, grad in grads.items():
        assert torch.equal(uncast_grads[name], grad), name


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_train_as_eager_layers_do_and_are_eager_again_afterwards(checkpointing):
    """train.compile: inductor runs the decoder layers (the step really goes through compiled graphs),
    the loss and LoRA gradients are the eager ones, parameter names do not change (checkpoints, saved
    weights), and the layers are eager again after the block."""
    from torch._dynamo.utils import counters

    from retrieval_scaling.backbone import compiled_layers
    from retrieval_scaling.encoders import encode_inputs

    ids, mask = encode_inputs([[5, 6, 7, 8], [9, 10]], bos_id=1, pad_id=2, max_len=8)
    encoder = lora_encoder("dense", checkpointing).train()
    names = [n for n, _ in encoder.named_parameters()]

    def loss_and_grads():
        encoder.zero_grad(set_to_none=True)
        reps = encoder(ids, mask)
        loss = (reps[0] * reps[1]).sum()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad}

    eager, eager_grads = loss_and_grads()
    counters.clear()
    with compiled_layers(encoder, True):
        compiled, compiled_grads = loss_and_grads()
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the layer
    layers = encoder.backbone.get_decoder().layers
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert [n for n, _ in encoder.named_parameters()] == names
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == 2 * 3 * 2
    for name, grad in eager_grads.items():
        assert torch.allclose(grad, compiled_grads[name], atol=1e-5, rtol=1e-4), name
    counters.clear()
    loss_and_grads()
    assert not counters["stats"]["unique_graphs"]  # eager again: nothing captured


def test_mntp_loss_applies_the_head_only_where_a_label_is_and_equals_the_causal_lm_loss():
    """`masked_lm_loss` is the model's own shifted loss (value and gradients: LoRA and the tied
    embeddings), computing logits only at the positions that predict a label."""
    model = lora_encoder("dense").backbone.train()
    model.get_input_embeddings().weight.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 50, (3, 12), generator=gen)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False
    inputs, labels = mntp_mask(ids, maskable, mask_id=3, vocab_size=50, rate=0.3, generator=gen)
    assert 0 < (labels != IGNORE).sum() < labels.numel() - 3
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for loss_fn in (lambda: model(input_ids=inputs, labels=labels).loss, lambda: masked_lm_loss(model, inputs, labels)):
        loss = loss_fn()
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    (ref_loss, ref_grads), (loss, got) = grads
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for g, r in zip(got, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # one target: token 6 at position 2, predicted from position 1 (the shift, by hand)
    one = torch.tensor([[IGNORE, IGNORE, 6, IGNORE]])
    x = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        logits = model(input_ids=x).logits
        assert masked_lm_loss(model, x, one).item() == pytest.approx(
            torch.nn.functional.cross_entropy(logits[0, 1:2], torch.tensor([6])).item(), rel=1e-6)


def test_chunked_head_cross_entropy_by_hand():
    from retrieval_scaling.pretrain import ChunkedHeadCrossEntropy

    # hidden 0 → logits [0, 0]: loss ln 2; d/dh = (softmax − one-hot) · W = −0.5·1 + 0.5·3 = 1; d/dW = 0
    hidden = torch.tensor([[0.0]], requires_grad=True)
    weight = torch.tensor([[1.0], [3.0]], requires_grad=True)
    loss = ChunkedHeadCrossEntropy.apply(hidden, weight, torch.tensor([0]), 4)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    assert hidden.grad.tolist() == [[1.0]] and weight.grad.tolist() == [[0.0], [0.0]]


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_head_cross_entropy_equals_the_whole_logits_loss(autocast):
    """Chunks of 4 over 10 rows (a partial last chunk): the loss and gradients of cross-entropy over
    the whole (T, V) logits (fp32: to rounding; bf16 autocast: the same matmuls, close), and no
    gradient computed for a frozen head."""
    from retrieval_scaling.pretrain import ChunkedHeadCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    results = []
    for chunked in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:
                loss = ChunkedHeadCrossEntropy.apply(hidden, weight, targets, 4)
            else:
                loss = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets)
        results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    tol = 2e-2 if autocast else 1e-5
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    frozen = weight.detach()
    loss = ChunkedHeadCrossEntropy.apply(hidden, frozen, targets, 4)
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(grad_hidden, results[1][1], rtol=tol, atol=tol)


def test_pretraining_loss_is_the_causal_lm_loss():
    from retrieval_scaling.pretrain import causal_lm_loss

    model = tiny_llama("eager").train()
    x = torch.randint(0, 50, (3, 300), generator=torch.Generator().manual_seed(2))  # 897 targets: 4 chunks
    params = [p for p in model.parameters() if p.requires_grad]
    ours, reference = causal_lm_loss(model, x), model(input_ids=x, labels=x).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    for g, r in zip(torch.autograd.grad(ours, params), torch.autograd.grad(reference, params), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix products the ops below it make."""

    def __init__(self):
        super().__init__()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.matmuls += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
        return func(*args, **(kwargs or {}))


def test_pretraining_loss_without_grad_is_the_same_loss_with_one_head_matmul_per_chunk():
    """The held-out loss runs under no_grad: same value as the module's, and the head costs one product
    per chunk of 256 targets (897 targets: 4), none for gradients."""
    from retrieval_scaling.pretrain import lm_head_loss

    model = tiny_llama("eager").eval()
    x = torch.randint(0, 50, (3, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=x).last_hidden_state
        counter = CountMatmuls()
        with counter:
            ours = lm_head_loss(model, hidden[:, :-1], x[:, 1:])
        reference = model(input_ids=x, labels=x).loss
    assert counter.matmuls == 4
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
