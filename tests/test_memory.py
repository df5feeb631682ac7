"""The planner's memory model: its terms by hand, its per-token count against autograd's, and its peak
against a real step's live tensors."""

import dataclasses
import sys
from pathlib import Path

import pytest

from retrieval_scaling.flops import Architecture
from retrieval_scaling.memory import (
    FP32,
    Precision,
    TrainShape,
    saved_per_token_layer,
    trainable_state,
    training_peak,
)
from retrieval_scaling.paradigms.sparse import Sparse

ROOT = Path(__file__).resolve().parents[1]
ARCH = Architecture(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=704, vocab_size=512, tie_word_embeddings=True)


def test_trainable_state_is_partitioned_as_zero_partitions_it():
    # 1,000 fp32 trainable parameters on 4 ranks: ZeRO-2 keeps every parameter, a quarter of the gradients,
    # and a quarter of the fp32 master copy and of Adam's two moments
    assert trainable_state(1000, 4, 2) == {"trainable_params": 4000, "gradients": 1000, "optimizer": 3000}
    assert trainable_state(1000, 4, 1) == {"trainable_params": 4000, "gradients": 4000, "optimizer": 3000}
    assert trainable_state(1000, 4, 3) == {"trainable_params": 1000, "gradients": 1000, "optimizer": 3000}
    assert trainable_state(1000, 4, 0) == {"trainable_params": 4000, "gradients": 4000, "optimizer": 12000}


def test_the_heads_backward_holds_one_chunk_of_logits_and_the_weight_it_needs():
    vocab = Architecture(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=128, vocab_size=128_256)
    # 128 tokens × 128,256 terms: 4 sequences a chunk (2**26 logits); bf16 under autocast, plus the fp32 head
    # weight's bf16 copy; a frozen head needs no weight gradient
    chunk = 4 * 128 * 128_256 * 2
    # 16 queries and 64 passages on the rank, whole; then in micro-batches of 2
    shape = TrainShape(16, 64, 32, 128, world=1, micro_batch=None)
    head = Sparse().training_head(vocab, shape, Precision(True, FP32), False)
    assert head.backward == chunk + 128_256 * 64 * 2
    micro = dataclasses.replace(shape, micro_batch=2)
    assert Sparse().training_head(vocab, micro, Precision(False, FP32), True).backward == (
        2 * 128 * 128_256 * 4 + 128_256 * 64 * 4)
    # the pooling's max logits (bf16) and argmax (int32) of the 80 texts on the rank; 64 passages' term weights
    # (input, output, mask) in a micro-batch's graph; the FLOPS regulariser's second copy in the loss
    assert (head.kept, head.graph, head.loss_copies) == (80 * 128_256 * (2 + 4), 3 * 4 * 128_256 * 64, 2)


@pytest.mark.parametrize("attention, autocast, weights, dropout", [
    ("sdpa", True, "float32", 0.0), ("sdpa", True, "float32", 0.05), ("sdpa", True, "bfloat16", 0.05),
    ("sdpa", False, "float32", 0.05), ("eager", True, "float32", 0.0), ("eager", False, "float32", 0.0)])
def test_saved_bytes_per_token_match_what_autograd_keeps(attention, autocast, weights, dropout):
    """A shape outside the fit's five, counted with saved-tensor hooks: within 5 %."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from memory_model import per_token_layer

    arch = {"hidden_size": 320, "intermediate_size": 864, "num_attention_heads": 5, "num_key_value_heads": 1,
            "head_dim": 64, "tie_word_embeddings": True}
    counted = per_token_layer(arch, attention, autocast, getattr(torch, weights), dropout, length=48)
    shape = Architecture(**{**arch, "num_hidden_layers": 1, "vocab_size": 512})
    estimate = saved_per_token_layer(shape, attention, Precision(autocast, 2 if weights == "bfloat16" else 4),
                                     dropout > 0, 48)
    assert estimate == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("case", ["tiny_s/sparse/cl", "tiny_s/sparse/cl/micro3", "tiny_s/dense/kd"])
def test_the_estimated_peak_is_within_a_quarter_of_a_real_steps_live_tensors(compose, case):
    """Two steps through the cell's engine (gradient caching for micro3), every live tensor counted."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from memory_model import live_tensor_tracker

    from retrieval_scaling.cell_model import deepspeed_config
    from retrieval_scaling.distributed import init_distributed
    from retrieval_scaling.flopcheck import RandomStep
    from retrieval_scaling.gradient_cache import MicroBatches, optimizer_step
    from retrieval_scaling.train import Batch, StepLoss, build_engine

    model, paradigm, loss, *micro = case.split("/")
    cfg = compose(f"model={model}", f"paradigm={paradigm}", f"loss={loss}", "deepspeed.zero_optimization.stage=2",
                  f"train.micro_batch={micro[0][5:] if micro else 'null'}")
    init_distributed()
    with live_tensor_tracker() as tracker:
        step = RandomStep(cfg, attn_implementation=cfg["model"]["attn_implementation"])
        micro_batches = MicroBatches.of(cfg["train"]["micro_batch"], step.queries, step.queries * step.group)
        engine, _ = build_engine(step.encoder, micro_batches.size, 3, cfg["train"], deepspeed_config(cfg),
                                 micro_batches.backward_passes)
        step_loss = StepLoss(step.step_loss.loss_fn, step.group, step.encoder.paradigm, 3)
        batch = Batch(step.q_ids, torch.ones_like(step.q_ids), step.p_ids, torch.ones_like(step.p_ids), step.teacher)
        for i in range(2):
            optimizer_step(engine, batch, micro_batches, False, lambda q, p: step_loss(q, p, batch.teacher, i))  # noqa: B023
    estimate = sum(training_peak(cfg, 1, Precision(autocast=False, weight_bytes=4)).values())
    assert estimate == pytest.approx(tracker.peak, rel=0.25)
    assert tracker.peak > 10e6  # the step is measured, not just the model


def test_micro_batches_and_zero_3_lower_the_8b_estimate_and_the_planner_shows_it(compose):
    from retrieval_scaling.plan import plan_cell

    def train_gb(*overrides):
        cfg = compose("+grid=full", "model=llama3_8b", "paradigm=sparse", "loss=cl", "budget.match=null",
                      "budget.flops=1e20", *overrides)
        return plan_cell(cfg)["memory_gb"]["train"]

    whole, micro = train_gb("train.micro_batch=null"), train_gb()
    sharded = train_gb("model.deepspeed.zero_optimization.stage=3")
    assert micro["total"] < whole["total"] / 2 and micro["activations"] < whole["activations"] / 5
    assert sharded["weights"] == pytest.approx(micro["weights"] / 4, rel=1e-3)  # 4 GPUs share the frozen weights
    # 8B in bf16: 8.03e9 parameters × 2 bytes on each GPU under ZeRO-2
    assert micro["weights"] == pytest.approx(16.06, abs=0.01)


@pytest.mark.parametrize("paradigm", ["dense", "sparse"])
def test_searching_a_shard_on_the_gpu_by_hand(compose, paradigm):
    from retrieval_scaling.backbone import architecture
    from retrieval_scaling.memory import Precision, evaluation_peak, search_buffers

    cfg = compose("model=llama3_8b", f"paradigm={paradigm}", "eval=paper")
    got = search_buffers(cfg, architecture(cfg["model"]))
    # 256 queries × 200,000 documents: float32 scores and a 1-byte candidates' mask
    assert got["search_scores"] == 256 * 200_000 * 5
    if paradigm == "dense":  # the float16 shard and its float32 copy: 200,000 × 4,096 × (2 + 4)
        assert got["search_shard"] == 200_000 * 4096 * 6 and "search_queries" not in got
    else:  # CSR of 512 planned terms a document: 64-bit row and column indices, float32 weights
        assert got["search_shard"] == 200_000 * 512 * 20 and got["search_queries"] == 256 * 128_256 * 4
    peak = evaluation_peak(cfg, Precision(True, 2))
    host = evaluation_peak({**cfg, "eval": {**cfg["eval"], "search": "host"}}, Precision(True, 2))
    assert "search_shard" not in host and sum(peak.values()) >= sum(host.values())
