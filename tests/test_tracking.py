"""MLflow bookkeeping against a real SQLite store: one run per cell across attempts, no run left
RUNNING after its process died."""

from retrieval_scaling.tracking import CellRun, cell_runs, ensure_experiment, fail_if_running, flatten


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
