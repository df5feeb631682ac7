"""Scaling-law fits on synthetic points drawn from a known law."""

import numpy as np
import pytest

from retrieval_scaling.scaling import fit_scaling_law


def synthetic(sizes, seeds, alpha, A, E, noise, rng):
    x = np.repeat(np.asarray(sizes, dtype=float), seeds)
    e = (E + A * x ** (-alpha)) * np.exp(rng.normal(0, noise, len(x)))
    return x, e


def test_a_known_saturating_law_is_recovered_within_its_interval():
    rng = np.random.default_rng(1)
    x, e = synthetic([1e8, 3e8, 1e9, 3e9, 8e9], seeds=4, alpha=0.3, A=80.0, E=0.35, noise=0.01, rng=rng)
    fit = fit_scaling_law(x, e, bootstrap=300)
    assert fit.saturating and fit.n_sizes == 5 and fit.n_points == 20
    lo, hi = fit.alpha_ci
    assert lo <= 0.3 <= hi and hi - lo < 0.25
    assert fit.alpha == pytest.approx(0.3, abs=0.08)
    assert fit.E == pytest.approx(0.35, abs=0.05)
    assert np.allclose(fit.predict(x), e, rtol=0.05)


def test_a_pure_power_law_from_three_sizes_says_it_cannot_fit_a_floor():
    rng = np.random.default_rng(2)
    x, e = synthetic([1e9, 3e9, 8e9], seeds=3, alpha=0.2, A=50.0, E=0.0, noise=0.01, rng=rng)
    fit = fit_scaling_law(x, e, bootstrap=300)
    assert not fit.saturating and fit.E == 0.0
    assert any("cannot pin down a saturating law" in n for n in fit.notes)
    lo, hi = fit.alpha_ci
    assert lo <= 0.2 <= hi
    assert fit.alpha == pytest.approx(0.2, abs=0.03)


def test_a_flat_line_has_an_interval_around_zero_and_says_so():
    rng = np.random.default_rng(3)
    x = np.repeat([1e9, 3e9, 8e9], 4).astype(float)
    e = 0.5 * np.exp(rng.normal(0, 0.02, len(x)))
    fit = fit_scaling_law(x, e, bootstrap=300)
    lo, hi = fit.alpha_ci
    assert lo <= 0 <= hi and abs(fit.alpha) < 0.05
    assert any("includes 0" in n for n in fit.notes)


def test_one_point_per_size_is_flagged_and_bad_input_refused():
    fit = fit_scaling_law([1e9, 3e9, 8e9], [0.6, 0.5, 0.45], bootstrap=200)
    assert any("one point per size" in n for n in fit.notes)
    with pytest.raises(ValueError, match="two distinct sizes"):
        fit_scaling_law([1e9, 1e9], [0.5, 0.4])
    with pytest.raises(ValueError, match="positive"):
        fit_scaling_law([1e9, 2e9], [0.5, 0.0])
