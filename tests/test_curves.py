"""The curves verb on a real MLflow store: cell runs logged by the tracking code, metrics from a known law."""

import json

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
                error = (0.3 + 20 * n ** (-alpha) if alpha else 0.55) * np.exp(rng.normal(0, 0.005))
                run = CellRun(uri, "law", tmp_path / "art", f"{model}-{paradigm}-{loss}-{seed}",
                              {"model": model, "paradigm": paradigm, "loss": loss},
                              {"params_non_embedding": str(n), "flops_total": "1e18", "seed": str(seed)})
                run.log_metrics({"scifact/ndcg_10": 0.0}, step=0)
                run.log_metrics({"scifact/ndcg_10": 1 - error}, step=100)
                run.finish("FINISHED")
    close_run(uri, parent)
    return uri, parent


def test_curves_fit_every_line_and_recover_the_exponents(store, tmp_path):
    uri, parent = store
    result = write_curves(uri, "law", "scifact/ndcg_10", tmp_path / "curves", bootstrap=200)
    assert len(result["points"]) == 48 and len(result["lines"]) == 6
    for key, entry in result["lines"].items():
        fit = entry["fit"]
        assert fit.n_sizes == 4 and fit.n_points == 8 and fit.saturating
        lo, hi = fit.alpha_ci
        if ALPHA[key]:
            assert lo > 0, key
        else:
            assert lo <= 0 <= hi, key  # a flat line: the interval includes 0
    fits = json.loads((tmp_path / "curves" / "fits.json").read_text())
    assert set(fits["lines"]) == {f"{p}/{lo}" for p, lo in ALPHA}
    summary = (tmp_path / "curves" / "summary.md").read_text()
    assert "sparse ahead in" in summary and "sparse: scales" in summary and "includes 0" in summary
    png = (tmp_path / "curves" / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_the_verb_logs_the_curves_to_the_parent_run(store, tmp_path, capsys):
    uri, parent = store
    assert main(["sweep=law", f"uri={uri}", f"root={tmp_path}", "bootstrap=50"]) == 0
    assert "logged to parent run" in capsys.readouterr().out
    names = {a.path for a in client(uri).list_artifacts(parent, "curves")}
    assert names == {f"curves/{n}" for n in ("scaling.png", "points.csv", "fits.json", "summary.md")}
    children = client(uri).search_runs([client(uri).get_experiment_by_name("law").experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert len(children) == 48


def test_no_finished_cells_is_a_clear_error(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["sweep=nothing", f"uri={uri}", f"root={tmp_path}"]) == 2
    assert "no FINISHED cell" in capsys.readouterr().err
