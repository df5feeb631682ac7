"""The real CLI in subprocesses: dry-run plan, bad input stopping before anything runs, and one
tiny cell end to end (slow) with a second sweep that runs nothing."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval_scaling.identity import cell_id
from retrieval_scaling.layout import PER_QUERY

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("[!_]*.yaml"))


def run_cli(verb, *args, env_extra=None, timeout=900):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", f"retrieval_scaling.{verb}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sweeps(tmp_path, data_root):
    return {"RS_SWEEPS_DIR": str(tmp_path / "sweeps"), "RS_DATA_DIR": str(data_root),
            "MLFLOW_TRACKING_URI": ""}


def test_dry_run_writes_an_18_cell_plan_within_budget(sweeps):
    proc = run_cli("sweep", "+grid=tiny", "sweep.dry_run=true", env_extra=sweeps)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((Path(sweeps["RS_SWEEPS_DIR"]) / "tiny" / "plan.json").read_text())
    assert len(plan) == 18 and len({c["cell_id"] for c in plan}) == 18
    assert {(c["model"], c["paradigm"], c["loss"]) for c in plan} == {
        (m, p, lo) for m in ("tiny_s", "tiny_m", "tiny_l") for p in ("sparse", "dense") for lo in ("cl", "kd", "cl_kd")}
    for cell in plan:
        assert set(cell) >= {"cell_id", "model", "paradigm", "loss", "params_total", "params_trainable",
                             "flops_per_step", "steps", "flops_total"}
        assert cell["flops_total"] <= cell["flops_budget"] < cell["flops_total"] + cell["flops_per_step"]
    assert not (Path(sweeps["RS_SWEEPS_DIR"]) / "mlflow.db").exists()  # nothing submitted, no store


def test_full_grid_dry_run_prices_mntp_training_and_evaluation_per_cell_and_in_total(sweeps):
    proc = run_cli("sweep", "+grid=full", "sweep.dry_run=true", env_extra=sweeps)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((Path(sweeps["RS_SWEEPS_DIR"]) / "full" / "plan.json").read_text())
    assert len(plan) == 18 and all(c["eval_unpriced"] == [] for c in plan)
    by = {(c["model"], c["paradigm"], c["loss"]): c for c in plan}
    for size in ("llama3_1b", "llama3_3b", "llama3_8b"):  # bigger backbones cost more to adapt and to evaluate
        assert by[(size, "sparse", "cl")]["eval_gpu_hours"] > by[(size, "dense", "cl")]["eval_gpu_hours"] > 0
    assert by[("llama3_1b", "dense", "cl")]["mntp_gpu_hours"] < by[("llama3_8b", "dense", "cl")]["mntp_gpu_hours"]
    assert by[("llama3_1b", "dense", "cl")]["eval_gpu_hours"] < by[("llama3_8b", "dense", "cl")]["eval_gpu_hours"]
    # Every shared cost once: 3 MNTPs, 6 step-0 evaluations, 18 final ones, 18 trainings.
    mntp = sum(by[(s, "dense", "cl")]["mntp_gpu_hours"] for s in ("llama3_1b", "llama3_3b", "llama3_8b"))
    evals = sum(c["eval_gpu_hours"] / 2 for c in plan) + sum(by[(s, p, "cl")]["eval_gpu_hours"] / 2
                                                             for s in ("llama3_1b", "llama3_3b", "llama3_8b")
                                                             for p in ("sparse", "dense"))
    train = sum(c["gpu_hours"] for c in plan)
    teacher = by[("llama3_1b", "dense", "kd")]["teacher_gpu_hours"]  # one training set, scored once
    assert teacher > 0 and all(c["teacher_gpu_hours"] == teacher for c in plan)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("GPU-hours of the study"))
    assert (f"MNTP {mntp:.4g}, teacher scoring {teacher:.4g}, training {train:.4g}, evaluation {evals:.4g}, "
            f"total {mntp + teacher + train + evals:.4g}") in line
    # the study distils from the cross-encoder, and says so; MS MARCO's BM25 index and mining are priced
    assert {c["loss"]: c["teacher"] for c in plan} == {"cl": "none", "kd": "cross_encoder", "cl_kd": "cross_encoder"}
    cpu = next(x for x in proc.stdout.splitlines() if x.startswith("CPU-hours of the training data"))
    assert re.search(r"BM25 index 0\.1\d+, hard-negative mining 0\.\d+", cpu), cpu
    assert "teacher of the KD and CL+KD cells: teacher=cross_encoder (12 of 18 cells)" in proc.stdout
    # nothing is prepared yet: the dry run lists each input with what reads it, and the command to fetch them
    for name, user in [("hub meta-llama/Meta-Llama-3-8B", "model llama3_8b"),
                       ("hub cross-encoder/ms-marco-MiniLM-L-6-v2", "teacher cross_encoder"),
                       ("ir_datasets msmarco-passage/train/judged", "data msmarco"),
                       ("ir_datasets beir/fiqa/test", "eval fiqa")]:
        assert re.search(rf"{re.escape(name)} +│ +{user} +│ missing", proc.stdout), name
    assert "21 input(s) not prepared: fetch them with `python -m retrieval_scaling.prepare +grid=full`" in proc.stdout
    # each cell's estimated GPU memory by stage, on the planner's 80 GB GPUs: every one fits
    rows = re.findall(r"│ ([0-9a-f]{8}) +│ (llama3_\w+) +│ (\w+) +│ (\w+) +│ +4 │ +([\d.]+) │ +([\d.]+) │ +([\d.]+) │ "
                      r"+([\d.]+) │ +(\w+) +│", proc.stdout)
    assert len(rows) == 18 and {r[-1] for r in rows} == {"yes"}
    for cell, *_, train_gb, mntp_gb, eval_gb, peak, _ in rows:
        planned = next(c for c in plan if c["cell_id"] == cell)
        assert float(peak) == pytest.approx(max(map(float, (train_gb, mntp_gb, eval_gb))) + 3.0, abs=0.11)
        assert planned["gpu_memory_gb"] == pytest.approx(float(peak), abs=0.06)
    assert by[("llama3_8b", "sparse", "cl")]["gpu_memory_gb"] > by[("llama3_1b", "sparse", "cl")]["gpu_memory_gb"]


@pytest.mark.parametrize("overrides, stage, limit, fix", [
    # before micro-batches: a rank's whole share of the 8B sparse CL step in one forward
    (["planner=a100_40gb", "train.micro_batch=null"], "train", 40,
     "lower train.micro_batch (now null: the whole share at once)"),
    (["planner=l4_24gb"], "train", 24, "lower train.micro_batch (now 64)"),
    (["planner=a100_40gb", "model.mntp.batch_size=256"], "mntp", 40,
     "lower model.mntp.batch_size, set model.mntp.gradient_checkpointing=true"),
])
def test_a_grid_whose_cells_do_not_fit_the_gpus_is_refused_in_one_line(sweeps, overrides, stage, limit, fix):
    proc = run_cli("sweep", "+grid=full", "sweep.dry_run=true", *overrides, env_extra=sweeps)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    needs = re.match(rf"error: cell [0-9a-f]{{8}} \(llama3_8b/\w+/\w+\) needs about ([\d.]+) GB per GPU in its "
                     rf"{stage} stage \(estimate with 3 GB overhead, 4 GPUs\) but planner.gpu_memory_gb={limit} ", line)
    assert needs and float(needs[1]) > limit and fix in line, line
    assert not (Path(sweeps["RS_SWEEPS_DIR"]) / "full").exists()  # refused before anything is written


def test_cells_that_differ_only_in_values_compose_as_hydra_composes_each(sweeps, compose):
    """The launcher builds the defaults tree once per set of group choices and applies value overrides
    to it; every cell must still be exactly what Hydra's compose gives for its overrides."""
    proc = run_cli("sweep", "+grid=tiny", "model=tiny_s,tiny_m", "loss=kd", "seed=1,2", "train.lr=2e-3",
                   "sweep.name=vals", "sweep.dry_run=true", env_extra=sweeps)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((Path(sweeps["RS_SWEEPS_DIR"]) / "vals" / "plan.json").read_text())
    expected = {cell_id(compose("+grid=tiny", f"model={m}", f"paradigm={p}", "loss=kd", f"seed={s}", "train.lr=2e-3"))
                for m in ("tiny_s", "tiny_m") for p in ("sparse", "dense") for s in (1, 2)}
    assert len(plan) == 8 and {c["cell_id"] for c in plan} == expected
    assert cell_id(compose("+grid=tiny", "model=tiny_s", "paradigm=dense", "loss=kd", "seed=1")) not in expected


@pytest.mark.parametrize("override,message", [
    ("model=tiny_xl", f"options in 'model': {' '.join(MODELS)} ("),
    ("sweep.name=tiny✓", "cannot read the override 'sweep.name=tiny✓': an unquoted value may hold"),
    ("sweep.name=" + "a" * 250, "… (250 characters)' is not a usable name: it names a directory under the sweeps root, "
                                "so use 1 to 128 letters"),
    ("loss=foo", "loss/foo"),
    ("budget.flops=1e6", "smaller than one optimizer step"),
    ("train.bf16=maybe", "train.bf16='maybe': use auto"),
    ("eval.dtype=float8", "eval.dtype='float8': use auto, bfloat16 or float32"),
    ("eval.store_dtype=bfloat16", "eval.store_dtype='bfloat16': expected one of float16, float32"),
    ("eval.search=gpu", "eval.search='gpu': expected one of auto, host, torch"),
])
def test_bad_input_stops_before_anything_runs(sweeps, override, message):
    proc = run_cli("sweep", "+grid=tiny", override, env_extra=sweeps)
    assert proc.returncode == 2 and proc.stdout.strip() == "" and len(proc.stderr.strip().splitlines()) == 1
    assert message in proc.stderr
    root = Path(sweeps["RS_SWEEPS_DIR"])
    assert not (root / "mlflow.db").exists() and not (root / "tiny" / "cells").exists()


def test_broken_corpus_line_stops_the_sweep_naming_file_and_line(sweeps, data_root, tmp_path):
    broken = tmp_path / "data"
    for name in ("scifact",):
        (broken / name / "qrels").mkdir(parents=True)
        for f in ("queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
            (broken / name / f).write_text((data_root / name / f).read_text())
        lines = (data_root / name / "corpus.jsonl").read_text().splitlines()
        lines[41] = lines[41][:30]
        (broken / name / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli("sweep", "+grid=tiny", env_extra={**sweeps, "RS_DATA_DIR": str(broken)})
    assert proc.returncode == 2
    assert "corpus.jsonl:42: broken JSON line" in proc.stderr
    assert not (Path(sweeps["RS_SWEEPS_DIR"]) / "tiny" / "cells").exists()


# Evaluated on a declared subset of SciFact test (30 queries over ~330 documents): the full corpus is the
# demo's and the baselines' tests'; here it would be most of the test's time.
SUBSET, EVALUATED = "eval.subset={queries:30,bm25_depth:10,seed:0}", "scifact:q30-bm25_10"


@pytest.mark.slow
def test_one_tiny_cell_end_to_end_then_skipped(sweeps):
    from mlflow.tracking import MlflowClient

    from retrieval_scaling.precision import bf16_native

    args = ["model=tiny_s", "paradigm=sparse", "loss=cl_kd", "sweep.name=e2e", "budget.flops=1.5e11",
            "model.pretrain.steps=30", "model.mntp.steps=20", "log.every=5", "log.system_metrics_s=1", SUBSET]
    proc = run_cli("sweep", *args, env_extra=sweeps)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = Path(sweeps["RS_SWEEPS_DIR"])
    plan = json.loads((root / "e2e" / "plan.json").read_text())[0]
    done = json.loads((root / "e2e" / "cells" / plan["cell_id"] / "DONE").read_text())
    assert done["metrics"][f"{EVALUATED}/ndcg_10"] >= 0

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id], "tags.run_kind = 'cell'")
    (parent,) = client.search_runs([exp.experiment_id], "tags.run_kind = 'sweep'")
    assert run.info.status == parent.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["grid.model"] == "tiny_s" and parent.data.params["grid.cells"] == "1"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["plan.json"]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml", "runs"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "runs")] == [
        "runs/per_query.json.gz", f"runs/{EVALUATED}.trec.gz"]  # every judged query's measures, and the run
    # a sparse cell's step 0 keeps 256 terms a vector, under its own names; the trained cell's are whole
    entropy = [m for name in (f"{EVALUATED}:top256/", f"{EVALUATED}/")
               for m in client.get_metric_history(run.info.run_id, f"{name}contrastive_entropy_k1000_seed0")]
    assert [m.step for m in entropy] == [0, plan["steps"]] and all(m.value > 0 for m in entropy)
    assert "Sweep `e2e`" in parent.data.tags["mlflow.note.content"]  # what the sweep is, in the MLflow UI
    assert run.data.tags["git_commit"] and "slurm_job_id" in run.data.tags
    assert {k: run.data.tags[k] for k in ("model", "paradigm", "loss", "teacher", "cell_id", "sweep")} == {
        "model": "tiny_s", "paradigm": "sparse", "loss": "cl_kd", "teacher": "bm25", "cell_id": plan["cell_id"],
        "sweep": "e2e"}
    # the stages job prepared the training tokens once; the cell memory-mapped them and built nothing
    assert len(list((root / ".cache" / "tokens").glob("*/.complete"))) == 1
    cell_log = "".join(p.read_text() for p in (root / "e2e" / "cells" / plan["cell_id"] / "logs").glob("*_log.*"))
    assert re.search(r"training tokens of \S+: reusing cached", cell_log), cell_log[-3000:]
    ndcg = client.get_metric_history(run.info.run_id, f"{EVALUATED}/ndcg_10")
    assert [m.step for m in ndcg] == [plan["steps"]]
    assert [m.step for m in client.get_metric_history(run.info.run_id, f"{EVALUATED}:top256/ndcg_10")] == [0]
    assert run.data.metrics[f"{EVALUATED}:top256/doc_nnz"] <= 256
    spent = client.get_metric_history(run.info.run_id, "flops_spent")
    assert max(m.value for m in spent) == plan["flops_total"]
    assert {f"{EVALUATED}/doc_nnz", f"{EVALUATED}/query_nnz", "train/ce", "train/kl", "train/flops_d"} <= set(
        run.data.metrics)
    # the precision this machine computes in, resolved from the configs' `auto`
    assert run.data.tags["precision.train"] == ("bf16" if bf16_native("cpu") else "fp32")
    assert run.data.tags["precision.eval"] == ("bfloat16" if bf16_native("cpu") else "float32")
    assert run.data.params["model.arch.hidden_size"] == "64"
    assert not any(k.startswith(("tracking.", "hydra.")) for k in run.data.params)  # no URIs (credentials)
    system = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(system) >= 2 and all(0 <= m.value <= 100 for m in system)  # sampled each second
    assert "system/system_memory_usage_megabytes" in run.data.metrics

    status = run_cli("status", "sweep=e2e", "format=json", env_extra=sweeps)
    (row,) = json.loads(status.stdout)
    assert row["state"] == "DONE" and row["flops_spent"] == row["flops_total"] == plan["flops_total"]
    assert row["flops_budget"] == 1.5e11
    assert row["metrics"][f"{EVALUATED}/ndcg_10"] == done["metrics"][f"{EVALUATED}/ndcg_10"]

    again = run_cli("sweep", *args, env_extra=sweeps)
    assert again.returncode == 0
    assert "nothing to submit" in again.stdout and "1 cells: 0 to submit" in again.stdout
    assert len(client.search_runs([exp.experiment_id])) == 2  # the sweep's parent run and the cell's

    # The evaluate verb rebuilds the cell from its config and final weights: the same encoder, so the
    # same scores up to CPU kernel noise, which is not bitwise reproducible across processes (see
    # docs/evaluation.md). The noise may swap two nearly tied documents of this barely trained model, so
    # a query's measure may move; every other query's must be the cell's exactly.
    verb_runs = root.parent / "verb-runs"
    ev = run_cli("evaluate", f"cell={plan['cell_id']}", "sweep.name=e2e", SUBSET, f"runs_dir={verb_runs}",
                 env_extra=sweeps)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    scores = json.loads(ev.stdout.strip().splitlines()[-1])
    cell_queries, verb_queries = (
        json.loads(gzip.decompress(path.read_bytes()))["collections"][EVALUATED]
        for path in (root / "e2e" / "cells" / plan["cell_id"] / "runs" / PER_QUERY, verb_runs / PER_QUERY))
    for measure in ("ndcg_10", "mrr_10", "recall_100"):
        assert verb_queries[measure].keys() == cell_queries[measure].keys()
        moved = [q for q, value in verb_queries[measure].items() if value != cell_queries[measure][q]]
        assert len(moved) <= 2, (measure, moved)
        assert scores[measure] == pytest.approx(sum(verb_queries[measure].values()) / len(verb_queries[measure]))
    assert scores["contrastive_entropy_k1000_seed0"] == pytest.approx(
        done["metrics"][f"{EVALUATED}/contrastive_entropy_k1000_seed0"], rel=1e-3)
    assert scores["doc_nnz"] == pytest.approx(done["metrics"][f"{EVALUATED}/doc_nnz"], rel=1e-4)


def test_ctrl_c_ends_a_verb_with_one_line_and_the_shells_status():
    """SIGINT (Ctrl-C) during a verb: no traceback, one line saying what is kept, exit 130."""
    import signal
    import time

    code = "from retrieval_scaling.cli import run_verb; import time, sys; print('ready', flush=True); " \
           "sys.exit(run_verb(lambda: time.sleep(60)))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["interrupted (Ctrl-C): finished work is kept; run the same command again "
                                        "to go on"]


def test_help_lists_the_options_a_user_picks_from_not_the_bases_they_build_on(sweeps):
    proc = run_cli("sweep", "--help", env_extra=sweeps)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"\nmodel: {', '.join(MODELS)}\n" in proc.stdout
    assert "\neval: beir13, beir_dir, dl19, dl20, msmarco_dev, paper, scifact, trec\n" in proc.stdout
    assert "_tiny_family" not in proc.stdout and "_base" not in proc.stdout
    assert "\n== Config ==\n" in proc.stdout and "\nmodel:\n  source: pretrain" in proc.stdout
