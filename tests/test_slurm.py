"""Against a real SLURM cluster on this machine (slurm/dev-cluster/up.sh, started here): fire-and-forget
submission, status reconciliation, fault injection and resubmission, time-out requeue, 2 ranks.

Cells are tiny_s with a short pretraining, evaluated on a subset, so that a cell takes seconds on one core."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Evaluated on a declared subset of SciFact test (30 queries over ~330 documents): these tests are about
# the cluster, and the whole corpus would be most of their time.
CELL = ["model=tiny_s", "launcher=dev_cluster", "budget.flops=1.5e11", "model.pretrain.steps=30",
        "model.mntp.steps=20", "log.every=5", "log.heartbeat_s=5", "train.checkpoint_every=10",
        "eval.subset={queries:30,bm25_depth:10,seed:0}"]
EVALUATED = "scifact:q30-bm25_10"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = os.environ.get("RS_SLURM_DIR", "/tmp/rs-slurm")
    was_up = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    proc = subprocess.run([str(ROOT / "slurm/dev-cluster/up.sh")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RS_SLURM_DIR": state})
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf = f"{state}/etc/slurm.conf"
    yield {"SLURM_CONF": conf}
    if not was_up:
        subprocess.run([str(ROOT / "slurm/dev-cluster/down.sh")], env={**os.environ, "RS_SLURM_DIR": state},
                       timeout=120)


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory, data_root):
    # One sweeps root for the module: the tiny backbone is built once and shared.
    root = tmp_path_factory.mktemp("sweeps")
    return {**os.environ, **cluster, "RS_SWEEPS_DIR": str(root), "RS_DATA_DIR": str(data_root),
            "MLFLOW_TRACKING_URI": ""}


def cli(env, verb, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", f"retrieval_scaling.{verb}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def status(env, sweep):
    proc = cli(env, "status", f"sweep={sweep}", "format=json", "stale_after=60")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {row["cell_id"]: row for row in json.loads(proc.stdout)}


def wait_for(env, sweep, predicate, timeout_s, what):
    deadline = time.time() + timeout_s
    rows = {}
    while time.time() < deadline:
        rows = status(env, sweep)
        if predicate(rows):
            return rows
        time.sleep(3)
    raise AssertionError(f"{what}: not reached in {timeout_s} s; last status {json.dumps(rows, indent=1)[:4000]}")


def plan_ids(env, sweep, *args):
    proc = cli(env, "sweep", *args, f"sweep.name={sweep}", "sweep.dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((Path(env["RS_SWEEPS_DIR"]) / sweep / "plan.json").read_text())
    return {(c["paradigm"], c["loss"]): c["cell_id"] for c in plan}


def sacct(env, job_id):
    """job id → state word of the job's array (or job), straight from sacct."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id.split("_")[0]],
                         capture_output=True, text=True, env=env).stdout
    return {line.split("|")[0]: line.split("|")[1].split()[0] for line in out.splitlines() if "|" in line}


def sacct_final(env, job_id, timeout_s=120):
    """The job's state once it has ended (a cell writes DONE a moment before its process exits)."""
    deadline = time.time() + timeout_s
    while True:
        state = sacct(env, job_id).get(job_id)
        if state not in (None, "PENDING", "RUNNING", "COMPLETING") or time.time() > deadline:
            return state
        time.sleep(2)


def mlflow_runs(env, sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(env['RS_SWEEPS_DIR']) / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep)
    return client, client.search_runs([exp.experiment_id], "tags.run_kind = 'cell'", max_results=100)


def ledger(env, sweep):
    return json.loads((Path(env["RS_SWEEPS_DIR"]) / sweep / "ledger.json").read_text())["cells"]


def test_four_cells_are_submitted_without_waiting_reach_done_and_a_second_sweep_submits_nothing(env):
    args = ["-m", "paradigm=sparse,dense", "loss=cl,kd", *CELL, "sweep.name=four"]
    proc = cli(env, "sweep", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted 4 cells to SLURM" in proc.stdout
    # Fire and forget: it returned before any cell finished (how fast it submits is a benchmark,
    # bench/orchestration.py --slurm: 5.1 s on one machine, 15.2 s once on a slower one under load).
    assert not list((Path(env["RS_SWEEPS_DIR"]) / "four" / "cells").glob("*/DONE"))

    again = cli(env, "sweep", *args)  # pending or running: nothing new
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout[-2000:]
    assert all(len(c["attempts"]) == 1 for c in ledger(env, "four").values())

    rows = wait_for(env, "four", lambda r: all(x["state"] == "DONE" for x in r.values()), 900, "4 cells DONE")
    assert len(rows) == 4
    for row in rows.values():
        assert row["metrics"][f"{EVALUATED}/ndcg_10"] >= 0 and row["flops_spent"] == row["flops_total"]
        assert sacct_final(env, row["job_id"]) == "COMPLETED"
    _, runs = mlflow_runs(env, "four")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4


def test_faults_end_in_the_right_state_and_resubmission_resumes_exactly_those(env):
    sweep = "faults"
    args = ["-m", "paradigm=dense", "loss=cl,kd,cl_kd", *CELL]
    ids = plan_ids(env, sweep, *args)
    raising, cancelled, killed = ids[("dense", "cl")], ids[("dense", "kd")], ids[("dense", "cl_kd")]
    faults = Path(env["RS_SWEEPS_DIR"]) / sweep / "faults.json"
    # Step 15: after the checkpoint at step 10, so each resumes from a step > 0.
    faults.write_text(json.dumps({raising: {"raise_at_step": 15},
                                  cancelled: {"sleep_at_step": 15, "seconds": 900},
                                  killed: {"sleep_at_step": 15, "seconds": 900}}))
    # A fourth, clean cell, submitted alone and finished first: the resubmission must leave it alone.
    clean = cli(env, "sweep", "paradigm=sparse", "loss=cl", *CELL, f"sweep.name={sweep}")
    assert clean.returncode == 0, clean.stderr[-3000:]
    proc = cli(env, "sweep", *args, f"sweep.name={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    clean_id = plan_ids(env, sweep, "paradigm=sparse", "loss=cl", *CELL)[("sparse", "cl")]

    def consumed(cell):
        return lambda rows: cell not in json.loads(faults.read_text())

    # (b) scancel while it stalls at step 15 → CANCELLED
    wait_for(env, sweep, consumed(cancelled), 600, "stall of the cell to cancel")
    job_b = ledger(env, sweep)[cancelled]["attempts"][-1]["job_id"]
    subprocess.run(["scancel", job_b], check=True, env=env)
    # (c) SIGKILL of the training process while it stalls → FAILED or STALE, never RUNNING forever
    wait_for(env, sweep, consumed(killed), 600, "stall of the cell to kill")
    pid = json.loads((Path(env["RS_SWEEPS_DIR"]) / sweep / "cells" / killed / "process.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    # (a) an exception at step 15 → FAILED
    rows = wait_for(env, sweep, lambda r: r[raising]["state"] == "FAILED" and r[cancelled]["state"] == "CANCELLED"
                    and r[killed]["state"] in ("FAILED", "STALE"), 600, "faulted states")
    assert sacct_final(env, rows[raising]["job_id"]) == "FAILED"
    assert sacct_final(env, job_b) == "CANCELLED"
    client, runs = mlflow_runs(env, sweep)
    by_cell = {r.data.tags["cell_id"]: r for r in runs}
    assert by_cell[raising].info.status == "FAILED" and by_cell[cancelled].info.status == "KILLED"
    wait_for(env, sweep, lambda r: r[clean_id]["state"] == "DONE", 600, "the clean cell DONE")

    again = cli(env, "sweep", *args, f"sweep.name={sweep}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "submitted 3 cells to SLURM" in again.stdout
    book = ledger(env, sweep)
    assert {c: len(e["attempts"]) for c, e in book.items()} == {raising: 2, cancelled: 2, killed: 2, clean_id: 1}
    # Widening the grid right away submits only the new cells (the others are pending or running now).
    wider = cli(env, "sweep", "-m", "paradigm=dense,sparse", "loss=cl,kd,cl_kd", *CELL, f"sweep.name={sweep}")
    assert wider.returncode == 0 and "submitted 2 cells to SLURM" in wider.stdout, wider.stdout[-3000:]
    assert sum(len(e["attempts"]) for e in ledger(env, sweep).values()) == 7 + 2
    rows = wait_for(env, sweep, lambda r: all(x["state"] == "DONE" for x in r.values()), 1200, "all DONE")
    client, runs = mlflow_runs(env, sweep)
    assert len(runs) == len(rows) == 6 and len({r.data.tags["cell_id"] for r in runs}) == 6  # no duplicates
    for cell in (raising, cancelled, killed):
        run = next(r for r in runs if r.data.tags["cell_id"] == cell)
        assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
        assert run.data.metrics["resumed_from_step"] > 0


def test_a_cell_past_its_time_limit_is_requeued_and_finishes(env):
    sweep = "timeout"
    args = ["paradigm=dense", "loss=cl", *CELL, "launcher.resources.tiny_s.time_min=2"]
    # SLURM acts on time limits every ~30 s: with 2 min and the warning 30 s before, the cell stalls
    # at step 12 until warned, checkpoints, is requeued, and finishes within its second allocation.
    (cell,) = plan_ids(env, sweep, *args).values()
    faults = Path(env["RS_SWEEPS_DIR"]) / sweep / "faults.json"
    faults.write_text(json.dumps({cell: {"sleep_at_step": 12, "seconds": 900}}))
    proc = cli(env, "sweep", *args, f"sweep.name={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = wait_for(env, sweep, lambda r: r[cell]["state"] == "DONE", 900, "requeued cell DONE")
    assert len(ledger(env, sweep)[cell]["attempts"]) == 1  # requeued by SLURM, not resubmitted by us
    job = rows[cell]["job_id"]
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job],
                             capture_output=True, text=True, env=env).stdout
    assert "REQUEUED" in history or "TIMEOUT" in history or "PREEMPTED" in history, history
    _, (run,) = mlflow_runs(env, sweep)
    assert run.info.status == "FINISHED" and int(run.data.tags["attempt"]) >= 2
    assert run.data.metrics["resumed_from_step"] >= 12


def test_two_ranks_train_one_cell_with_the_single_rank_loss(env):
    # Deterministic on both sides, so that the comparison is of the distributed math: fp32 (bf16
    # rounds differently in other shapes) and no LoRA dropout (the MNTP adapter's B is not zero, and
    # each rank draws its own masks: with dropout 0.05 the two step-1 losses differed by 6e-3).
    args = ["paradigm=dense", "loss=cl", *CELL, "train.bf16=false", "model.lora.dropout=0", "budget.flops=4e10"]
    for sweep, tasks in (("rank1", 1), ("rank2", 2)):
        proc = cli(env, "sweep", *args, f"sweep.name={sweep}", f"launcher.resources.default.tasks_per_node={tasks}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = {}
    for sweep in ("rank1", "rank2"):
        wait_for(env, sweep, lambda r: all(x["state"] == "DONE" for x in r.values()), 900, f"{sweep} DONE")
        client, (run,) = mlflow_runs(env, sweep)
        history = client.get_metric_history(run.info.run_id, "train/loss")
        losses[sweep] = next(m.value for m in history if m.step == 1)
    assert losses["rank2"] == pytest.approx(losses["rank1"], abs=1e-4)
