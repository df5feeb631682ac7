"""Cell state reconciliation, the ledger, and the resumable batch sampler."""

import pytest
import torch

from retrieval_scaling.scheduler import Ledger
from retrieval_scaling.status import reconcile
from retrieval_scaling.train import BatchSampler, linear_schedule


@pytest.mark.parametrize("done,run,ledger,state", [
    (True, "RUNNING", "FAILED", "DONE"),        # DONE marker wins: written only after evaluation
    (False, "FINISHED", "COMPLETED", "FAILED"),  # ended without DONE: MLflow's atexit says FINISHED
    (False, "FAILED", "SUBMITTED", "FAILED"),
    (False, "KILLED", None, "FAILED"),
    (False, "RUNNING", "SUBMITTED", "RUNNING"),
    (False, None, "SUBMITTED", "PENDING"),
    (False, None, None, "MISSING"),
])
def test_reconcile(done, run, ledger, state):
    assert reconcile(done, run, ledger) == state


def test_ledger_records_attempts_and_survives_reload(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = Ledger(path)
    ledger.submitted("abc", "101", {"model": "tiny_s", "paradigm": "dense", "loss": "cl"})
    ledger.ended("abc", "FAILED", "boom")
    ledger.submitted("abc", "102", {"model": "tiny_s", "paradigm": "dense", "loss": "cl"})
    ledger.ended("abc", "COMPLETED")
    again = Ledger(path).cells["abc"]
    assert [a["job_id"] for a in again["attempts"]] == ["101", "102"]
    assert [a["state"] for a in again["attempts"]] == ["FAILED", "COMPLETED"]
    assert again["attempts"][0]["error"] == "boom" and again["model"] == "tiny_s"


def make_sampler(seed=0):
    examples = [{"qid": f"q{i}", "positives": [f"p{i}"], "negatives": [f"n{i}_{j}" for j in range(5)],
                 "teacher": {f"p{i}": 10.0, **{f"n{i}_{j}": float(j) for j in range(5)}}} for i in range(7)]
    tokens = {f"q:q{i}": [10 + i] for i in range(7)}
    tokens.update({f"d:{d}": [50, 51] for e in examples for d in (*e["positives"], *e["negatives"])})
    return BatchSampler(examples, tokens, queries_per_step=3, group=4, seed=seed, query_len=4, passage_len=5,
                        bos_id=1, pad_id=2)


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = make_sampler(), make_sampler()
    for step in (0, 5, 2, 5):
        x, y = a.batch(step), b.batch(step)
        assert torch.equal(x.query_ids, y.query_ids) and torch.equal(x.teacher, y.teacher)
    assert not torch.equal(make_sampler(1).batch(0).teacher, a.batch(0).teacher) or \
        not torch.equal(make_sampler(1).batch(0).query_ids, a.batch(0).query_ids)


def test_batch_layout_positive_first_fixed_padding_and_epochs_without_replacement():
    sampler = make_sampler()
    batch = sampler.batch(0)
    assert batch.query_ids.shape == (3, 4) and batch.passage_ids.shape == (12, 5)
    assert batch.teacher[:, 0].tolist() == [10.0, 10.0, 10.0]  # the positive comes first in each group
    assert len(set(batch.teacher[:, 1:].flatten().tolist())) > 1
    # 7 queries, 3 per step: steps 0 and 1 and the first query of step 2 cover every query once
    seen = [int(q[-1]) - 10 for s in range(2) for q in sampler.batch(s).query_ids.tolist()]
    seen.append(sampler.batch(2).query_ids[0, -1].item() - 10)
    assert sorted(seen) == list(range(7))


def test_linear_schedule_warms_up_then_decays_to_zero():
    f = linear_schedule(warmup_steps=2, total_steps=10)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == 0.0
