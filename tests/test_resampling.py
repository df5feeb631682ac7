"""Replicates, bounded predictions, the leave-largest-out check and compute-optimal sizes, on synthetic
laws whose truth is known."""

import functools
import math

import numpy as np
import pytest

from retrieval_scaling import resampling
from retrieval_scaling.resampling import (
    Cell,
    best_size,
    compute_optimal,
    fit_line,
    leave_largest_out,
    predict,
    replicates,
    residuals,
)
from retrieval_scaling.scaling import Target, target_for

NDCG = Target("scifact/ndcg_10", bounded=True)


synthetic_line = functools.partial(resampling.synthetic_line, target=NDCG, E=0.3, A=40.0, alpha=0.3)


def test_targets_map_metrics_to_errors_and_back():
    assert target_for("scifact/ndcg_10").bounded and target_for("beir13/mrr_10").bounded
    entropy = target_for("scifact/contrastive_entropy_k1000_seed0")
    assert not entropy.bounded and entropy.error(2.5) == 2.5
    # nDCG 0.2 misses with odds 0.8/0.2 = 4; odds 4 map back to 0.2
    assert NDCG.error(0.2) == pytest.approx(4.0) and NDCG.metric(4.0) == pytest.approx(0.2)


def test_replicates_are_paired_over_queries():
    base = np.array([0.1, 0.4, 0.7, 1.0])
    cells = [Cell(1e6, base.mean(), [base]), Cell(1e7, base.mean() + 0.1, [base + 0.1])]
    x, m, mode = replicates(cells, 50, seed=0)
    assert mode == "queries" and x.shape == m.shape == (50, 2)
    # the same queries drawn for both cells: every replicate keeps the 0.1 between them exactly
    assert np.allclose(m[:, 1] - m[:, 0], 0.1)
    assert m[:, 0].std() > 0.05  # while the level moves with the draw
    # a mean of 4 queries drawn from 0.1 + 0.3k: 0.1 + 0.075j
    steps = (m[:, 0] - 0.1) / 0.075
    assert np.allclose(steps, np.round(steps))


def test_seeds_of_a_size_are_resampled_too():
    q = np.array([0.5, 0.5])
    cells = [Cell(1e6, 0.2, [q * 0 + 0.2], "1"), Cell(1e6, 0.4, [q * 0 + 0.4], "2"), Cell(1e7, 0.6, [q + 0.1], "1")]
    _, m, mode = replicates(cells, 400, seed=1)
    assert mode == "queries and seeds"
    # size 1e6's two slots each hold seed 1 or seed 2: 0.2 or 0.4, both seen, never anything else
    assert set(np.round(m[:, :2].ravel(), 9)) == {0.2, 0.4}


def test_residuals_by_hand():
    fit, _ = fit_line([Cell(1e6, 0.5), Cell(1e7, 0.6)], NDCG, bootstrap=0)
    # two sizes, a pure power law through both odds (1 and 2/3): residuals 0
    assert fit.alpha == pytest.approx(math.log10(1.5), abs=1e-6)
    out = residuals(fit, [Cell(1e6, 0.5), Cell(1e7, 0.6), Cell(1e7, 0.7)], NDCG)
    assert [round(r["residual"], 6) for r in out["per_cell"]] == [0.0, 0.0, 0.1]
    assert out["rmse"] == pytest.approx(math.sqrt(0.01 / 3))


def test_bounded_predictions_stay_in_range_where_the_old_law_left_it():
    cells = [Cell(1e6, 0.05), Cell(3e6, 0.12), Cell(1e7, 0.25)]
    fit, _ = fit_line(cells, NDCG, bootstrap=200)
    for x in (1e3, 1e5, 1e6, 1e9, 1e12):
        p = predict(fit, NDCG, x, noise=np.array([-0.3, 0.3]))
        assert 0.0 <= p["low"] <= p["predicted"] <= p["high"] <= 1.0
    # what 1 − m = A·N^−α says of the same points at 1e3 parameters: a metric below 0
    slope, icpt = np.polyfit(np.log([1e6, 3e6, 1e7]), np.log([0.95, 0.88, 0.75]), 1)
    assert 1 - math.exp(icpt + slope * math.log(1e3)) < 0


def test_leave_largest_out_covers_the_truth_in_at_least_90_of_100_draws():
    rng = np.random.default_rng(0)
    results = [leave_largest_out(synthetic_line(rng, [1e6, 3e6, 1e7, 3e7]), NDCG, 100, seed) for seed in range(100)]
    coverage = np.mean([r["covered"] for r in results])
    print(f"leave-largest-out coverage over 100 synthetic draws: {coverage:.2f}")
    assert coverage >= 0.9
    assert all(0 <= r["low"] <= r["high"] <= 1 for r in results)
    assert np.median([abs(r["error"]) for r in results]) < 0.02


def test_leave_largest_out_needs_three_sizes_and_fits_a_loss_too():
    assert "needs 3" in leave_largest_out([Cell(1e6, 0.5), Cell(1e7, 0.6)], NDCG, 50)["why"]
    entropy = Target("c/contrastive_entropy_k100_seed0", bounded=False)
    rng = np.random.default_rng(5)
    out = leave_largest_out(synthetic_line(rng, [1e6, 3e6, 1e7], E=0.0, A=5.0, alpha=0.1, target=entropy), entropy, 100)
    assert out["low"] <= out["observed"] <= out["high"] and out["low"] >= 0


def test_compute_optimal_size_is_the_parabola_vertex_inside_the_sizes():
    sizes = np.exp([1.0, 2.0, 3.0])
    # metric = −(ln N − 2.2)²: the peak at N = e^2.2
    assert best_size(sizes, -(np.log(sizes) - 2.2) ** 2, True) == pytest.approx(math.exp(2.2))
    # a monotone metric has its best at the edge; a loss wants the lowest value
    assert best_size(sizes, np.array([0.1, 0.2, 0.3]), True) == pytest.approx(sizes[-1])
    assert best_size(sizes, np.array([0.1, 0.2, 0.3]), False) == pytest.approx(sizes[0])
    rng = np.random.default_rng(2)
    cells = [Cell(float(n), float(-(np.log(n) - 2.2) ** 2 + 0.5), [np.full(50, -(np.log(n) - 2.2) ** 2 + 0.5)
                                                                   + rng.normal(0, 0.01, 50)]) for n in sizes]
    out = compute_optimal(cells, NDCG, 200)
    assert out["low"] <= math.exp(2.2) <= out["high"] and not out["at_edge"]


def test_replicates_where_every_drawn_query_scored_zero_are_left_out_not_fitted():
    # a sparse tiny model: 2 of 40 queries score at all, so many replicates draw neither (infinite odds)
    def cell(n, value):
        per_query = np.zeros(40)
        per_query[[3, 17]] = value
        return Cell(n, float(per_query.mean()), [per_query])

    cells = [cell(1e5, 0.2), cell(3e5, 0.15), cell(8e5, 0.1)]
    out = leave_largest_out(cells, NDCG, 200)
    assert 0 <= out["low"] <= out["high"] <= 1 and isinstance(out["covered"], bool)
    fit, _ = fit_line(cells, NDCG, 200)
    assert np.all(np.isfinite(np.array(fit.samples))) and fit.alpha_ci is not None
