"""The dry run's report: each cell's plan, the study's GPU- and CPU-hours, and each cell's GPU memory."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def print_plan(cfgs: Sequence[Mapping[str, Any]], plans: Sequence[Mapping[str, Any]],
               states: Mapping[str, Mapping[str, Any]], plan_file: Path, totals: Mapping[str, float]) -> None:
    """The dry run's table and the study's GPU-hours."""
    from .status import RESUBMIT, print_table

    first, sweep = cfgs[0], cfgs[0]["sweep"]
    todo = [p for p in plans if states[p["cell_id"]]["state"] in RESUBMIT]
    rows = [{**p, "batch": p["queries_per_step"], "group": p["passages_per_query"],
             "lengths": f"{p['query_len']}/{p['passage_len']}", "params": p["params_total"],
             "trainable": p["params_trainable"], "flops/step": p["flops_per_step"],
             "gpus": f"{p['gpus']}/{p['nodes']}n", "train_gpu_h": f"{p['gpu_hours']:.4g}",
             "mntp_gpu_h": f"{p['mntp_gpu_hours']:.4g}", "eval_gpu_h": f"{p['eval_gpu_hours']:.4g}"
             + ("*" if p["eval_unpriced"] else ""), "disk_gb": f"{cell_disk_peak(p['disk_gb']):.3g}",
             "state": states[p["cell_id"]]["state"],
             "action": "submit" if states[p["cell_id"]]["state"] in RESUBMIT else "skip"} for p in plans]
    print_table(rows, title=f"plan of sweep '{sweep['name']}' ({len(plans)} cells, {len(todo)} to submit, "
                            f"{totals['total_gpu_hours']:.4g} GPU-hours on {first['planner']['accelerator']} "
                            f"at {first['planner']['utilization']:.0%} of peak)",
                columns=("cell_id", "model", "paradigm", "loss", "teacher", "batch", "group", "lengths", "params",
                         "trainable", "flops/step", "steps", "tokens", "flops_total", "gpus", "train_gpu_h",
                         "mntp_gpu_h", "eval_gpu_h", "disk_gb", "state", "action"))
    unpriced = sorted({c for p in plans for c in p["eval_unpriced"]})
    print("GPU-hours of the study (shared stages and step-0 evaluations counted once): "
          f"MNTP {totals['mntp_gpu_hours']:.4g}, teacher scoring {totals['teacher_gpu_hours']:.4g}, training "
          f"{totals['train_gpu_hours']:.4g}, evaluation {totals['eval_gpu_hours']:.4g}, total "
          f"{totals['total_gpu_hours']:.4g}"
          + (f"; * not priced (no declared or readable size): {', '.join(unpriced)}" if unpriced else ""))
    unpriced_data = sorted({c["data"]["name"] for c, p in zip(cfgs, plans, strict=True) if p["data_unpriced"]})
    print(f"CPU-hours of the training data (stages job; once per corpus and per training set and teacher): BM25 "
          f"index {totals['bm25_index_cpu_hours']:.3g}, hard-negative mining {totals['mining_cpu_hours']:.3g}"
          + (f"; not priced (no declared or readable size): {', '.join(unpriced_data)}" if unpriced_data else ""))
    print(f"disk of the study: {totals['disk_kept_gb']:.4g} GB kept once every cell is done (final weights, run "
          f"files, last checkpoints); {totals['disk_peak_gb']:.4g} GB if every evaluation's encodings existed at "
          "once (disk_gb: a cell's peak: two checkpoint tags, its final store and the step-0 store it may build)")
    taught = Counter(p["teacher"] for p in plans if p["teacher"] != "none")
    if taught:
        print("teacher of the KD and CL+KD cells: " + ", ".join(f"teacher={t} ({n} of {len(plans)} cells)"
                                                               for t, n in sorted(taught.items())))
    print_memory(plans, first["planner"])
    print(f"plan written to {plan_file} (dry run: nothing submitted)")


def cell_disk_peak(disk: Mapping[str, float]) -> float:
    """A cell's disk at its largest, GB: while its final evaluation runs, or while it builds its step 0."""
    kept = disk["final"] + disk["runs"] + disk["checkpoint"]
    return max(kept + disk["eval_store"], disk["checkpoint"] + disk["step0_store"])


def print_memory(plans: Sequence[Mapping[str, Any]], planner: Mapping[str, Any]) -> None:
    """Each cell's estimated peak per GPU by stage (retrieval_scaling/memory.py), and the GPU's memory."""
    from .status import print_table

    overhead, limit = float(planner.get("memory_overhead_gb") or 0), planner.get("gpu_memory_gb")
    rows = [{"cell_id": p["cell_id"], "model": p["model"], "paradigm": p["paradigm"], "loss": p["loss"],
             "gpus": p["gpus"], **{stage: f"{p['memory_gb'][stage]['total']:.1f}" if stage in p["memory_gb"] else "-"
                                   for stage in ("train", "mntp", "eval")},
             "peak+overhead": f"{p['gpu_memory_gb']:.1f}",
             "fits": "-" if not limit else "yes" if p["gpu_memory_gb"] <= float(limit) else "NO"} for p in plans]
    print_table(rows, title=f"GPU memory per GPU, GB (estimated peak of each stage + {overhead:g} GB overhead) on "
                            f"{planner['accelerator']}" + (f" ({float(limit):g} GB)" if limit else " (not checked)"),
                columns=("cell_id", "model", "paradigm", "loss", "gpus", "train", "mntp", "eval", "peak+overhead",
                         "fits"))
