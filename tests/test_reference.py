"""The reference (every test's oracle) follows the contract where the kernels do: d = 0
and NaN keys."""
import warnings

import numpy as np

import routing_attention as ra
from routing_attention import reference as ref


def test_d_zero_gives_the_mean_of_the_visible_values():
    q, k = np.zeros((2, 3, 0)), np.zeros((2, 4, 0))
    v = np.arange(16.0).reshape(2, 4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # and no divide-by-zero warnings
        got = ref.attention(q, k, v)
        causal = ref.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(got, np.broadcast_to(v.mean(axis=1, keepdims=True), got.shape))
    np.testing.assert_array_equal(got, ra.attention(q, k, v))
    np.testing.assert_array_equal(causal, ra.attention(q, k, v, causal=True))


def test_nan_key_gives_nan_to_the_queries_that_see_it():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((6, 3)) for _ in range(3))
    k[2, 1] = np.nan
    q_idx = np.array([[0, 1, 2], [3, 4, 5]])
    k_idx = np.array([[0, 1, 2], [3, 4, 5]])
    with np.errstate(invalid="ignore"):
        for causal in (False, True):
            want = ref.attention(q, k, v, causal=causal)
            got = ra.attention(q, k, v, causal=causal)
            np.testing.assert_array_equal(np.isnan(want), np.isnan(got))
            assert np.isnan(want[2:]).all() and (causal is False or np.isfinite(want[:2]).all())
            np.testing.assert_allclose(want[~np.isnan(want)], got[~np.isnan(got)], rtol=1e-12)
            want = ref.routing_attention(q, k, v, q_idx, k_idx, causal=causal)
            got = ra.routing_attention(q, k, v, q_idx, k_idx, causal=causal)
            np.testing.assert_array_equal(np.isnan(want), np.isnan(got))
            assert np.isfinite(want[3:]).all(), "the other cluster is untouched"
