"""Faults a lab hits around the local path, each probed as a user would meet it: bad names and numbers,
a damaged ledger or marker, a non-UTF-8 corpus, an unreachable or overloaded tracking server, a URI
with a password, a lost MLflow store, a test set changed under the same name. The slow tests kill
real local sweeps and start two at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import SUBSET, run_cli

from retrieval_scaling.credentials import redact, redact_config
from retrieval_scaling.errors import DataError
from retrieval_scaling.ledger import Ledger
from retrieval_scaling.tracking_client import TrackingUnavailable, retrying, tracking_uri

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sweeps(tmp_path, data_root):
    return {"RS_SWEEPS_DIR": str(tmp_path / "sweeps"), "RS_DATA_DIR": str(data_root), "MLFLOW_TRACKING_URI": ""}


def one_error_line(proc) -> str:
    """The verbs' one way to fail: exit 2 and a single `error:` line on stderr."""
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# --- 5 and 6: names and numbers, one error path in every mode -------------------------------------------

@pytest.mark.parametrize("mode", [["+grid=tiny", "model=tiny_s", "paradigm=dense"], ["model=tiny_s"]],
                         ids=["grid", "single-cell"])
@pytest.mark.parametrize("override,culprit", [
    ("budget.flops=inf", "budget.flops=inf: expected a finite number"),
    ("budget.flops=nan", "budget.flops=nan: expected a finite number"),
    ("budget.flops=abc", "budget.flops='abc'"),
    ("launcher.max_parallel=0", "launcher.max_parallel=0"),
    ("train.micro_batch=0", "train.micro_batch=0: expected a whole number ≥ 1 or null"),
    ("launcher.max_parallel=abc", "launcher.max_parallel='abc'"),
    ("sweep.name=../../escaped", "sweep.name='../../escaped'"),
    ("sweep.name=/tmp/rs-absolute-name", "sweep.name='/tmp/rs-absolute-name'"),
    ("sweep.name=", "sweep.name=''"),
    ("model=tiny_xl", "model/tiny_xl"),
])
def test_bad_input_is_one_error_line_and_exit_2_in_every_mode_and_writes_nothing(sweeps, tmp_path, mode, override,
                                                                                  culprit):
    proc = run_cli("sweep", *mode, override, env_extra=sweeps)
    assert culprit in one_error_line(proc)
    root = Path(sweeps["RS_SWEEPS_DIR"])
    assert not root.exists() or not any(root.rglob("*"))  # no plan, no store, no cell
    assert not (tmp_path.parent / "escaped").exists() and not Path("/tmp/rs-absolute-name").exists()


def test_status_and_evaluate_refuse_bad_arguments_and_damaged_files_with_one_line(sweeps):
    assert "format='xml'" in one_error_line(run_cli("status", "sweep=x", "format=xml", env_extra=sweeps))
    assert "sweep='../x'" in one_error_line(run_cli("status", "sweep=../x", env_extra=sweeps))
    assert "no sweep 'nothere'" in one_error_line(run_cli("status", "sweep=nothere", env_extra=sweeps))
    assert "cell='../../etc'" in one_error_line(run_cli("evaluate", "cell=../../etc", env_extra=sweeps))

    assert run_cli("sweep", "model=tiny_s", "sweep.name=dmg", "sweep.dry_run=true", env_extra=sweeps).returncode == 0
    base = Path(sweeps["RS_SWEEPS_DIR"]) / "dmg"
    cell = json.loads((base / "plan.json").read_text())[0]["cell_id"]
    (base / "ledger.json").write_text('{"cells": {')
    line = one_error_line(run_cli("status", "sweep=dmg", env_extra=sweeps))
    assert str(base / "ledger.json") in line and "is damaged" in line
    (base / "ledger.json").unlink()
    (base / "cells" / cell).mkdir(parents=True)
    (base / "cells" / cell / "DONE").write_text("")
    line = one_error_line(run_cli("status", "sweep=dmg", env_extra=sweeps))
    assert f"{base / 'cells' / cell / 'DONE'} is damaged" in line and "resubmit" in line


def test_a_non_utf8_byte_in_a_corpus_is_named_with_its_file_and_line(sweeps, data_root, tmp_path):
    data = tmp_path / "data" / "scifact"
    (data / "qrels").mkdir(parents=True)
    for f in ("queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        (data / f).write_bytes((data_root / "scifact" / f).read_bytes())
    lines = (data_root / "scifact" / "corpus.jsonl").read_bytes().split(b"\n")
    lines[6] = lines[6].replace(b'"text": "', b'"text": "\xff', 1)
    (data / "corpus.jsonl").write_bytes(b"\n".join(lines))
    proc = run_cli("sweep", "model=tiny_s", env_extra={**sweeps, "RS_DATA_DIR": str(tmp_path / "data")})
    assert f"{data / 'corpus.jsonl'}:7: not UTF-8 (byte 0xff" in one_error_line(proc)


# --- 4: credentials -------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri,shown", [
    ("postgresql+psycopg2://mlflow:hunter2@db.lab:5432/mlflow", "postgresql+psycopg2://mlflow:***@db.lab:5432/mlflow"),
    ("http://alice:s3cr%40t@mlflow.lab:5000", "http://alice:***@mlflow.lab:5000"),
    ("sqlite:////data/mlflow.db?password=hunter2&mode=rw", "sqlite:////data/mlflow.db?password=***&mode=rw"),
    ("https://mlflow.lab/?access_token=abc.def&x=1", "https://mlflow.lab/?access_token=***&x=1"),
    ("http://mlflow.lab:5000", "http://mlflow.lab:5000"),  # nothing secret: unchanged
    ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
])
def test_redaction_hides_passwords_and_secret_query_values_only(uri, shown):
    assert redact(uri) == shown
    assert redact(f"error: store {uri} did not answer") == f"error: store {shown} did not answer"


def test_a_redacted_uri_in_a_job_config_gets_its_secret_back_from_the_environment(monkeypatch, tmp_path):
    full = "postgresql://u:hunter2@db:5432/m"
    cfg = redact_config({"tracking": {"uri": full, "artifacts": "/a"}, "seed": 1})
    assert cfg == {"tracking": {"uri": "postgresql://u:***@db:5432/m", "artifacts": "/a"}, "seed": 1}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    assert tracking_uri(cfg["tracking"], tmp_path) == full
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u:other@db:5432/x")
    with pytest.raises(Exception, match=r"export MLFLOW_TRACKING_URI"):
        tracking_uri(cfg["tracking"], tmp_path)


def test_a_sqlite_uri_with_a_query_string_is_the_same_store(tmp_path):
    from retrieval_scaling.tracking_client import sqlite_path, store_exists

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    assert sqlite_path(f"sqlite:///{db}?timeout=30") == db and store_exists(f"sqlite:///{db}?timeout=30")


# --- 7: the tracking server ------------------------------------------------------------------------------

class Flaky:
    """Fails `failures` times with `error`, then answers 42."""

    def __init__(self, failures, error):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return 42


def test_transient_tracking_failures_are_retried_with_doubling_waits_within_the_budget():
    from mlflow.exceptions import MlflowException

    waits = []
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    pool = MlflowException("QueuePool limit of size 5 overflow 10 reached", error_code=BAD_REQUEST)
    call = Flaky(3, pool)
    assert retrying(call, "log_batch", "http://h", budget_s=60, sleep=waits.append) == 42
    assert call.calls == 4 and waits == [1.0, 2.0, 4.0]


def test_a_tracking_server_that_stays_down_ends_in_one_clear_error_after_the_budget():
    from mlflow.exceptions import MlflowException

    down = MlflowException("API request to http://u:pw@h/api failed with exception: Max retries exceeded")
    waits = []
    with pytest.raises(TrackingUnavailable) as info:
        retrying(Flaky(100, down), "search_runs", "http://u:pw@h", budget_s=0, sleep=waits.append)
    assert waits == [] and "tracking store http://u:***@h did not answer search_runs (1 tries" in str(info.value)
    assert "pw@" not in str(info.value)


def test_a_bad_request_is_not_retried():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    call = Flaky(1, MlflowException("Invalid value for metric", error_code=INVALID_PARAMETER_VALUE))
    with pytest.raises(MlflowException, match="Invalid value"):
        retrying(call, "log_batch", "http://h", budget_s=60, sleep=lambda s: None)
    assert call.calls == 1


def test_an_unreachable_server_stops_sweep_and_status_with_one_line_in_seconds(sweeps):
    env = {**sweeps, "MLFLOW_TRACKING_URI": "http://user:hunter2@127.0.0.1:9", "RS_TRACKING_RETRY_S": "3"}
    start = time.monotonic()
    line = one_error_line(run_cli("sweep", "model=tiny_s", "sweep.name=down", env_extra=env))
    assert "tracking store http://user:***@127.0.0.1:9 did not answer" in line and "hunter2" not in line
    assert time.monotonic() - start < 60
    start = time.monotonic()
    line = one_error_line(run_cli("status", "sweep=down", env_extra={**env, "RS_TRACKING_RETRY_S": ""}))
    assert "did not answer" in line and time.monotonic() - start < 40  # status's own budget: 10 s


# --- 3 (ledger part): concurrent writers ------------------------------------------------------------------

def _append_attempts(path: str, who: str, n: int) -> None:
    ledger = Ledger(Path(path))
    for i in range(n):
        ledger.submitted(f"{who}{i}", str(i), {"model": "m"}, "local")


def test_two_processes_updating_the_ledger_lose_nothing(tmp_path):
    import multiprocessing

    path = tmp_path / "ledger.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_attempts, args=(str(path), who, 40)) for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert len(Ledger(path).cells) == 80


def test_a_damaged_ledger_is_a_data_error_naming_it(tmp_path):
    (tmp_path / "ledger.json").write_text("")
    with pytest.raises(DataError, match=r"ledger.json is damaged"):
        Ledger(tmp_path / "ledger.json")


# --- 8: the data's content in cache keys ----------------------------------------------------------------

def test_the_step0_and_training_data_keys_follow_the_files_not_the_name(compose, data_root, tmp_path):
    from retrieval_scaling.layout import step0_key, training_data_dir

    copy = tmp_path / "copy" / "scifact"
    (copy / "qrels").mkdir(parents=True)
    for f in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        (copy / f).write_bytes((data_root / "scifact" / f).read_bytes())

    def keys(root):
        cfg = compose("model=tiny_s", f"data.root={root}", f"eval.root={root}")
        return step0_key(cfg), training_data_dir(cfg["data"], tmp_path / "cache")

    same = keys(tmp_path / "copy")
    assert same == keys(data_root)  # the same files elsewhere: the same work
    test = (copy / "qrels" / "test.tsv").read_text().splitlines()
    (copy / "qrels" / "test.tsv").write_text("\n".join(test[:11]) + "\n")  # ten judgements left
    assert keys(tmp_path / "copy")[0] != same[0] and keys(tmp_path / "copy")[1] == same[1]
    train = (copy / "qrels" / "train.tsv").read_text().splitlines()
    (copy / "qrels" / "train.tsv").write_text("\n".join(train[:50]) + "\n")
    assert keys(tmp_path / "copy")[1] != same[1]


# --- 8: a lost tracking store ---------------------------------------------------------------------------

def test_status_says_when_the_store_lost_done_cells_and_relog_brings_them_back(sweeps, compose):
    """A DONE cell made as a cell leaves it (config.yaml, DONE, a run file), then its store deleted."""
    from mlflow.tracking import MlflowClient

    from retrieval_scaling.layout import cell_dir

    args = ["model=tiny_s", "paradigm=dense", "loss=cl", "sweep.name=lost", "budget.flops=3e11"]
    assert run_cli("sweep", *args, "sweep.dry_run=true", env_extra=sweeps).returncode == 0
    root = Path(sweeps["RS_SWEEPS_DIR"])
    cfg = compose(*args, f"sweep.root={root}")
    out = cell_dir(cfg)
    out.mkdir(parents=True)
    from omegaconf import OmegaConf

    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (out / "DONE").write_text(json.dumps({"cell_id": out.name, "run_id": "gone", "finished_at": 0,
                                          "metrics": {"scifact/ndcg_10": 0.25, "scifact/recall_100": 0.5}}))
    status = run_cli("status", "sweep=lost", "format=json", env_extra=sweeps)
    (row,) = json.loads(status.stdout)
    assert row["state"] == "DONE" and row["flops_spent"] == row["flops_total"]  # 100 %, not 0 %
    assert f"1 DONE cell(s) have no run in the tracking store sqlite:///{root.resolve()}/mlflow.db" in status.stderr
    assert "retrieval_scaling.relog sweep=lost" in status.stderr

    looked = run_cli("relog", "sweep=lost", "dry_run=true", env_extra=sweeps)
    assert looked.returncode == 0 and f"1 DONE cell(s) missing from sqlite:///{root.resolve()}/mlflow.db would be " \
        f"logged again: {out.name} (dry run: nothing written)" in looked.stdout, looked.stderr[-2000:]
    assert json.loads(run_cli("status", "sweep=lost", "format=json", env_extra=sweeps).stdout)[0]["run_status"] is None
    relog = run_cli("relog", "sweep=lost", env_extra=sweeps)
    assert relog.returncode == 0 and "1 DONE cell(s) logged again" in relog.stdout, relog.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lost").experiment_id], "tags.run_kind = 'cell'")
    assert run.info.status == "FINISHED" and run.data.tags["relogged"] == "true"
    assert run.data.metrics["scifact/ndcg_10"] == 0.25 and run.data.params["model.name"] == "tiny_s"
    status = run_cli("status", "sweep=lost", "format=json", env_extra=sweeps)
    assert "no run in the tracking store" not in status.stderr
    assert run_cli("relog", "sweep=lost", env_extra=sweeps).stdout.startswith("0 DONE cell(s)")


# --- 1, 2, 3: real local sweeps, killed and doubled -----------------------------------------------------

CELL = ["model=tiny_s", "paradigm=dense", "loss=cl", "budget.flops=3e11", "model.pretrain.steps=30",
        "model.mntp.steps=20", "train.checkpoint_every=10", "log.heartbeat_s=1", "log.every=5",
        "log.system_metrics_s=0", SUBSET]


STARTED: list[subprocess.Popen] = []
ORPHANS: list[int] = []  # jobs whose sweep was killed


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A failed test leaves no sweep or job running (a stopped job holds a GB)."""
    from retrieval_scaling import local_jobs

    yield
    roots = [p.pid for p in STARTED] + ORPHANS
    for pid in [q for root in roots for q in (*local_jobs.descendants(root), root)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for proc in STARTED:
        proc.wait()
    STARTED.clear()
    ORPHANS.clear()


def start_sweep(env, *args, log: Path) -> subprocess.Popen:
    """A sweep in a process group of its own (as a terminal or a batch script starts it)."""
    proc = subprocess.Popen([sys.executable, "-m", "retrieval_scaling.sweep", *args], cwd=ROOT,
                            env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    STARTED.append(proc)
    return proc


def prepare_stall(env, name: str, at_step: int) -> str:
    """The cell's id, with a fault that stalls it after step `at_step` (its checkpoint taken)."""
    assert run_cli("sweep", *CELL, f"sweep.name={name}", "sweep.dry_run=true", env_extra=env).returncode == 0
    base = Path(env["RS_SWEEPS_DIR"]) / name
    cell = json.loads((base / "plan.json").read_text())[0]["cell_id"]
    (base / "faults.json").write_text(json.dumps({cell: {"sleep_at_step": at_step, "seconds": 900}}))
    return cell


def wait_until(predicate, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f": {log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.5)


def stalled(env, name: str, cell: str) -> bool:
    faults = Path(env["RS_SWEEPS_DIR"]) / name / "faults.json"
    return cell not in json.loads(faults.read_text())  # consumed as the stall began


def status_row(env, name: str, *args: str) -> dict:
    proc = run_cli("status", f"sweep={name}", "format=json", *args, env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout)
    return row


def cell_run(env, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(env['RS_SWEEPS_DIR']) / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id], "tags.run_kind = 'cell'")
    return client, run


@pytest.mark.slow
def test_a_local_sweep_killed_with_its_jobs_is_not_running_at_once_and_the_next_resumes_it(sweeps, tmp_path):
    cell = prepare_stall(sweeps, "killed", at_step=20)
    sweep = start_sweep(sweeps, *CELL, "sweep.name=killed", log=tmp_path / "first.log")
    wait_until(lambda: stalled(sweeps, "killed", cell), 600, "the stall at step 20", tmp_path / "first.log")
    assert status_row(sweeps, "killed")["state"] == "RUNNING"
    os.killpg(sweep.pid, signal.SIGKILL)  # what an OOM kill of the session or a reboot does
    sweep.wait()
    killed_at = time.monotonic()
    row = status_row(sweeps, "killed")
    assert row["state"] == "FAILED" and row["job_state"] == "FAILED"  # not RUNNING until a heartbeat ages out
    assert time.monotonic() - killed_at < 30 and row["heartbeat_age_s"] < 30

    again = run_cli("sweep", *CELL, "sweep.name=killed", env_extra=sweeps)
    assert again.returncode == 0, again.stdout[-3000:]
    client, run = cell_run(sweeps, "killed")
    assert run.data.tags["attempt"] == "2" and run.data.metrics["resumed_from_step"] == 20
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps))  # each logged step once across both attempts
    assert status_row(sweeps, "killed")["state"] == "DONE"


@pytest.mark.slow
def test_orphaned_jobs_hold_their_cells_and_a_hung_one_is_killed_not_scancelled(sweeps, tmp_path):
    from retrieval_scaling import local_jobs

    cell = prepare_stall(sweeps, "hung", at_step=20)
    sweep = start_sweep(sweeps, *CELL, "sweep.name=hung", log=tmp_path / "first.log")
    wait_until(lambda: stalled(sweeps, "hung", cell), 600, "the stall at step 20", tmp_path / "first.log")
    sweep.send_signal(signal.SIGKILL)  # the sweep process alone: its job runs on
    sweep.wait()
    attempt = json.loads((Path(sweeps["RS_SWEEPS_DIR"]) / "hung" / "ledger.json").read_text())["cells"][cell][
        "attempts"][-1]
    assert local_jobs.alive(attempt["job_id"], attempt)
    rerun = run_cli("sweep", *CELL, "sweep.name=hung", env_extra=sweeps)
    assert "nothing to submit" in rerun.stdout, rerun.stdout[-3000:]  # the orphan still holds its cell

    job = [int(attempt["job_id"]), *local_jobs.descendants(int(attempt["job_id"]))]
    ORPHANS.append(job[0])
    for pid in job:
        os.kill(pid, signal.SIGSTOP)  # hung: no progress, no heartbeat
    wait_until(lambda: status_row(sweeps, "hung", "stale_after=5")["state"] == "STALE", 60, "the cell to go STALE")
    # A login node with SLURM's tools: a scancel that records what it was asked to cancel.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scancelled"}\n')
    (tmp_path / "bin" / "scancel").chmod(0o755)
    env = {**sweeps, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    again = run_cli("sweep", *CELL, "sweep.name=hung", "sweep.stale_after_s=5", env_extra=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"cell {cell}: killed its stalled local job {attempt['job_id']}" in again.stdout
    assert not (tmp_path / "scancelled").exists()  # a local PID never reaches scancel
    assert not any(local_jobs.alive(pid, {}) for pid in job)
    _, run = cell_run(sweeps, "hung")
    assert run.data.metrics["resumed_from_step"] == 20 and status_row(sweeps, "hung")["state"] == "DONE"


@pytest.mark.slow
def test_two_identical_sweeps_started_together_run_each_cell_once(sweeps, tmp_path):
    args = [*CELL, "sweep.name=twice", "budget.flops=1.5e11"]
    first = start_sweep(sweeps, *args, log=tmp_path / "a.log")
    second = start_sweep(sweeps, *args, log=tmp_path / "b.log")
    assert first.wait(900) == 0 or second.wait(900) == 0
    first.wait(900), second.wait(900)
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert logs.count("nothing to submit") == 1, logs[-4000:]
    ledger = json.loads((Path(sweeps["RS_SWEEPS_DIR"]) / "twice" / "ledger.json").read_text())
    ((cell, entry),) = ledger["cells"].items()
    assert [a["state"] for a in entry["attempts"]] == ["COMPLETED"]
    client, run = cell_run(sweeps, "twice")
    assert run.data.tags["attempt"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps))  # no doubled history
    assert status_row(sweeps, "twice")["state"] == "DONE"


@pytest.mark.slow
def test_a_password_in_the_tracking_uri_is_never_written_or_printed(sweeps, tmp_path):
    from servers import mlflow_server

    secret = "hunter2-" + os.urandom(4).hex()
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-art", tmp_path / "server.log",
                       workers=1) as uri:
        with_password = uri.replace("http://", f"http://lab:{secret}@")
        env = {**sweeps, "MLFLOW_TRACKING_URI": with_password}
        proc = run_cli("sweep", *CELL, "sweep.name=secret", "budget.flops=1.5e11", env_extra=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "lab:***@" in proc.stdout
        status = run_cli("status", "sweep=secret", env_extra=env)
    printed = proc.stdout + proc.stderr + status.stdout + status.stderr
    assert secret not in printed
    leaks = [p for base in (Path(sweeps["RS_SWEEPS_DIR"]), tmp_path / "server-art", tmp_path / "server.db")
             for p in ([base] if base.is_file() else base.rglob("*"))
             if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == []
    assert (Path(sweeps["RS_SWEEPS_DIR"]) / "secret" / "cells").is_dir()  # the cell's files were searched


# ---- full and read-only file systems, made for the test in a mount namespace -------------------------

def in_namespace(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`script` (sh) in a mount namespace of its own: mounts made there vanish with it."""
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def mounts(tmp_path):
    """Skipped only where this machine cannot make a private mount (no unshare, no privilege)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if in_namespace(f"mount -t tmpfs -o size=1m tmpfs {probe}").returncode != 0:
        pytest.skip("no private mounts here (unshare -m with tmpfs and bind mounts)")
    return tmp_path


FILL_AND_LOG = """
import sys, time
from pathlib import Path
from retrieval_scaling.errors import UserError
from retrieval_scaling.tracking_client import client
root = Path(sys.argv[1])
c = client(f"sqlite:///{root}/mlflow.db")
run = c.create_run(c.create_experiment("full")).info.run_id
with open(root / "filler", "wb") as f:  # the rest of the file system
    try:
        while True:
            f.write(b"x" * 65536)
            f.flush()
    except OSError:
        pass
start = time.monotonic()
try:
    for step in range(2000):  # enough new pages to need space
        c.log_batch(run, metrics=[__import__("mlflow").entities.Metric(f"m{i}", 1.0, 0, step) for i in range(50)])
except UserError as exc:
    print(f"{time.monotonic() - start:.1f}|{exc}")
"""


def test_a_full_disk_under_the_tracking_store_is_one_line_at_once_not_an_outage(mounts):
    """SQLite's "database or disk is full" comes through MLflow as TEMPORARILY_UNAVAILABLE; it is
    recognised as a full disk at once (not retried for minutes and blamed on the server)."""
    store = mounts / "small"
    store.mkdir()
    proc = in_namespace(f"mount -t tmpfs -o size=3m tmpfs {store} && "
                        f"RS_TRACKING_RETRY_S=120 {sys.executable} -c '{FILL_AND_LOG}' {store}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds, message = proc.stdout.strip().splitlines()[-1].split("|", 1)
    assert float(seconds) < 10  # not the 120 s retry budget
    assert message.startswith(f"no space left on the file system of {store}/mlflow.db (")
    assert "while writing the tracking store (log_batch)" in message and "run the same command again" in message


def test_a_read_only_sweep_root_can_be_read_and_a_writing_verb_says_so_in_one_line(mounts, data_root):
    root = mounts / "sweeps"
    env = f"RS_SWEEPS_DIR={root} RS_DATA_DIR={data_root} MLFLOW_TRACKING_URI="
    made = subprocess.run([sys.executable, "-m", "retrieval_scaling.sweep", "+grid=tiny", "model=tiny_s",
                           "paradigm=dense", "loss=cl", "sweep.name=ro", "sweep.dry_run=true"], cwd=ROOT,
                          env={**os.environ, "RS_SWEEPS_DIR": str(root), "RS_DATA_DIR": str(data_root),
                               "MLFLOW_TRACKING_URI": ""}, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    from retrieval_scaling.tracking_client import client

    c = client(f"sqlite:///{root}/mlflow.db")
    c.create_run(c.create_experiment("ro"))
    read_only = f"mount --bind {root} {root} && mount -o remount,bind,ro {root} && "
    status = in_namespace(read_only + f"{env} {sys.executable} -m retrieval_scaling.status sweep=ro")
    assert status.returncode == 0, status.stderr[-3000:]
    assert "MISSING" in status.stdout and "disk: checkpoints 0 B" in status.stdout
    sweep = in_namespace(read_only + f"{env} {sys.executable} -m retrieval_scaling.sweep +grid=tiny model=tiny_s "
                                     "paradigm=dense loss=cl sweep.name=ro sweep.dry_run=true")
    errors = [line for line in sweep.stderr.splitlines() if line.startswith("error:")]
    assert sweep.returncode == 2 and len(errors) == 1 and "Traceback" not in sweep.stderr, sweep.stderr[-3000:]
    assert "is on a read-only file system and this command writes there" in errors[0]
    relog = in_namespace(read_only + f"{env} {sys.executable} -m retrieval_scaling.relog sweep=ro dry_run=true")
    assert relog.returncode == 0 and "0 DONE cell(s) missing" in relog.stdout, relog.stderr[-3000:]


def test_a_checkpoint_cut_short_by_a_full_disk_is_named_as_such(tmp_path):
    """torch's zip writer reports a full disk as "unexpected pos …" (a RuntimeError): the cell stops with
    the disk named, the checkpoint that was being written, and the previous one kept."""
    from types import SimpleNamespace

    import torch

    from retrieval_scaling.disk import DiskFull
    from retrieval_scaling.train import save_checkpoint

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed; unexpected pos 31296 vs 31190")

    module = torch.nn.Linear(2, 2)
    engine = SimpleNamespace(module=module, save_checkpoint=full)
    with pytest.raises(DiskFull) as err:
        save_checkpoint(engine, tmp_path / "checkpoints", {"step": 40})
    message = str(err.value)
    assert message.startswith(f"no space left on the file system of {tmp_path / 'checkpoints'} (")
    assert "while writing checkpoint step40 (the previous one is kept)" in message and "\n" not in message

    def other(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):  # not every failure is a full disk
        save_checkpoint(SimpleNamespace(module=module, save_checkpoint=other), tmp_path / "checkpoints", {"step": 41})
