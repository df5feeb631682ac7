"""The curves verb on a real MLflow store: cell runs logged by the tracking code, metrics from a known law."""

import gzip
import json

import matplotlib.image
import numpy as np
import pytest

from retrieval_scaling.curves import main, write_curves
from retrieval_scaling.tracking import CellRun, close_run, open_parent_run
from retrieval_scaling.tracking_client import client

SIZES = {"m1": 1e8, "m2": 4e8, "m3": 1.6e9, "m4": 6.4e9}
ALPHA = {("sparse", "cl"): 0.25, ("dense", "cl"): 0.2, ("sparse", "kd"): 0.0, ("dense", "kd"): 0.0,
         ("sparse", "cl_kd"): 0.3, ("dense", "cl_kd"): 0.22}


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = open_parent_run(uri, "law", tmp_path / "art", {"grid.cells": 48}, [])
    rng = np.random.default_rng(0)
    for (paradigm, loss), alpha in ALPHA.items():
        for model, n in SIZES.items():
            for seed in (1, 2):
                odds = (0.3 + 20 * n ** (-alpha) if alpha else 0.55) * np.exp(rng.normal(0, 0.005))
                run = CellRun(uri, "law", tmp_path / "art", f"{model}-{paradigm}-{loss}-{seed}",
                              {"model": model, "paradigm": paradigm, "loss": loss},
                              {"params_non_embedding": str(n), "flops_total": "1e18", "seed": str(seed)})
                run.log_metrics({"scifact/ndcg_10": 0.0}, step=0)
                run.log_metrics({"scifact/ndcg_10": 1 / (1 + odds)}, step=100)
                run.finish("FINISHED")
    close_run(uri, parent)
    return uri, parent


def test_curves_fit_every_line_and_recover_the_exponents(store, tmp_path):
    uri, parent = store
    result = write_curves(uri, "law", "scifact/ndcg_10", tmp_path / "curves", bootstrap=200)
    assert len(result["points"]) == 48 and len(result["lines"]) == 6
    for (paradigm, loss, budget), entry in result["lines"].items():
        fit = entry["fit"]
        assert budget == 1e18 and fit.n_sizes == 4 and fit.n_points == 8 and fit.saturating
        lo, hi = fit.alpha_ci
        if ALPHA[paradigm, loss]:
            assert lo > 0 and lo <= ALPHA[paradigm, loss] <= hi, (paradigm, loss)
        else:
            assert lo <= 0 <= hi, (paradigm, loss)  # a flat line: the interval includes 0
        assert entry["residuals"]["rmse"] < 0.01 and entry["extrapolation"]["covered"] is not None
    fits = json.loads((tmp_path / "curves" / "fits.json").read_text())
    assert set(fits["lines"]) == {f"{p}/{lo}/1e+18" for p, lo in ALPHA}
    assert fits["law"] == "(1 - m)/m = E + A*N^-alpha" and fits["compute_optimal"] == {}
    summary = (tmp_path / "curves" / "summary.md").read_text()
    assert "sparse ahead in" in summary and "sparse: scales" in summary and "includes 0" in summary
    assert "## Extrapolation check" in summary and "isoFLOP" not in summary  # one budget: no isoFLOP table
    # one budget: the FLOPs panel has nothing to show and is left out (one panel, 7.5 in at 130 dpi)
    assert matplotlib.image.imread(tmp_path / "curves" / "scaling.png").shape[1] == int(7.5 * 130)


def test_the_verb_logs_the_curves_to_the_parent_run(store, tmp_path, capsys):
    uri, parent = store
    assert main(["sweep=law", f"uri={uri}", f"root={tmp_path}", "bootstrap=50"]) == 0
    assert "logged to parent run" in capsys.readouterr().out
    names = {a.path for a in client(uri).list_artifacts(parent, "curves")}
    assert names == {f"curves/{n}" for n in ("scaling.png", "points.csv", "fits.json", "summary.md")}
    children = client(uri).search_runs([client(uri).get_experiment_by_name("law").experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert len(children) == 48
    # elsewhere: the same files, and neither the sweep's directory nor its store written
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "law" / "curves").iterdir()}
    assert main(["sweep=law", f"uri={uri}", f"root={tmp_path}", "bootstrap=50", f"out={tmp_path / 'copy'}"]) == 0
    assert "the sweep and its tracking store untouched" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "copy").iterdir()} == {"scaling.png", "points.csv", "fits.json", "summary.md"}
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "law" / "curves").iterdir()} == before
    assert len(client(uri).list_artifacts(parent, "curves")) == 4


def test_no_finished_cells_is_a_clear_error(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["sweep=nothing", f"uri={uri}", f"root={tmp_path}"]) == 2
    assert "no FINISHED cell" in capsys.readouterr().err


def log_cell(uri, tmp_path, cell, model, n, budget, values, seed=1):
    """A finished dense-CL cell whose per-query nDCG are `values`, kept in its directory."""
    run = CellRun(uri, "iso", tmp_path / "art", cell, {"model": model, "paradigm": "dense", "loss": "cl"},
                  {"params_non_embedding": str(n), "flops_total": str(budget), "flops_budget": str(budget),
                   "seed": str(seed)})
    run.log_metrics({"scifact/ndcg_10": float(np.mean(values))}, step=10)
    run.finish("FINISHED")
    runs = tmp_path / "iso" / "cells" / cell / "runs"
    runs.mkdir(parents=True)
    per_query = {"collections": {"scifact": {"ndcg_10": {f"q{i}": float(v) for i, v in enumerate(values)}}},
                 "groups": {}}
    (runs / "per_query.json.gz").write_bytes(gzip.compress(json.dumps(per_query).encode()))


def test_budgets_as_an_axis_give_isoflop_curves_and_a_compute_optimal_size(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(4)
    difficulty = rng.normal(0, 0.1, 80)
    sizes = {"s": 1e6, "m": 4e6, "l": 1.6e7}
    # each budget peaks at a size that grows with it: 2e6, 4e6, 8e6
    peaks = {1e12: 2e6, 2e12: 4e6, 4e12: 8e6}
    for b, (budget, peak) in enumerate(peaks.items()):
        for m, (model, n) in enumerate(sizes.items()):
            mean = 0.3 + 0.02 * b - 0.05 * np.log(n / peak) ** 2
            log_cell(uri, tmp_path, f"{b}{m}000000", model, n, budget, mean + difficulty + rng.normal(0, 0.01, 80))
    result = write_curves(uri, "iso", "scifact/ndcg_10", tmp_path / "out", bootstrap=200, root=tmp_path)
    assert len(result["lines"]) == 3 and all(e["resampled"] == "queries" for e in result["lines"].values())
    optima = result["optima"]["dense", "cl"]
    assert [r["budget"] for r in optima] == list(peaks)
    for r, peak in zip(optima, peaks.values(), strict=True):
        assert r["low"] <= peak <= r["high"] and r["size"] == pytest.approx(peak, rel=0.15)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Compute-optimal size per budget (isoFLOP)" in summary and "| dense | cl | 2e+12 FLOPs |" in summary
    assert matplotlib.image.imread(tmp_path / "out" / "scaling.png").shape[1] == 13 * 130  # both panels


def test_a_prediction_stored_before_training_is_judged_inside_or_outside(tmp_path):
    from retrieval_scaling.layout import write_json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    values = np.linspace(0.2, 0.4, 50)
    log_cell(uri, tmp_path, "0a000000", "s", 1e6, 1e12, values - 0.1)
    log_cell(uri, tmp_path, "0b000000", "m", 4e6, 1e12, values)
    log_cell(uri, tmp_path, "0c000000", "l", 1.6e7, 1e12, values + 0.1)  # measured mean 0.4
    for cell, (low, high) in {"0c000000": (0.35, 0.45), "0b000000": (0.1, 0.2), "0d000000": (0.5, 0.6)}.items():
        write_json(tmp_path / "iso" / "predictions" / f"{cell}.json",
                   {"cell_id": cell, "model": "l", "line": "dense/cl/1e+12", "x": 1.6e7, "parent_run": "p1",
                    "predictions": {"scifact/ndcg_10": {"predicted": (low + high) / 2, "low": low, "high": high},
                                    "scifact/contrastive_entropy_k1000_seed0": {"why": "no law"}}})
    result = write_curves(uri, "iso", "scifact/ndcg_10", tmp_path / "out", bootstrap=100, root=tmp_path)
    verdicts = {p["cell_id"]: p["verdict"] for p in result["predictions"]}
    assert verdicts == {"0c000000": "inside", "0b000000": "**outside**", "0d000000": "pending (not finished)"}
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| 0c000000 | l | dense/cl/1e+12 | 0.4000 | [0.3500, 0.4500] | 0.4000 | inside |" in summary


def test_a_new_size_is_predicted_before_it_trains_stored_once_and_judged_after(tmp_path):
    from retrieval_scaling.predictions import predict_before_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = open_parent_run(uri, "iso", tmp_path / "art", {"grid.cells": 3}, [])
    difficulty = np.random.default_rng(9).normal(0, 0.1, 60)
    difficulty -= difficulty.mean()  # the cells' means are exactly the law's
    law = {1e6: 0.30, 4e6: 0.40}  # odds 7/3 then 3/2: α = log(14/9)/log(4); at 1.6e7 odds 27/28, nDCG ≈ 0.509
    for i, (n, mean) in enumerate(law.items()):
        log_cell(uri, tmp_path, f"0{i}000000", f"m{i}", n, 1e12, mean + difficulty)
    cfg = {"eval": {"contrastive_entropy": {"negatives": 1000, "seed": 0},
                    "collections": {"scifact": {"name": "scifact", "measures": {"ndcg_10": "nDCG@10"}}}}}

    def plan(cell, n):
        return {"cell_id": cell, "model": "m", "paradigm": "dense", "loss": "cl", "flops_budget": 1e12,
                "params_non_embedding": n}

    todo = [(cfg, plan("0c000000", 1.6e7)), (cfg, plan("0d000000", 4e6))]  # a new size; a size the line has
    made = predict_before_training(uri, tmp_path, "iso", todo, parent)
    assert [r["cell_id"] for r in made] == ["0c000000"]
    ndcg = made[0]["predictions"]["scifact/ndcg_10"]
    assert ndcg["predicted"] == pytest.approx(1 / (1 + 27 / 28), abs=1e-3)
    assert ndcg["low"] < ndcg["predicted"] < ndcg["high"] and ndcg["interval_from"] == "queries"
    assert "a law needs 2" in made[0]["predictions"]["scifact/contrastive_entropy_k1000_seed0"]["why"]
    stored = tmp_path / "iso" / "predictions" / "0c000000.json"
    assert json.loads(stored.read_text())["parent_run"] == parent
    assert {a.path for a in client(uri).list_artifacts(parent, "predictions")} == {"predictions/0c000000.json"}
    before = stored.read_bytes()
    assert predict_before_training(uri, tmp_path, "iso", todo, parent) == []  # written once, never again
    assert stored.read_bytes() == before
    log_cell(uri, tmp_path, "0c000000", "m", 1.6e7, 1e12, 0.509 + difficulty)
    judged = write_curves(uri, "iso", "scifact/ndcg_10", tmp_path / "out", bootstrap=100, root=tmp_path)["predictions"]
    assert [(p["cell_id"], p["verdict"]) for p in judged] == [("0c000000", "inside")]
