"""Paired bootstrap intervals and Pareto-front extraction against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from rpsft.stats import mean_interval, normal_interval, paired_delta, pareto_front


def test_identical_predictions_give_a_zero_width_interval():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 300).astype(float)
    r = paired_delta(a, a.copy())
    assert r == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "n": 300}


def test_large_bernoulli_sample_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    n = 4000
    a = (rng.random(n) < 0.3).astype(float)
    r = mean_interval(a, seed=3, n_resamples=4000)
    lo, hi = normal_interval(a.mean(), n)
    assert r["delta"] == pytest.approx(a.mean())
    assert r["lo"] == pytest.approx(lo, abs=0.003) and r["hi"] == pytest.approx(hi, abs=0.003)


def test_pairing_removes_the_shared_item_variance():
    # b = a except on 20 of 400 items: unpaired the difference of two ±2.4-point intervals would span ~±6 points;
    # paired it is the binomial interval of 20 flips alone
    rng = np.random.default_rng(2)
    a = (rng.random(400) < 0.5).astype(float)
    b = a.copy()
    flip = rng.choice(np.nonzero(a == 0)[0], 20, replace=False)
    b[flip] = 1.0
    r = paired_delta(b, a, seed=0)
    assert r["delta"] == pytest.approx(0.05)
    assert 0.02 < r["lo"] < 0.05 < r["hi"] < 0.08


def test_weighted_delta_is_the_per_token_mean():
    a, b, w = np.array([1.0, 3.0, 0.5]), np.array([0.0, 1.0, 0.5]), np.array([1.0, 3.0, 6.0])
    r = paired_delta(a, b, weights=w)
    assert r["delta"] == pytest.approx((1 * 1 + 2 * 3 + 0) / 10)
    assert r["lo"] <= r["delta"] <= r["hi"]


def test_paired_delta_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match="same items"):
        paired_delta([1, 0, 1], [1, 0])


def test_pareto_front_on_hand_made_points():
    # (ID gain, forgetting): maximise x, minimise y
    pts = [(0.0, 0.0),   # base: optimal (nothing forgets less)
           (0.2, 0.1),   # optimal
           (0.2, 0.15),  # dominated by (0.2, 0.1)
           (0.1, 0.12),  # dominated by (0.2, 0.1)
           (0.3, 0.3),   # optimal (highest gain)
           (0.25, 0.1),  # optimal, and it dominates (0.2, 0.1)
           (0.3, 0.3)]   # a duplicate of an optimal point is optimal too
    assert pareto_front(pts) == [0, 5, 4, 6]
    assert pareto_front([(0.1, float("nan")), (0.0, 0.0)]) == [1]
