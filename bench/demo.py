"""End to end: the wall time of the tiny demo and where it goes, read from a finished sweep's own logs.

    python bench/demo.py [--sweep tiny] [--run] [--out bench/results/demo.json]

`--run` first runs the sweep (`python -m retrieval_scaling.sweep +grid=tiny`) in a fresh sweeps root,
so that every stage is built (what `make demo` does on a fresh clone, without creating the venv);
otherwise it reads `$RS_SWEEPS_DIR/<sweep>` as left by `make demo`. Breakdown: the shared stage jobs
(training data, tiny pretraining, MNTP: per size), and per cell setup + step-0 evaluation, training,
final evaluation; cells run `launcher.max_parallel` at a time, so the sums exceed the wall time.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml
from record import write_result  # bench/ is on sys.path when a script runs

from retrieval_scaling.precision import bf16_native

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (\S+): (.*)$")


def events(log: Path) -> list[tuple[float, str, str]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((t, m.group(2), m.group(3)))
    return out


def first(evs, pattern: str) -> float | None:
    return next((t for t, _, msg in evs if re.search(pattern, msg)), None)


def last(evs, pattern: str) -> float | None:
    return next((t for t, _, msg in reversed(evs) if re.search(pattern, msg)), None)


def stage_breakdown(sweep_dir: Path) -> dict:
    out = {}
    for log in sorted(sweep_dir.glob("stages/*/*_log.out")):
        evs = events(log)
        if not evs:
            continue
        model = log.parent.name
        pre, mntp = first(evs, r"^pretrain .*: building"), first(evs, r"^MNTP .*: building")
        end = evs[-1][0]
        out[model] = {"total_s": end - evs[0][0],
                      "prepare_s": (pre or mntp or end) - evs[0][0],
                      "pretrain_s": ((mntp or end) - pre) if pre else 0.0,
                      "mntp_s": (end - mntp) if mntp else 0.0}
    return out


def cell_breakdown(sweep_dir: Path) -> dict:
    out = {}
    for cell in sorted(sweep_dir.glob("cells/*")):
        logs = sorted(cell.glob("logs/*_log.out"))
        if not logs or not (cell / "DONE").is_file():
            continue
        evs = events(logs[-1])
        cfg = yaml.safe_load((cell / "config.yaml").read_text())
        names = [cfg[axis]["name"] for axis in ("model", "paradigm", "loss")]
        start, step0 = evs[0][0], first(evs, r"^step 0: ")
        train_end, final = last(evs, r"^step \d+/\d+ loss"), last(evs, r"^step \d+: \{")
        steps = next(re.match(r"step \d+/(\d+) loss", m).group(1) for _, _, m in evs if re.match(r"step \d+/", m))
        out[cell.name] = {"cell": "/".join(names), "steps": int(steps), "total_s": final - start,
                          "setup_and_step0_eval_s": step0 - start, "train_s": train_end - step0,
                          "final_eval_s": final - train_end}
    return out


def machine_speed() -> float:
    """One core's fp32 matmul FLOP/s now (`peak_matmul_flops`, one thread): this shared machine runs at
    different speeds from hour to hour (126-205 GFLOP/s measured within a day), and every figure of a
    demo with it, so a demo's wall time is comparable with another's only alongside this."""
    import torch
    from train_step import peak_matmul_flops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return peak_matmul_flops(torch.float32)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="tiny")
    parser.add_argument("--run", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo.json"))
    args = parser.parse_args()
    sweeps = Path(os.environ.get("RS_SWEEPS_DIR", ROOT / "sweeps"))
    wall, speed_before = None, None
    if args.run:
        speed_before = machine_speed()
        sweeps = Path(tempfile.mkdtemp(prefix="rs-bench-demo-"))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "retrieval_scaling.sweep", f"+grid={args.sweep}"], cwd=ROOT, check=True,
                       env={**os.environ, "RS_SWEEPS_DIR": str(sweeps), "MLFLOW_TRACKING_URI": ""})
        wall = time.perf_counter() - start
    sweep_dir = sweeps / args.sweep
    stages, cells = stage_breakdown(sweep_dir), cell_breakdown(sweep_dir)
    ledger = json.loads((sweep_dir / "ledger.json").read_text())
    submitted = min(a["submitted_at"] for c in ledger["cells"].values() for a in c["attempts"])
    done = max(json.loads((sweep_dir / "cells" / c / "DONE").read_text())["finished_at"] for c in cells)
    starts = [s for s in (events(log)[0][0] for log in sweep_dir.glob("stages/*/*_log.out") if events(log))]
    result = {
        "benchmark": "demo", "sweep": args.sweep, "cells_done": len(cells),
        "wall_s": wall, "first_job_to_last_done_s": done - min([submitted, *starts]),
        # the machine's speed before the run (--run) and now (read after `make demo`, this is its end)
        "fp32_matmul_flops_one_core_before": speed_before, "fp32_matmul_flops_one_core_now": machine_speed(),
        # whether this CPU has bf16 kernels, i.e. whether the demo's `auto` precision ran bf16 or fp32
        "bf16_native": bf16_native("cpu"),
        "stages": stages, "stages_total_s": sum(s["total_s"] for s in stages.values()),
        "cells": cells,
        "cells_sum": {k: sum(c[k] for c in cells.values())
                      for k in ("setup_and_step0_eval_s", "train_s", "final_eval_s", "total_s")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
