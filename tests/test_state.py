"""Cell state reconciliation, the ledger, local dispatch, and the resumable batch sampler."""

import atexit
import functools
import json
import re
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import submitit
import torch

from retrieval_scaling.encoders import encode_inputs
from retrieval_scaling.faults import Faults, InjectedFault
from retrieval_scaling.jobs import Job, JobCall
from retrieval_scaling.ledger import Ledger
from retrieval_scaling.local_dispatch import dispatch_local, local_order
from retrieval_scaling.slurm import _expand
from retrieval_scaling.status import RESUBMIT, STATES, reconcile
from retrieval_scaling.train import BatchSampler, linear_schedule, shard
from retrieval_scaling.training_tokens import TrainingTokens


@pytest.mark.parametrize("done,job,run,age,state", [
    (True, "FAILED", "RUNNING", None, "DONE"),      # DONE marker wins: written only after evaluation
    (False, "COMPLETED", "FINISHED", 5, "FAILED"),  # SLURM says COMPLETED for a Python failure
    (False, "PENDING", None, None, "PENDING"),       # queued, no run yet
    (False, "PENDING", "SCHEDULED", 900, "PENDING"),  # requeued after a time-out, waiting to resume
    (False, "RUNNING", None, None, "RUNNING"),       # started, no heartbeat yet
    (False, "RUNNING", "RUNNING", 30, "RUNNING"),
    (False, "RUNNING", "RUNNING", 601, "STALE"),     # alive to SLURM, silent to MLflow: hung
    (False, "FAILED", "RUNNING", 700, "FAILED"),     # SIGKILL: MLflow never heard
    (False, "TIMEOUT", "RUNNING", 5, "TIMEOUT"),
    (False, "PREEMPTED", "SCHEDULED", 5, "PREEMPTED"),
    (False, "CANCELLED", "KILLED", 5, "CANCELLED"),
    (False, None, "RUNNING", 30, "RUNNING"),         # job unknown (accounting purged): MLflow alone
    (False, None, "RUNNING", 601, "STALE"),
    (False, None, "RUNNING", None, "STALE"),
    (False, None, "KILLED", None, "FAILED"),
    (False, None, None, None, "MISSING"),
])
def test_reconcile(done, job, run, age, state):
    assert reconcile(done, job, run, age, stale_after=600) == state


def test_resubmitted_states_exclude_done_running_pending():
    assert set(RESUBMIT) == set(STATES) - {"DONE", "RUNNING", "PENDING"}


def test_ledger_records_attempts_and_stages_and_survives_reload(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = Ledger(path)
    axes = {"model": "tiny_s", "paradigm": "dense", "loss": "cl"}
    ledger.submitted("abc", "101", axes, "local")
    ledger.ended("abc", "FAILED", "boom")
    ledger.submitted("abc", "7_3", axes, "slurm")
    ledger.stage_submitted("scifact-train+tiny_s", "6")
    again = Ledger(path)
    attempts = again.cells["abc"]["attempts"]
    assert [(a["job_id"], a["launcher"]) for a in attempts] == [("101", "local"), ("7_3", "slurm")]
    assert [a["state"] for a in attempts] == ["FAILED", "SUBMITTED"]
    assert attempts[0]["error"] == "boom" and again.cells["abc"]["model"] == "tiny_s"
    assert again.stages["scifact-train+tiny_s"]["job_id"] == "6"


def test_ledger_reads_the_first_version_format(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"abc": {"model": "m", "attempts": [{"job_id": "1", "state": "COMPLETED"}]}}))
    assert Ledger(path).cells["abc"]["attempts"][0]["job_id"] == "1" and Ledger(path).stages == {}


def test_sacct_array_rows_expand_to_tasks():
    assert _expand("12_[0-2,5]") == ["12_0", "12_1", "12_2", "12_5"]
    assert _expand("12_[1-3%2]") == ["12_1", "12_2", "12_3"]
    assert _expand("12_4") == ["12_4"] and _expand("13") == ["13"]


def test_faults_fire_once_and_are_consumed(tmp_path):
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"c1": {"raise_at_step": 2}, "c2": {"raise_at_step": 1}}))
    faults = Faults(path, "c1")
    faults.at_step(1)
    with pytest.raises(InjectedFault):
        faults.at_step(2)
    assert json.loads(path.read_text()) == {"c2": {"raise_at_step": 1}}
    Faults(path, "c1").at_step(2)  # a resubmitted cell runs clean
    Faults(tmp_path / "none.json", "c1").at_step(1)


def make_sampler(seed=0):
    examples = [{"qid": f"q{i}", "query": f"query {i}", "positives": [f"p{i}"],
                 "negatives": [f"n{i}_{j}" for j in range(5)],
                 "teacher": {f"p{i}": 10.0, **{f"n{i}_{j}": float(j) for j in range(5)}}} for i in range(7)]
    passages = [(d, f"text of {d}") for e in examples for d in (*e["positives"], *e["negatives"])]
    tokens = TrainingTokens.build(examples, passages, lambda texts: [
        [10 + int(t.split()[1])] if t.startswith("query") else [50, 51] for t in texts])
    return BatchSampler(tokens, queries_per_step=3, group=4, seed=seed, query_len=4, passage_len=5, bos_id=1,
                        pad_id=2)


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


def reference_batch(examples, tokens, step, queries_per_step, group, seed):
    """The sampler before token arrays: examples and a key → token ids dict, as lists."""
    kept = [e for e in examples if len(e["negatives"]) >= group - 1]
    n, rng = len(kept), np.random.default_rng([seed, 1_000_003, step])
    queries, passages, teacher = [], [], []
    for k in range(step * queries_per_step, (step + 1) * queries_per_step):
        ex = kept[np.random.default_rng([seed, k // n]).permutation(n)[k % n]]
        pos = ex["positives"][rng.integers(len(ex["positives"]))]
        negs = rng.choice(len(ex["negatives"]), size=group - 1, replace=False)
        docs = [pos, *(ex["negatives"][i] for i in negs)]
        queries.append(tokens["q:" + ex["qid"]])
        passages.extend(tokens["d:" + d] for d in docs)
        teacher.append([ex["teacher"][d] for d in docs])
    return queries, passages, teacher


def test_token_arrays_give_the_batches_the_examples_gave_and_load_memory_mapped(tmp_path):
    rng = np.random.default_rng(7)
    docs = [f"d{i}" for i in range(60)]
    examples = []
    for i in range(25):  # several positives, 2 to 9 negatives (some too few for a group of 4), random scores
        judged = list(rng.choice(docs, size=int(rng.integers(3, 12)), replace=False))
        pos, neg = judged[:int(rng.integers(1, 3))], judged[3:]
        examples.append({"qid": f"q{i}", "query": f"query {i} " * int(rng.integers(1, 4)), "positives": pos,
                         "negatives": neg, "teacher": {d: float(rng.normal()) for d in judged}})
    passages = [(d, f"passage {d} " * (1 + int(d[1:]) % 5)) for d in docs]

    def tokenize(texts):
        return [[3 + sum(map(ord, w)) % 97 for w in t.split()] for t in texts]

    built = TrainingTokens.build(examples, passages, tokenize)
    built.save(tmp_path)
    loaded = TrainingTokens.load(tmp_path)
    assert isinstance(loaded.ids, np.memmap) and loaded.examples == 25
    tokens = {f"q:{e['qid']}": ids for e, ids in zip(examples, tokenize([e["query"] for e in examples]), strict=True)}
    tokens.update({f"d:{d}": ids for (d, _), ids in zip(passages, tokenize([t for _, t in passages]), strict=True)})
    sampler = BatchSampler(loaded, queries_per_step=5, group=4, seed=3, query_len=6, passage_len=8, bos_id=1,
                           pad_id=2)
    for step in (0, 1, 7, 3):
        got = sampler.batch(step)
        queries, passages_ids, teacher = reference_batch(examples, tokens, step, 5, 4, 3)
        want_q, _ = encode_inputs(queries, 1, 2, 6, pad_to=6)
        want_p, _ = encode_inputs(passages_ids, 1, 2, 8, pad_to=8)
        assert torch.equal(got.query_ids, want_q) and torch.equal(got.passage_ids, want_p)
        assert torch.equal(got.teacher, torch.tensor(teacher, dtype=torch.float32))


def test_a_steps_random_draws_depend_on_seed_and_step_only():
    """A resumed run draws a step's dropout masks as a run straight through does."""
    import torch

    from retrieval_scaling.train import seed_step

    seed_step(45, 7)
    want = torch.rand(5)
    torch.rand(100)  # whatever came before: another run's earlier steps
    seed_step(45, 7)
    assert torch.equal(torch.rand(5), want)
    seed_step(45, 8)
    assert not torch.equal(torch.rand(5), want)
    seed_step(46, 7)
    assert not torch.equal(torch.rand(5), want)


def test_linear_schedule_warms_up_then_decays_to_zero():
    f = linear_schedule(warmup_steps=2, total_steps=10)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == 0.0


def test_shards_split_the_global_batch_in_rank_order():
    q = make_sampler(0)
    q.queries_per_step = 4
    batch = q.batch(1)
    parts = [shard(batch, r, 2) for r in range(2)]
    assert all(p.query_ids.shape == (2, 4) and p.passage_ids.shape == (8, 5) for p in parts)
    assert torch.equal(torch.cat([p.query_ids for p in parts]), batch.query_ids)
    assert torch.equal(torch.cat([p.passage_ids for p in parts]), batch.passage_ids)
    assert torch.equal(torch.cat([p.teacher for p in parts]), batch.teacher)
    # the positive of each shard's query i stays at row i·G of that shard's passages
    assert parts[1].teacher[:, 0].tolist() == [10.0, 10.0]


class RegistersExitHook:
    """Unpickled in the job process before the job runs, it registers an exit hook that touches
    `marker`: a stand-in for the exit work (module teardown, early hooks) a job process does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return atexit.register, (functools.partial(Path.touch, self.marker),)


def test_job_process_ends_at_its_saved_result_and_a_failed_one_exits_as_usual(tmp_path):
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=2)
    markers = {name: tmp_path / name for name in ("plain", "ended", "failed")}
    plain = executor.submit(print, "plain", RegistersExitHook(markers["plain"]))
    ended = executor.submit(JobCall(print, "unflushed output", RegistersExitHook(markers["ended"])))
    failed = executor.submit(JobCall(divmod, RegistersExitHook(markers["failed"]), 0))
    for job in (plain, ended, failed):
        job.wait()  # until the job's process has exited
    # Without JobCall the process runs its exit work; with it, a success skips it, and what the job
    # printed (block-buffered into the log file) is flushed first.
    assert markers["plain"].is_file() and plain.result() is None
    assert not markers["ended"].exists()
    assert ended.result() is None and "unflushed output" in ended.stdout()
    # A failure is reported as before and exits through the normal path.
    assert markers["failed"].is_file() and "TypeError" in str(failed.exception())


def _job_step(cfg, log: Path, name: str, needs: str | None, until: tuple[str, ...], fail: bool) -> None:
    """A stand-in job: logs 'start <name> ready|NOT-READY' (whether the stage it needs has ended), waits
    until the jobs named in `until` have ended (60 s at most), logs 'end <name>'; a stage also leaves a
    file named after it when it ends, failed or not."""
    import time

    with log.open("a") as f:
        f.write(f"start {name} {'ready' if needs is None or (log.parent / needs).exists() else 'NOT-READY'}\n")
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not all(f"end {u}" in log.read_text().splitlines() for u in until):
            time.sleep(0.1)
        if fail:
            raise RuntimeError(f"{name} broke")
    finally:
        with log.open("a") as f:
            f.write(f"end {name}\n")
        if cfg["paradigm"]["name"] is None:
            (log.parent / name).touch()


def _job(folder: Path, model: str, paradigm: str | None = None, loss: str | None = None,
         until: tuple[str, ...] = (), fail: bool = False) -> Job:
    """A stages job (no paradigm) or a cell job of `model`, as the sweep builds them."""
    cfg = {"model": {"name": model}, "paradigm": {"name": paradigm}}
    if paradigm is None:
        name = f"stage-{model}"
        return Job(f"stages {model}", _job_step, (cfg, folder / "order.log", name, None, until, fail),
                   folder / "jobs", stage=name)
    name = f"{model}/{paradigm}/{loss}"
    return Job(f"cell {name}", _job_step, (cfg, folder / "order.log", name, f"stage-{model}", until, fail),
               folder / "jobs", cell=name, needs=f"stage-{model}")


def test_local_order_puts_the_biggest_backbone_first_and_alternates_paradigms(tmp_path):
    grid = [_job(tmp_path, m, p, loss) for m in ("s", "l") for p in ("sparse", "dense") for loss in ("cl", "kd")]
    jobs = [_job(tmp_path, "s"), _job(tmp_path, "l"), *grid]
    order = [j.name for j in local_order(jobs, {"s": 4e5, "l": 2.8e6})]
    assert order == ["stages l", "stages s",
                     "cell l/sparse/cl", "cell l/dense/cl", "cell l/sparse/kd", "cell l/dense/kd",
                     "cell s/sparse/cl", "cell s/dense/cl", "cell s/sparse/kd", "cell s/dense/kd"]


def test_local_workers_start_a_cell_only_after_its_stages_job_ended_even_a_failed_one(tmp_path, caplog):
    # Two workers. l's stages hold one until s's two cells have ended (or 60 s); s's stages end at once,
    # failed. s's cells run on the other worker meanwhile, as they need only s's stages; l's cells after.
    jobs = [_job(tmp_path, "l", until=("s/dense/cl", "s/dense/kd")), _job(tmp_path, "s", fail=True),
            *(_job(tmp_path, m, "dense", loss) for m in ("l", "s") for loss in ("cl", "kd"))]
    cells = [j.cell for j in jobs if j.cell]
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job processes cannot import tests/
    ledger = Ledger(tmp_path / "ledger.json")
    with caplog.at_level("ERROR", logger="retrieval_scaling.local_dispatch"):
        outcome = dispatch_local(jobs, {"threads_per_job": 1, "max_parallel": 2, "timeout_min": 2}, ledger,
                                 {c: dict(zip(("model", "paradigm", "loss"), c.split("/"), strict=True))
                                  for c in cells})
    assert outcome == {"stages l": "COMPLETED", "stages s": "FAILED",
                       **{f"cell {c}": "COMPLETED" for c in cells}}
    # the failure's cause on the console, then where its whole log is
    (failed,) = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"stages s failed: RuntimeError: stage-s broke \(log: \S+_log\.err\)", failed), failed
    events = (tmp_path / "order.log").read_text().splitlines()
    assert not [e for e in events if "NOT-READY" in e], events
    starts = [e.split()[1] for e in events if e.startswith("start")]
    assert events.index("end s/dense/kd") < events.index("end stage-l"), events
    assert events.index("start l/dense/cl ready") > events.index("end stage-l"), events
    assert len(starts) == 6 and {ledger.cells[c]["attempts"][-1]["state"] for c in cells} == {"COMPLETED"}


def test_a_tokenizer_is_the_same_key_before_and_after_a_truncating_call():
    """A call with truncation leaves it set in the fast tokenizer's state; the token arrays' key must
    not change with it (the stages job keys a fresh tokenizer, a cell one it has used)."""
    from retrieval_scaling.backbone import train_bpe_tokenizer
    from retrieval_scaling.training_tokens import tokenizer_key

    texts = [f"a text number {i} about retrieval" for i in range(50)]
    tokenizer = train_bpe_tokenizer(texts, 300)
    fresh = tokenizer_key(tokenizer)
    tokenizer(texts[:3], add_special_tokens=False, truncation=True, max_length=4)
    assert tokenizer_key(tokenizer) == fresh
    assert tokenizer_key(train_bpe_tokenizer(texts[:20], 280)) != fresh  # another vocabulary, another key
