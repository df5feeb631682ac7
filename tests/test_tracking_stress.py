"""18 cell processes logging at once: every metric point lands, runs end in the right state.

Against the default local store (SQLite, written directly by every process) and against an
`mlflow server` backed by a real PostgreSQL. Each worker is a separate Python process using the
project's CellRun, as a cell does; one of them is SIGKILLed mid-way and closed FAILED the way the
scheduler closes a dead job's run.
"""

import signal
import subprocess
import sys
import time

import pytest
from servers import mlflow_server, postgres

from retrieval_scaling.tracking import ensure_experiment, fail_if_running
from retrieval_scaling.tracking_client import client

pytestmark = pytest.mark.slow

# 300 calls a cell, one point each: more than the tiny grid's busiest cell makes (1,060 steps, every 10th logged,
# a heartbeat every 30 s); at 1,000 the two tests took 10 of the suite's 41 minutes on a 2-core CPU.
CELLS, POINTS = 18, 300
WORKER = """
import os, sys, time
from retrieval_scaling.tracking import CellRun
uri, art, cell, points, crash_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
run = CellRun(uri, "stress", art, cell, {"model": "m", "paradigm": "p", "loss": "l"}, {"x": "1"})
print("started", flush=True)
try:
    for step in range(points):
        run.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        if step == crash_at:
            time.sleep(60)  # the parent SIGKILLs us here
    run.finish("FINISHED")
except BaseException:
    run.finish("FAILED")
    raise
"""


def stress(uri, tmp_path):
    ensure_experiment(uri, "stress", tmp_path / "art")  # as the scheduler does, before fanning out
    procs = {}
    for i in range(CELLS):
        crash_at = POINTS // 2 if i == 0 else -1
        procs[f"cell{i:02d}"] = subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, str(tmp_path / "art"), f"cell{i:02d}", str(POINTS), str(crash_at)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    c = client(uri)
    exp = c.get_experiment_by_name("stress").experiment_id
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until the crashing cell has logged half its points
        runs = c.search_runs([exp], filter_string="tags.cell_id = 'cell00'")
        if runs and len(c.get_metric_history(runs[0].info.run_id, "train/loss")) > POINTS // 2:
            break
        time.sleep(1)
    procs["cell00"].send_signal(signal.SIGKILL)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert name == "cell00" or proc.returncode == 0, f"{name}: {err[-3000:]}"
    assert fail_if_running(uri, "stress", "cell00")  # the scheduler's clean-up of a dead job
    runs = {r.data.tags["cell_id"]: r for r in c.search_runs([exp], max_results=100)}
    assert len(runs) == CELLS
    for name, run in runs.items():
        history = c.get_metric_history(run.info.run_id, "train/loss")
        if name == "cell00":
            assert run.info.status == "FAILED" and POINTS // 2 < len(history) < POINTS
        else:
            assert run.info.status == "FINISHED", name
            assert sorted(m.step for m in history) == list(range(POINTS)), name  # every point, once


def test_eighteen_cells_log_concurrently_to_the_local_sqlite_store(tmp_path):
    stress(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)


def test_eighteen_cells_log_concurrently_to_a_postgresql_backed_server(tmp_path):
    with postgres() as db, mlflow_server(db, tmp_path / "art", tmp_path / "server.log") as uri:
        stress(uri, tmp_path)
