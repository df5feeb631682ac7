"""Gradient caching: a step encoded in micro-batches has the whole batch's loss and gradients."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval_scaling.errors import ConfigError
from retrieval_scaling.gradient_cache import MicroBatches

ROOT = Path(__file__).resolve().parents[1]


def test_micro_batches_count_the_backward_passes_of_a_step():
    # 4 queries and 12 passages in threes: ceil(4/3) + 12/3 = 6 passes; null or ≥ 12: the whole share at once
    assert MicroBatches.of(3, 4, 12) == MicroBatches(3, False, 6)
    assert MicroBatches.of(1, 4, 12) == MicroBatches(1, False, 16)
    assert MicroBatches.of(None, 4, 12) == MicroBatches.of(12, 4, 12) == MicroBatches(4, True, 1)
    with pytest.raises(ConfigError, match="train.micro_batch=0"):
        MicroBatches.of(0, 4, 12)


def run_ranks(out: Path, world: int, *extra: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "grad_cache_run.py"), str(out), *extra],
                              env={**env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if world > 1 else {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    return [torch.load(f"{out}.rank{r}") for r in range(world)]


def test_gradient_cached_steps_equal_the_whole_batch_step_on_one_and_two_ranks(tmp_path):
    """CL, KD and CL+KD, dense and sparse (with its FLOPS term), micro-batches of 1 and 3 sequences and
    the whole share, on 1 and 2 gloo ranks (ZeRO stage 0, and 2 on two ranks): the loss and the
    gradients the optimizer receives equal one rank's whole-batch step (to 1e-5 relative, fp32; the
    sums only run in another order)."""
    reference = run_ranks(tmp_path / "one", 1)[0]
    two = run_ranks(tmp_path / "two", 2)
    for results in (reference, *two):  # LoRA dropout 0.5: each micro-batch's two encodings drew the same masks
        assert results.pop("dropout") == {"replayed": True, "masks_differ": True}
    assert len(reference) == 18
    for (paradigm, loss, micro), want in reference.items():
        assert sum(g.abs().sum() for g in want["grads"]) > 0 and len(want["grads"]) == 12  # A, B × 3 targets × 2 layers
        if micro is None:
            want_passes = 1
        else:
            group = 2 if loss == "kd" else 3
            want_passes = -(-4 // micro) + -(-4 * group // micro)
        assert want["backward_passes"] == want_passes
        whole = reference[(paradigm, loss, None)]
        for got in (want, *(rank[(paradigm, loss, micro)] for rank in two)):
            assert got["loss"] == pytest.approx(whole["loss"], rel=1e-5), (paradigm, loss, micro)
            for g, w in zip(got["grads"], whole["grads"], strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
    for key in reference:  # both ranks hold the same mean gradient
        for g0, g1 in zip(two[0][key]["grads"], two[1][key]["grads"], strict=True):
            assert torch.equal(g0, g1)
    # ZeRO-2, as the cells run: each rank's optimizer holds its half of the flat gradient
    zero2 = run_ranks(tmp_path / "zero2", 2, "--stage", "2")
    for results in zero2:
        assert results.pop("dropout") == {"replayed": True, "masks_differ": True}
    for (paradigm, loss, micro), got in zero2[0].items():
        whole = torch.cat([g.flatten() for g in reference[(paradigm, loss, None)]["grads"]])
        halves = torch.cat([g.flatten() for rank in zero2 for g in rank[(paradigm, loss, micro)]["grads"]])
        assert got["loss"] == pytest.approx(reference[(paradigm, loss, None)]["loss"], rel=1e-5)
        torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
