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


# ------------------------------------------------------------------ non-finite tokens
def _assert_same_rows(got, expected, dtype, what):
    """Equal row by row: NaN and ±inf exactly where `expected` has them, the rest close."""
    for kind in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(kind(got), kind(expected)), \
            f"{what}: {kind.__name__} at {np.argwhere(kind(got)).tolist()}, expected at " \
            f"{np.argwhere(kind(expected)).tolist()}"
    bad = ~np.isfinite(expected)
    assert_close(np.where(bad, 0, got), np.where(bad, 0, expected), dtype, what)


NON_FINITE = [(which, pos, value) for which in "qkv" for pos in (0, 5)
              for value in (np.nan, np.inf)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("which, pos, value", NON_FINITE, ids=str)
@pytest.mark.parametrize("method", ["dense", "local"])
def test_a_non_finite_token_reaches_the_rows_of_the_full_forward(method, which, pos, value):
    """A NaN/inf entry reaches exactly the rows it reaches in the full forward: a local
    window slot hidden from a step (it is read from position 0) contributes nothing."""
    make, full = METHODS[method]
    q, k, v = _tokens((2, 17, 4), np.float64, seed=4)
    dict(q=q, k=k, v=v)[which][:, pos, 0] = value
    _assert_same_rows(make().prefill(q, k, v), full(q, k, v), np.float64,
                      f"{method} {which}[{pos}] = {value}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("options, which, pos, value", [
    pytest.param(options, *case, id=f"{options}-{case}")
    for options in ROUTING_OPTIONS for case in NON_FINITE])
def test_routing_cache_places_a_non_finite_token_as_the_layer_does(options, which, pos, value):
    """A non-finite query or key joins no cluster (a NaN query gets a NaN row), and a
    local head's hidden window slots contribute nothing: the rows equal the layer's
    causal forward, NaN rows included."""
    q, k, v = _tokens((2, 3, 20, 4), np.float64, seed=1)
    layer = ra.RoutingAttention(n_clusters=4, membership="argmax", causal=True, window=4,
                                **options)
    layer(q, k, v)
    layer.training = False
    dict(q=q, k=k, v=v)[which][:, :, pos, 0] = value
    _assert_same_rows(RoutingCache(layer).prefill(q, k, v), layer(q, k, v), np.float64,
                      f"{options} {which}[{pos}] = {value}")


# ------------------------------------------------------------------ routing centroids
def test_routing_cache_keeps_the_centroids_of_its_first_step():
    """Changing the layer's centroids while a cache decodes changes none of its steps:
    they equal the layer's forward with the centroids the cache started with."""
    q, k, v = _tokens((1, 2, 30, 8), np.float64)
    layer = ra.RoutingAttention(n_clusters=3, membership="argmax", causal=True)
    layer(q, k, v)
    layer.training = False
    started = layer.centroids.copy()
    cache = RoutingCache(layer)
    first = cache.prefill(q[..., :15, :], k[..., :15, :], v[..., :15, :])
    layer.centroids[...] = ra.spherical_kmeans(_tokens((2, 200, 8), np.float64, seed=5)[0],
                                               3, seed=5)             # changed in place
    assert not np.array_equal(layer.centroids, started)
    rows = np.concatenate([first, cache.prefill(q[..., 15:, :], k[..., 15:, :],
                                                v[..., 15:, :])], -2)
    layer.centroids = started
    assert_close(rows, layer(q, k, v), np.float64, "steps after the centroids changed")


def test_routing_cache_keeps_the_options_of_its_first_step():
    """The cache reads the layer's local_heads, window and shared_qk at its first step, as
    the centroids: changing them later changes none of its steps (the window and the
    kind of each head were read live at every step).  A layer changed between the cache's
    construction and its first step is checked again then."""
    q, k, v = _tokens((1, 3, 30, 8), np.float64)
    layer = ra.RoutingAttention(n_clusters=3, membership="argmax", causal=True, local_heads=1,
                                window=4)
    layer(q, k, v)
    layer.training = False
    cache = RoutingCache(layer)
    first = cache.prefill(q[..., :15, :], k[..., :15, :], v[..., :15, :])
    layer.local_heads, layer.window, layer.shared_qk = 2, 8, True
    rows = np.concatenate([first, cache.prefill(q[..., 15:, :], k[..., 15:, :],
                                                v[..., 15:, :])], -2)
    layer.local_heads, layer.window, layer.shared_qk = 1, 4, False
    assert_close(rows, layer(q, k, v), np.float64, "steps after the options changed")
    cache = RoutingCache(layer)
    layer.window = None
    with pytest.raises(ValueError, match="window set for its local heads"):
        cache.step(q[..., :1, :], k[..., :1, :], v[..., :1, :])
    assert cache.batch is None, "a refused first step sets nothing up"
    layer.window = 4
    assert_close(cache.prefill(q, k, v), layer(q, k, v), np.float64, "after the refused step")


# ------------------------------------------------------------------ edge sizes, refusals
@pytest.mark.parametrize("d, e", [(0, 3), (3, 0), (0, 0)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_features_as_the_full_forward(method, d, e):
    """d = 0 (every logit 0: the mean of the values seen) and e = 0 work as in the full
    forward."""
    make, full = METHODS[method]
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((2, 11, d)), rng.standard_normal((2, 11, d)), \
        rng.standard_normal((2, 11, e))
    assert_close(make().prefill(q, k, v), full(q, k, v), np.float64, f"{method} d={d} e={e}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_empty_prompt_gives_an_empty_result(method):
    make, full = METHODS[method]
    q, k, v = _tokens((2, 3, 9, 4), np.float32)
    cache = make()
    rows = cache.prefill(q[..., :0, :], k[..., :0, :], v[..., :0, :3])
    assert rows.shape == (2, 3, 0, 3) and rows.dtype == np.float32
    assert_close(cache.prefill(q, k, v), full(q, k, v), np.float32, f"{method} after it")


def _routing_cache():
    """A RoutingCache of a layer with one local head and fitted centroids."""
    layer = ra.RoutingAttention(n_clusters=3, membership="argmax", causal=True, local_heads=1,
                                window=4)
    layer(*_tokens((2, 3, 9, 4), np.float64, seed=3))
    layer.training = False
    return RoutingCache(layer)


@pytest.mark.parametrize("method", sorted(METHODS) + ["routing"])
def test_a_prompt_to_a_set_up_cache_is_checked_as_a_step(method):
    """An empty prompt to a cache that has taken steps is checked as a step would be:
    other batch axes, d, e or dtype are refused naming the argument (they gave an empty
    result); a matching one gives the empty (..., 0, e).  A prompt whose q, k, v differ
    in length is refused before any of it is fed (it fed the tokens they share)."""
    cache = _routing_cache() if method == "routing" else METHODS[method][0]()
    q, k, v = _tokens((2, 3, 5, 4), np.float64)
    cache.prefill(q, k, v[..., :3])
    empty = dict(q=np.zeros((2, 3, 0, 4)), k=np.zeros((2, 3, 0, 4)), v=np.zeros((2, 3, 0, 3)))
    refused = [
        (dict(q=np.zeros((3, 3, 0, 4)), k=np.zeros((3, 3, 0, 4)), v=np.zeros((3, 3, 0, 3))),
         ValueError, r"q must have shape \(2, 3, 0, 4\) like the cache's, "
         r"with the prompt's 0 tokens; got \(3, 3, 0, 4\)"),
        (dict(q=np.zeros((2, 3, 0, 5)), k=np.zeros((2, 3, 0, 5))),
         ValueError, r"q must have shape \(2, 3, 0, 4\) like the cache's, "
         r"with the prompt's 0 tokens; got \(2, 3, 0, 5\)"),
        (dict(k=np.zeros((2, 0, 4))),
         ValueError, r"k must have shape \(2, 3, 0, 4\) like the cache's, "
         r"with the prompt's 0 tokens; got \(2, 0, 4\)"),
        (dict(v=np.zeros((2, 3, 0, 4))),
         ValueError, r"v must have shape \(2, 3, 0, 3\) like the cache's, "
         r"with the prompt's 0 tokens; got \(2, 3, 0, 4\)"),
        ({name: a.astype(np.float32) for name, a in empty.items()},
         TypeError, r"this cache holds float64 tokens; got float32"),
        (dict(q=q, k=k[..., :4, :], v=v[..., :4, :3]),
         ValueError, r"k must hold the prompt's 5 tokens per sequence, as q does"),
    ]
    for given, error, message in refused:
        with pytest.raises(error, match=message):
            cache.prefill(**dict(empty, **given))
    assert cache.lengths.tolist() == [5] * 6, "a refused prompt feeds nothing"
    rows = cache.prefill(**empty)
    assert rows.shape == (2, 3, 0, 3) and rows.dtype == np.float64
    assert cache.lengths.tolist() == [5] * 6


def test_a_bad_scale_is_refused_at_construction():
    with pytest.raises(ValueError, match="finite"):
        DenseCache(scale=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        LocalCache(3, scale=np.inf)
    with pytest.raises(TypeError, match="scale"):
        CombinerCache("logsparse", scale="0.5")


def test_a_refused_first_step_leaves_the_cache_unset():
    """A first step refused (a scale float32 cannot hold, a non-boolean or mis-shaped
    `active`) sets nothing up: the next step is a first step."""
    q, k, v = _tokens((2, 1, 4), np.float32)
    cache = DenseCache(scale=1e39)                  # fine in float64, not in float32
    with pytest.raises(ValueError, match="overflows float32"):
        cache.step(q, k, v)
    rows = cache.prefill(*(a.astype(np.float64) for a in (q, k, v)))
    assert_close(rows, ra.attention(q.astype(np.float64), k.astype(np.float64),
                                    v.astype(np.float64), causal=True, scale=1e39),
                 np.float64, "after the refused step")
    for active, error in ((np.array([1, 0]), TypeError), (np.ones(3, bool), ValueError)):
        cache = LocalCache(3)
        with pytest.raises(error):
            cache.step(q, k, v, active=active)
        q3, k3, v3 = _tokens((3, 1, 4), np.float64)
        assert_close(cache.step(q3, k3, v3), ra.local_attention(q3, k3, v3, 3, causal=True),
                     np.float64, "a first step of another batch")
