"""Self-tests of tests/stats.py (fixed seeds, deterministic)."""
import numpy as np
import pytest

import stats

EXACT = np.array([0.5, -0.2, 0.0, 1.3])


def _draws(n, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return scale * EXACT + rng.normal(0.0, 1.0, (n, EXACT.size)) * np.array([1.0, 0.5, 2.0, 1.5])


def test_unbiased_sample_passes_and_is_powerful():
    draws = stats.batch_means(_draws(30_000), num_batches=30)
    assert draws.shape == (30, 4)
    res = stats.check_unbiased(draws, EXACT)
    assert res.max_abs_z < 5 and res.power >= 8.1
    stats.assert_powerful(res)
    # batch-means SE ~ plain SE for i.i.d. draws
    plain = stats.check_unbiased(_draws(30_000), EXACT)
    np.testing.assert_allclose(res.se, plain.se, rtol=0.4)


def test_ten_percent_scaling_bias_fails():
    draws = stats.batch_means(_draws(30_000, scale=1.1), num_batches=30)
    with pytest.raises(AssertionError, match="biased"):
        stats.check_unbiased(draws, EXACT)


def test_underpowered_check_is_flagged():
    res = stats.check_unbiased(_draws(300, scale=1.1), EXACT)  # too few draws to see 10%
    with pytest.raises(AssertionError, match="too little power"):
        stats.assert_powerful(res)


def test_zero_variance_coordinates():
    d = np.zeros((40, 2))
    d[:, 1] = np.random.default_rng(1).normal(0.3, 0.1, 40)
    stats.check_unbiased(d, [0.0, 0.3])
    with pytest.raises(AssertionError):
        stats.check_unbiased(d, [1e-3, 0.3])


def test_flatten_grads_names():
    v, names = stats.flatten_grads({"b": np.ones((2, 2)), "a": 3.0})
    assert names == ["a", "b[0,0]", "b[0,1]", "b[1,0]", "b[1,1]"] and v[0] == 3.0
