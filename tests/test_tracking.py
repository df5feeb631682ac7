"""MLflow bookkeeping against a real SQLite store: one run per cell across attempts, no run left
RUNNING after its process died."""

import pytest

from retrieval_scaling.tracking import CellRun, cell_runs, ensure_experiment, fail_if_running, flatten
from retrieval_scaling.tracking_client import client


def test_a_cell_keeps_one_run_across_attempts_and_a_dead_one_is_closed_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment(uri, "sw", tmp_path / "art")
    tags = {"model": "tiny_s", "paradigm": "dense", "loss": "cl", "sweep": "sw"}
    first = CellRun(uri, "sw", tmp_path / "art", "c1", tags, {"a.b": "1"})
    first.log_metrics({"flops_spent": 10.0}, step=1)
    # the process dies here without closing its run (SIGKILL): the scheduler closes it
    assert fail_if_running(uri, "sw", "c1") is True
    assert cell_runs(uri, "sw")["c1"].info.status == "FAILED"
    assert fail_if_running(uri, "sw", "c1") is False  # only RUNNING runs are touched

    second = CellRun(uri, "sw", tmp_path / "art", "c1", tags, {"a.b": "1"})
    assert (second.run_id, second.attempt) == (first.run_id, 2)
    second.finish("FINISHED")
    run = cell_runs(uri, "sw")["c1"]
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2" and run.data.params["a.b"] == "1"
    assert len(cell_runs(uri, "sw")) == 1


def test_a_resumed_cell_does_not_log_its_replayed_steps_twice(tmp_path):
    """Attempt 1 logs steps 0, 10, 20, 30 and dies; its last checkpoint was at step 20, so attempt 2
    replays 30 and goes on to 40: step 30 keeps one point (the first attempt's), step 40 gets one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = {"model": "tiny_s", "paradigm": "dense", "loss": "cl", "sweep": "sw"}
    first = CellRun(uri, "sw", tmp_path / "art", "c1", tags, {})
    for step in (0, 10, 20, 30):
        first.log_new_metrics({"train/loss": 1.0 / (1 + step), "scifact/ndcg_10": 0.1}, step)
    second = CellRun(uri, "sw", tmp_path / "art", "c1", tags, {})
    second.log_new_metrics({"scifact/ndcg_10": 0.1}, 0)  # the step-0 evaluation again, from its cache
    second.log_new_metrics({"resumed_from_step": 20.0}, 20)
    for step in (30, 40):
        second.log_new_metrics({"train/loss": 2.0 / (1 + step)}, step)
    history = client(uri).get_metric_history(first.run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 10, 20, 30, 40]
    assert {m.step: m.value for m in history}[30] == 1.0 / 31  # the first attempt's point kept
    assert [m.step for m in client(uri).get_metric_history(first.run_id, "scifact/ndcg_10")] == [0, 10, 20, 30]
    assert [m.step for m in client(uri).get_metric_history(first.run_id, "resumed_from_step")] == [20]


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {"a.b": "1", "a.c.d": "x", "e": "[1, 2]"}


def _ensure_after_barrier(uri: str, artifacts: str, barrier) -> str:
    barrier.wait()
    return ensure_experiment(uri, "sw", artifacts)


def test_sweeps_started_together_on_a_fresh_store_share_one_experiment(tmp_path):
    """Two `sweep` commands started at once used to race on the schema migration ("table experiments
    already exists"); the store lock serialises the creation."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(3)
    with ProcessPoolExecutor(3, mp_context=ctx) as pool:
        ids = list(pool.map(_ensure_after_barrier, [uri] * 3, [str(tmp_path / "art")] * 3, [barrier] * 3))
    assert len(set(ids)) == 1


@pytest.mark.slow
def test_system_metrics_go_on_after_the_tracking_server_restarts(tmp_path, monkeypatch):
    """A real MLflow server stopped for ~8 s and started again on its port, mid-cell: the system
    metrics logged before, the samples of the outage dropped with a warning, and logging again after."""
    import time

    from servers import free_port, mlflow_server

    from retrieval_scaling.monitoring import SystemMetrics
    from retrieval_scaling.tracking import CellRun

    monkeypatch.setenv("RS_TRACKING_RETRY_S", "2")  # a sample's calls give up quickly while the server is down
    backend, port = f"sqlite:///{tmp_path / 'server.db'}", free_port()

    def points(uri, run_id):
        return client(uri).get_metric_history(run_id, "system/cpu_utilization_percentage")

    def wait_for(condition, seconds=60):
        deadline = time.time() + seconds
        while not condition():
            assert time.time() < deadline
            time.sleep(0.5)

    with mlflow_server(backend, tmp_path / "art", tmp_path / "server.log", workers=1, port=port) as uri:
        run = CellRun(uri, "blip", tmp_path / "art", "abcd1234", {"model": "m"}, {})
        metrics = SystemMetrics(run, uri, 0.5).__enter__()
        wait_for(lambda: len(points(uri, run.run_id)) >= 3)
    time.sleep(8)  # down: samples fail
    with mlflow_server(backend, tmp_path / "art", tmp_path / "server.log", workers=1, port=port) as uri:
        before = len(points(uri, run.run_id))
        wait_for(lambda: len(points(uri, run.run_id)) >= before + 3)
        metrics.__exit__(None, None, None)
        steps = [m.step for m in points(uri, run.run_id)]
    assert metrics.thread.is_alive() is False and before >= 3
    assert len(steps) >= before + 3 and sorted(steps) == list(range(len(steps)))  # no step lost or repeated


def test_status_names_the_step0_and_the_final_metric_apart_and_a_done_cells_job_completed(tmp_path):
    """Two cells of a local sweep whose process was killed: one DONE (its job's process gone since), one
    still training after its step-0 evaluation. The running cell's step-0 nDCG is not its final one."""
    import json
    import socket

    from retrieval_scaling.layout import ledger_path, plan_path, sweep_dir
    from retrieval_scaling.ledger import Ledger
    from retrieval_scaling.status import sweep_rows

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan_path(tmp_path, "sw").parent.mkdir(parents=True)
    plan = {"flops_budget": 100.0, "flops_total": 100.0, "model": "tiny_s", "paradigm": "dense", "loss": "cl"}
    plan_path(tmp_path, "sw").write_text(json.dumps([{**plan, "cell_id": "aaaaaaaa"}, {**plan, "cell_id": "bbbbbbbb"}]))
    ledger = Ledger(ledger_path(tmp_path, "sw"))
    gone = {"host": socket.gethostname(), "pid_started": 1.0}  # no such process: the sweep was killed
    for cell in ("aaaaaaaa", "bbbbbbbb"):
        ledger.submitted(cell, "999999", {"model": "tiny_s", "paradigm": "dense", "loss": "cl"}, "local", **gone)
        run = CellRun(uri, "sw", tmp_path / "art", cell, {"model": "tiny_s"}, {})
        run.log_new_metrics({"scifact/ndcg_10": 0.05, "scifact:top256/ndcg_10": 0.01}, 0)  # the pruned one: sparse
        run.log_metrics({"flops_spent": 50.0}, 5)
    (sweep_dir(tmp_path, "sw") / "cells" / "aaaaaaaa").mkdir(parents=True)
    (sweep_dir(tmp_path, "sw") / "cells" / "aaaaaaaa" / "DONE").write_text(json.dumps(
        {"cell_id": "aaaaaaaa", "metrics": {"scifact/ndcg_10": 0.4}}))
    done, running = sweep_rows("sw", tmp_path, uri)
    assert done["state"] == "DONE" and done["job_state"] == "COMPLETED"
    step0 = {"scifact/ndcg_10": 0.05, "scifact:top256/ndcg_10": 0.01}
    assert done["metrics"] == {"scifact/ndcg_10": 0.4} and done["step0_metrics"] == step0
    assert running["state"] == "FAILED" and running["job_state"] == "FAILED"
    assert running["metrics"] == {} and running["step0_metrics"] == step0
