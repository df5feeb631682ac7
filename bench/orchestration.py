"""Orchestration timings: dry runs of the full grid (18 cells) and of 1,008 cells, `status` on an
18-cell sweep, and (with --slurm, the dev cluster up) submitting a sweep to SLURM.

    python bench/orchestration.py [--status-sweep tiny] [--slurm] [--out bench/results/orchestration.json]

Each is a fresh `python -m retrieval_scaling.<verb>` process, wall time best of `--repeats`
(interpreter and imports included: what a user waits for). `status` reads `$RS_SWEEPS_DIR/<sweep>`
(`make demo` leaves an 18-cell `tiny`). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import write_result  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], env: dict, repeats: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status-sweep", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slurm", action="store_true", help="also time a 4-cell submission to the dev cluster")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "orchestration.json"))
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="rs-bench-"))
    dry_env = {**os.environ, "RS_SWEEPS_DIR": str(scratch / "dry"), "MLFLOW_TRACKING_URI": ""}
    result: dict = {"benchmark": "orchestration"}
    result["dry_run_full_18_s"], _ = timed(["retrieval_scaling.sweep", "+grid=full", "sweep.dry_run=true"],
                                           dry_env, args.repeats)
    t, _ = timed(["retrieval_scaling.sweep", "+grid=full", "seed=range(0,56)", "sweep.name=full1008",
                  "sweep.dry_run=true"], dry_env, 1)
    plan = json.loads((scratch / "dry" / "full1008" / "plan.json").read_text())
    result["dry_run_1008_s"], result["dry_run_1008_cells"] = t, len({p["cell_id"] for p in plan})

    sweeps = Path(os.environ.get("RS_SWEEPS_DIR", ROOT / "sweeps"))
    if (sweeps / args.status_sweep / "plan.json").is_file():
        env = {**os.environ, "RS_SWEEPS_DIR": str(sweeps)}
        t, out = timed(["retrieval_scaling.status", f"sweep={args.status_sweep}", "format=json"], env, args.repeats)
        rows = json.loads(out)
        result.update(status_s=t, status_cells=len(rows),
                      status_states=sorted({r["state"] for r in rows}))
    else:
        result["status_s"] = None  # no sweep to read: run `make demo` first

    if args.slurm:
        env = {**os.environ, "RS_SWEEPS_DIR": str(scratch / "slurm"), "MLFLOW_TRACKING_URI": "",
               "SLURM_CONF": os.environ.get("SLURM_CONF", "/tmp/rs-slurm/etc/slurm.conf")}
        env["RS_DATA_DIR"] = os.environ.get("RS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
        t, out = timed(["retrieval_scaling.sweep", "-m", "paradigm=sparse,dense", "loss=cl,kd", "model=tiny_s",
                        "launcher=dev_cluster", "budget.flops=3e11", "sweep.name=bench"], env, 1)
        result["slurm_submit_4_cells_s"] = t  # returns once the jobs are queued (stages job + cell array)
        ledger = json.loads((scratch / "slurm" / "bench" / "ledger.json").read_text())
        cell_jobs = [a["job_id"] for c in ledger["cells"].values() for a in c["attempts"]]
        stage_jobs = [s["job_id"] for s in ledger.get("stages", {}).values()]
        jobs = sorted({j.split("_")[0] for j in [*cell_jobs, *stage_jobs]})
        subprocess.run(["scancel", *jobs], env=env, check=False)  # the benchmark measures submission only
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
