"""Bootstrap CIs: deterministic with a seed, cover the mean, shrink with n, paired cancels shared noise."""

from __future__ import annotations

import numpy as np
import pytest

from selfalign.evaluation.stats import bootstrap_ci, paired_bootstrap


def test_bootstrap_ci_contains_mean_and_is_seeded():
    x = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    a = bootstrap_ci(x, iters=2000, seed=0)
    b = bootstrap_ci(x, iters=2000, seed=0)
    assert a == b
    assert a["n"] == 10 and a["value"] == pytest.approx(0.7)
    assert a["ci_low"] < 0.7 < a["ci_high"]
    # normal approximation of a proportion: sd = sqrt(.7*.3/10) = 0.145 -> 95% half-width ~0.28
    assert 0.2 < (a["ci_high"] - a["ci_low"]) / 2 < 0.36


def test_bootstrap_ci_narrows_with_more_items():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.integers(0, 2, 20), iters=1000, seed=0)
    large = bootstrap_ci(rng.integers(0, 2, 2000), iters=1000, seed=0)
    assert (large["ci_high"] - large["ci_low"]) < (small["ci_high"] - small["ci_low"]) / 5


def test_bootstrap_without_iterations_or_items():
    assert bootstrap_ci([0.5, 1.0], iters=0, seed=0) == {"value": 0.75, "n": 2, "ci_low": None, "ci_high": None}
    assert bootstrap_ci([], iters=10, seed=0)["n"] == 0


def test_paired_bootstrap_cancels_item_difficulty():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 1, 200)
    a = difficulty + 0.1          # variant a is uniformly 0.1 better on every item
    b = difficulty
    paired = paired_bootstrap(a, b, iters=1000, seed=0)
    assert paired["diff"] == pytest.approx(0.1)
    assert paired["ci_low"] == pytest.approx(0.1) and paired["ci_high"] == pytest.approx(0.1)
    assert paired["p_value"] == 0.0
    # unpaired intervals overlap heavily: the per-variant CIs alone could not show the difference
    ca, cb = bootstrap_ci(a, 1000, 0), bootstrap_ci(b, 1000, 0)
    assert ca["ci_low"] < cb["ci_high"]


def test_paired_bootstrap_no_difference_is_not_significant():
    x = [1, 0, 1, 0, 1, 1, 0, 0, 1, 0]
    y = [0, 1, 1, 0, 1, 0, 1, 0, 1, 0]
    r = paired_bootstrap(x, y, iters=2000, seed=0)
    assert r["diff"] == 0.0 and r["ci_low"] < 0 < r["ci_high"] and r["p_value"] > 0.5


def test_paired_bootstrap_needs_same_items():
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1], iters=10, seed=0)
