"""SLURM submission and resubmission against a fake `sbatch`/`sacct`/`squeue`/`scancel` (fake_slurm.py):
the arrays and dependencies a grid goes out as, and what a second sweep does with each job state. In
seconds, without root; test_slurm.py runs the same logic on the real development cluster."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
from test_cli import run_cli

HERE = Path(__file__).resolve().parent
GRID = ["+grid=tiny", "model=tiny_s,tiny_m", "launcher=dev_cluster", "sweep.name=fk"]


class FakeSlurm:
    def __init__(self, tmp_path: Path, data_root: Path):
        self.bin, self.state = tmp_path / "bin", tmp_path / "slurm.json"
        self.bin.mkdir()
        for tool in ("sbatch", "sacct", "squeue", "scancel", "srun"):
            (self.bin / tool).write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_slurm.py"} {tool} "$@"\n')
            (self.bin / tool).chmod(0o755)
        self.root = tmp_path / "sweeps"
        self.env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_SLURM_STATE": str(self.state),
                    "RS_SWEEPS_DIR": str(self.root), "RS_DATA_DIR": str(data_root), "MLFLOW_TRACKING_URI": ""}

    def data(self) -> dict:
        return json.loads(self.state.read_text())

    def set_states(self, states: dict[str, str]) -> None:
        """job id (`<array>_<task>` or `<job>`) → the state sacct and squeue report for it."""
        data = self.data()
        for job_id, word in states.items():
            main, _, task = job_id.partition("_")
            if task:
                data["jobs"][main]["task_states"][task] = word
            else:
                data["jobs"][main]["state"] = word
        self.state.write_text(json.dumps(data))

    def ledger(self) -> dict:
        return json.loads((self.root / "fk" / "ledger.json").read_text())


@pytest.fixture
def fake(tmp_path, data_root):
    return FakeSlurm(tmp_path, data_root)


def submit(fake: FakeSlurm) -> str:
    proc = run_cli("sweep", *GRID, env_extra=fake.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_grid_went_out_as_a_stages_job_per_backbone_then_one_array_after_each(fake: FakeSlurm, out: str) -> None:
    jobs = fake.data()["jobs"]
    stages = {j: v for j, v in jobs.items() if v["name"] == "rs-fk-stages"}
    arrays = {j: v for j, v in jobs.items() if v["name"] == "rs-fk"}
    assert len(stages) == 2 and all(v["dependency"] is None and v["tasks"] is None for v in stages.values())
    assert sorted(v["tasks"] for v in arrays.values()) == [6, 6]  # one array per (resources, stages job)
    assert {v["dependency"] for v in arrays.values()} == {f"afterok:{j}" for j in stages}
    assert all(v["kill_on_invalid_dep"] == "yes" for v in arrays.values())  # a failed stage cancels its cells
    ledger = fake.ledger()
    assert sorted(v["job_id"] for v in ledger["stages"].values()) == sorted(stages)
    cells = ledger["cells"]
    assert len(cells) == 12 and all(len(c["attempts"]) == 1 and c["attempts"][0]["launcher"] == "slurm"
                                    for c in cells.values())
    assert sorted(c["attempts"][0]["job_id"] for c in cells.values()) == sorted(
        f"{j}_{i}" for j in arrays for i in range(6))
    by_model = {m: {c["attempts"][0]["job_id"].split("_")[0] for c in cells.values() if c["model"] == m}
                for m in ("tiny_s", "tiny_m")}
    assert all(len(ids) == 1 for ids in by_model.values())  # a backbone's cells share one array
    assert "submitted 12 cells to SLURM" in out


# state sacct reports → what status makes of it, and whether a second sweep resubmits the cell
CASES = {
    "tiny_s": [("FAILED", "FAILED", True), ("TIMEOUT", "TIMEOUT", True), ("PREEMPTED", "PREEMPTED", True),
               ("CANCELLED", "CANCELLED", True), ("COMPLETED", "FAILED", True),  # ended without DONE
               ("COMPLETED+DONE", "DONE", False)],
    "tiny_m": [("RUNNING", "RUNNING", False), ("PENDING", "PENDING", False), ("REQUEUED", "PENDING", False),
               ("NODE_FAIL", "FAILED", True), ("OUT_OF_MEMORY", "FAILED", True),
               ("RUNNING+STALE", "STALE", True)],  # running, heartbeat an hour old: hung
}


# One test, not two: each submission is a CLI process that composes 12 cells (seconds).
def test_a_grid_goes_out_as_arrays_then_each_job_state_is_resubmitted_or_left_as_it_should_be(fake):
    from retrieval_scaling.tracking import CellRun

    check_grid_went_out_as_a_stages_job_per_backbone_then_one_array_after_each(fake, submit(fake))
    cells = fake.ledger()["cells"]
    expected, states, stale_job = {}, {}, None
    for model, cases in CASES.items():
        ids = sorted(c for c in cells if cells[c]["model"] == model)
        for cell, (word, state, again) in zip(ids, cases, strict=True):
            job = cells[cell]["attempts"][0]["job_id"]
            states[job] = word.split("+")[0]
            expected[cell] = (state, again)
            if word.endswith("+DONE"):
                (fake.root / "fk" / "cells" / cell).mkdir(parents=True)
                (fake.root / "fk" / "cells" / cell / "DONE").write_text(json.dumps({"metrics": {}}))
            if word.endswith("+STALE"):
                run = CellRun(f"sqlite:///{fake.root / 'mlflow.db'}", "fk", fake.root / "mlartifacts", cell,
                              {"model": model}, {})
                run.log_metrics({"heartbeat": time.time() - 3600}, step=0)
                stale_job = job
    fake.set_states(states)

    status = run_cli("status", "sweep=fk", "format=json", env_extra=fake.env)
    assert status.returncode == 0, status.stderr[-2000:]
    assert {r["cell_id"]: r["state"] for r in json.loads(status.stdout)} == {c: s for c, (s, _) in expected.items()}

    submit(fake)
    cells = fake.ledger()["cells"]
    resubmitted = {c for c, entry in cells.items() if len(entry["attempts"]) == 2}
    assert resubmitted == {c for c, (_, again) in expected.items() if again}
    assert all(len(cells[c]["attempts"]) == 1 for c in set(cells) - resubmitted)
    assert fake.data()["cancelled"] == [stale_job]  # the hung job is ended before its cell runs again
    new_tasks = sum(v["tasks"] or 0 for j, v in fake.data()["jobs"].items() if int(j) >= 1004)
    assert new_tasks == len(resubmitted)
