"""Incremental decoding caches against the full causal forward of each method."""
import numpy as np
import pytest

import routing_attention as ra
from routing_attention.decoding import CombinerCache, DenseCache, LocalCache, RoutingCache

from conftest import assert_close


def _tokens(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def _combiner_full(plan, block):
    def full(q, k, v):          # a block longer than the prefix means the whole prefix
        b = None if block is None else min(block, q.shape[-2])
        return ra.combiner_attention(q, k, v, plan=plan, block=b, causal=True)
    return full


METHODS = {
    "dense": (DenseCache, lambda q, k, v: ra.attention(q, k, v, causal=True)),
    "local": (lambda: LocalCache(4), lambda q, k, v: ra.local_attention(q, k, v, 4, causal=True)),
    "combiner-fixed": (lambda: CombinerCache("fixed", block=5), _combiner_full("fixed", 5)),
    "combiner-axial": (lambda: CombinerCache("axial", block=6), _combiner_full("axial", 6)),
    "combiner-logsparse": (lambda: CombinerCache("logsparse"), _combiner_full("logsparse", None)),
    "combiner-mixture": (lambda: CombinerCache("mixture", block=6), _combiner_full("mixture", 6)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_step_equals_the_full_causal_forward(method, dtype):
    make, full = METHODS[method]
    q, k, v = _tokens((2, 3, 41, 8), dtype)     # 41 > the initial capacity: the cache grows
    cache = make()
    rows = cache.prefill(q, k, v)
    assert rows.dtype == dtype and rows.shape == q.shape
    for t in range(41):
        expected = full(q[..., :t + 1, :], k[..., :t + 1, :], v[..., :t + 1, :])[..., t, :]
        assert_close(rows[..., t, :], expected, dtype, f"{method} step {t}")


ROUTING_OPTIONS = [dict(), dict(local_heads=1), dict(local_heads=2, shared_qk=True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", ROUTING_OPTIONS, ids=str)
def test_routing_cache_equals_the_causal_argmax_layer(options, dtype):
    q, k, v = _tokens((2, 4, 45, 8), dtype, seed=1)
    layer = ra.RoutingAttention(n_clusters=5, membership="argmax", causal=True, window=6,
                                **options)
    layer(q, k, v)                  # fit the centroids, then decode with them fixed
    layer.training = False
    rows = RoutingCache(layer).prefill(q, k, v)
    for t in range(45):
        expected = layer(q[..., :t + 1, :], k[..., :t + 1, :], v[..., :t + 1, :])[..., t, :]
        assert_close(rows[..., t, :], expected, dtype, f"{options} step {t}")


@pytest.mark.parametrize("method", ["dense", "local", "combiner-mixture"])
def test_sequences_of_different_lengths_share_a_cache(method):
    """`active` lets each sequence advance on its own; every sequence's rows equal its own
    full forward."""
    make, full = METHODS[method]
    q, k, v = _tokens((3, 2, 30, 4), np.float64, seed=2)
    lengths = np.array([30, 11, 23])
    cache, pos = make(), np.zeros(3, int)
    got = np.zeros(q.shape[:-1] + (4,))
    rng = np.random.default_rng(3)
    while (pos < lengths).any():
        active = (pos < lengths) & (rng.random(3) < 0.6)
        idx = np.minimum(pos, 29)[:, None, None, None]
        take = lambda a: np.take_along_axis(a, idx, axis=2)        # noqa: E731
        out = cache.step(take(q), take(k), take(v), active=active[:, None])
        for b in np.flatnonzero(active):
            got[b, :, pos[b]] = out[b, :, 0]
        assert not out[~active].any(), "an inactive sequence gets a zero row"
        pos += active
    for b, n in enumerate(lengths):
        expected = full(q[b, :, :n], k[b, :, :n], v[b, :, :n])
        assert_close(got[b, :, :n], expected, np.float64, f"{method} sequence {b}")


def test_bad_use_raises():
    with pytest.raises(ValueError, match="block"):
        CombinerCache("fixed")
    with pytest.raises(ValueError, match="plan"):
        CombinerCache("diagonal")
    with pytest.raises(ValueError, match="balanced"):
        RoutingCache(ra.RoutingAttention(causal=True))
    with pytest.raises(ValueError, match="argmax"):
        RoutingCache(ra.RoutingAttention(membership="argmax"))          # not causal
    with pytest.raises(ValueError, match="window"):
        RoutingCache(ra.RoutingAttention(membership="argmax", causal=True, local_heads=1))
    with pytest.raises(ValueError, match="centroids"):
        RoutingCache(ra.RoutingAttention(membership="argmax", causal=True)).step(
            *_tokens((2, 1, 4), np.float64))
    cache = DenseCache()
    q, k, v = _tokens((2, 1, 4), np.float64)
    cache.step(q, k, v)
    with pytest.raises(ValueError, match="one new token"):
        cache.step(*_tokens((2, 2, 4), np.float64))
    with pytest.raises(ValueError, match=r"shape \(2, 1, 4\)"):
        cache.step(*_tokens((3, 1, 4), np.float64))
    with pytest.raises(TypeError, match="float64"):
        cache.step(*_tokens((2, 1, 4), np.float32))
    with pytest.raises(TypeError, match="active"):
        cache.step(q, k, v, active=np.array([1, 0]))
    assert cache.lengths.tolist() == [1, 1], "a refused step leaves the cache as it was"
