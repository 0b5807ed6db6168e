"""Hardening (issue 8; README, Reliability): bad input, NaN locality, MemoryError, threads, leaks, fork.

Every public function is listed once in METHODS (a name, an input builder, a call); the
thread, leak and fork tests walk that table, so a new method is one more row there and
its bad-input rules are a few more rows in BAD_INPUT.
"""
import concurrent.futures
import gc
import multiprocessing
import os
import sys
import tracemalloc

import numpy as np
import pytest

import routing_attention as ra
from routing_attention import _ext
from routing_attention import reference as ref

SANITIZED = bool(os.environ.get("RA_SANITIZED"))


# ====================================================================== the method table
def _qkv(rng, dtype, n=10, m=10, d=4, e=3, batch=(2,)):
    return tuple(rng.standard_normal(batch + s).astype(dtype) for s in ((n, d), (m, d), (m, e)))


def _members(rng, c, w, length, batch=(2,)):
    idx = np.full(batch + (c, w), -1, np.int64)
    for pos in np.ndindex(*batch, c):
        take = rng.integers(1, w + 1)
        idx[pos][:take] = np.sort(rng.choice(length, take, replace=False))
    return idx


def _dense(rng, dtype):
    q, k, v = _qkv(rng, dtype)
    mask = rng.random((2, 10)) < 0.8
    return dict(q=q, k=k, v=v, key_mask=mask, dout=rng.standard_normal((2, 10, 3)).astype(dtype))


def _routing(rng, dtype):
    q, k, v = _qkv(rng, dtype)
    return dict(q=q, k=k, v=v, q_idx=_members(rng, 3, 4, 10), k_idx=_members(rng, 3, 5, 10),
                dout=rng.standard_normal((2, 10, 3)).astype(dtype))


def _local(rng, dtype):
    q, k, v = _qkv(rng, dtype)
    return dict(q=q, k=k, v=v, dout=rng.standard_normal((2, 10, 3)).astype(dtype))


_combiner = _local


def _clustered(rng, dtype):
    a = _dense(rng, dtype)
    a["labels"] = rng.integers(-1, 3, (2, 10))
    return a

# name -> (input builder, call returning a tuple of arrays)
METHODS = {
    "attention": (_dense, lambda a: ra.attention(
        a["q"], a["k"], a["v"], causal=True, key_mask=a["key_mask"], return_lse=True)),
    "attention_backward": (_dense, lambda a: ra.attention_backward(
        a["dout"], a["q"], a["k"], a["v"], causal=True, key_mask=a["key_mask"])),
    "routing_attention": (_routing, lambda a: ra.routing_attention(
        a["q"], a["k"], a["v"], a["q_idx"], a["k_idx"], merge="lse", return_lse=True)),
    "routing_attention_backward": (_routing, lambda a: ra.routing_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], a["q_idx"], a["k_idx"], causal=True)),
    "local_attention": (_local, lambda a: (ra.local_attention(a["q"], a["k"], a["v"], 3),)),
    "local_attention_backward": (_local, lambda a: ra.local_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], 3, causal=True)),
    "combiner_attention": (_combiner, lambda a: (ra.combiner_attention(
        a["q"], a["k"], a["v"], plan="mixture", block=3),)),
    "combiner_attention_backward": (_combiner, lambda a: ra.combiner_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], plan="fixed", block=4)),
    "combiner_logsparse": (_combiner, lambda a: (ra.combiner_attention(
        a["q"], a["k"], a["v"], plan="logsparse", causal=False),)),
    "CombinerAttention": (_combiner, lambda a: _layer_roundtrip(a)),
    "clustered_attention": (_clustered, lambda a: (ra.clustered_attention(
        a["q"], a["k"], a["v"], a["labels"], 3, key_mask=a["key_mask"]),)),
    "clustered_attention_backward": (_clustered, lambda a: ra.clustered_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], a["labels"], 3, key_mask=a["key_mask"])),
    "improved_clustered_attention": (_clustered, lambda a: (ra.improved_clustered_attention(
        a["q"], a["k"], a["v"], a["labels"], 3, 4, key_mask=a["key_mask"]),)),
    "improved_clustered_attention_backward": (_clustered, lambda a: ra.improved_clustered_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], a["labels"], 3, 4, key_mask=a["key_mask"])),
    "RoutingAttention": (_local, lambda a: _routing_layer_roundtrip(a)),
    "ClusteredAttention": (_local, lambda a: _clustered_layer_roundtrip(a)),
    "routing_decisions": (_local, lambda a: _routing_decisions(a)),
    "assign_top_members": (lambda rng, dtype: dict(
        x=rng.standard_normal((16384, 4)).astype(dtype),          # n·c = 2**20: the fused
        cent=rng.standard_normal((64, 4)).astype(dtype)),         # kernel, not the stored one
        lambda a: ra.assign_top_members(a["x"], a["cent"], 300)),
}


def _routing_layer_roundtrip(a):
    layer = ra.RoutingAttention(n_clusters=3, local_heads=1, window=4, causal=True)
    q, k, v = (x[None] for x in (a["q"], a["k"], a["v"]))       # (1, heads=2, n, d)
    out = layer(q, k, v)
    return (out, layer.centroids) + tuple(layer.backward(a["dout"][None]))


def _clustered_layer_roundtrip(a):
    layer = ra.ClusteredAttention(n_clusters=3, bits=8, topk=3, seed=1)
    return (layer(a["q"], a["k"], a["v"]),) + tuple(layer.backward(a["dout"]))


def _routing_decisions(a):
    x = a["q"]
    cent = ra.spherical_kmeans(x, 3, iters=3, seed=2)
    labels = ra.assign_clusters(x, cent)
    planes = np.random.default_rng(3).standard_normal((6, x.shape[-1] + 1))
    codes = ra.lsh_hash(x, planes)
    return (cent, labels, ra.update_centroids(cent, x, labels, decay=0.9),
            ra.commitment_loss(x, cent, labels), ra.top_members(x @ np.swapaxes(cent, -1, -2), 4),
            *ra.assign_top_members(x, cent, 4),
            ra.members_from_labels(labels, 3), codes, ra.hamming_kmeans(codes, 3, iters=3, seed=4))


def _layer_roundtrip(a):
    layer = ra.CombinerAttention("axial", block=3)
    return (layer(a["q"], a["k"], a["v"]),) + tuple(layer.backward(a["dout"]))


def _inputs(name, dtype=np.float64, seed=0):
    build, _ = METHODS[name]
    return build(np.random.default_rng(seed), dtype)


def _run(name, arrays):
    return tuple(np.asarray(x) for x in METHODS[name][1](arrays))


# ====================================================================== bad input
def _qkv1(**over):
    """Small valid float64 q, k, v (n = m = 6, d = 4, e = 3), with some replaced."""
    rng = np.random.default_rng(1)
    a = dict(q=rng.standard_normal((6, 4)), k=rng.standard_normal((6, 4)),
             v=rng.standard_normal((6, 3)), dout=rng.standard_normal((6, 3)))
    a.update(over)
    return a


IDX = np.array([[0, 1, 2], [3, 4, -1]])


def _att(**over):
    a = _qkv1(**{k: v for k, v in over.items() if k in ("q", "k", "v", "dout")})
    kw = {k: v for k, v in over.items() if k not in ("q", "k", "v", "dout")}
    return a, kw


def _call_attention(**over):
    a, kw = _att(**over)
    return ra.attention(a["q"], a["k"], a["v"], **kw)


def _call_attention_backward(**over):
    a, kw = _att(**over)
    return ra.attention_backward(a["dout"], a["q"], a["k"], a["v"], **kw)


def _call_routing(**over):
    a, kw = _att(**over)
    kw.setdefault("q_idx", IDX)
    kw.setdefault("k_idx", IDX)
    return ra.routing_attention(a["q"], a["k"], a["v"], kw.pop("q_idx"), kw.pop("k_idx"), **kw)


def _call_routing_backward(**over):
    a, kw = _att(**over)
    kw.setdefault("q_idx", IDX)
    kw.setdefault("k_idx", IDX)
    return ra.routing_attention_backward(a["dout"], a["q"], a["k"], a["v"], kw.pop("q_idx"),
                                         kw.pop("k_idx"), **kw)


def _call_local(**over):
    a, kw = _att(**over)
    kw.setdefault("window", 2)
    return ra.local_attention(a["q"], a["k"], a["v"], kw.pop("window"), **kw)


def _call_local_backward(**over):
    a, kw = _att(**over)
    kw.setdefault("window", 2)
    return ra.local_attention_backward(a["dout"], a["q"], a["k"], a["v"], kw.pop("window"), **kw)


def _call_combiner(**over):
    a, kw = _att(**over)
    return ra.combiner_attention(a["q"], a["k"], a["v"], **kw)


def _call_combiner_backward(**over):
    a, kw = _att(**over)
    return ra.combiner_attention_backward(a["dout"], a["q"], a["k"], a["v"], **kw)


def _call_layer(**over):
    a, kw = _att(**over)
    layer = ra.CombinerAttention(**kw)
    layer(a["q"], a["k"], a["v"])
    return layer.backward(a["dout"])


QKV_CALLS = {
    "attention": _call_attention, "attention_backward": _call_attention_backward,
    "routing_attention": _call_routing, "routing_attention_backward": _call_routing_backward,
    "local_attention": _call_local, "local_attention_backward": _call_local_backward,
    "combiner_attention": _call_combiner, "combiner_attention_backward": _call_combiner_backward,
    "CombinerAttention": _call_layer,
}
BACKWARDS = [n for n in QKV_CALLS if n.endswith("_backward") or n == "CombinerAttention"]
_rng = np.random.default_rng(2)

# rules every q/k/v function obeys: (id, overrides, exception, message naming the argument)
QKV_RULES = [
    ("q_rank_1", dict(q=np.ones(4)), ValueError, r"q must have at least 2 dimensions"),
    ("k_rank_0", dict(k=np.float64(1)), ValueError, r"k must have at least 2 dimensions"),
    ("v_rank_1", dict(v=np.ones(6)), ValueError, r"v must have at least 2 dimensions"),
    ("d_mismatch", dict(k=np.ones((6, 5))), ValueError, r"q and k must have the same feature size d"),
    ("m_mismatch", dict(v=np.ones((5, 3))), ValueError, r"k and v must have the same sequence length"),
    ("q_complex", dict(q=np.ones((6, 4), complex)), TypeError, r"q has complex dtype"),
    ("k_object", dict(k=np.ones((6, 4), object)), TypeError, r"k has dtype object"),
    ("v_string", dict(v=np.full((6, 3), "a")), TypeError, r"v has dtype <U1"),
    ("q_longdouble", dict(q=np.ones((6, 4), np.longdouble)), TypeError, r"q has dtype"),
    ("batch_mismatch", dict(q=np.ones((2, 6, 4)), k=np.ones((3, 6, 4)), v=np.ones((3, 6, 3))),
     ValueError, r"batch axes do not broadcast: q \(2,\), k \(3,\)"),
    ("scale_string", dict(scale="2"), TypeError, r"scale must be a real number"),
    ("scale_nan", dict(scale=float("nan")), ValueError, r"scale must be finite"),
    ("scale_complex", dict(scale=1j), TypeError, r"scale must be a real number"),
    ("causal_not_bool", dict(causal=1), TypeError, r"causal must be True or False"),
]
# rules of every backward: the gradient of the output
DOUT_RULES = [
    ("dout_shape", dict(dout=np.ones((6, 2))), ValueError, r"dout must have shape"),
    ("dout_rank", dict(dout=np.ones(3)), ValueError, r"dout must have at least 2 dimensions"),
    ("dout_complex", dict(dout=np.ones((6, 3), complex)), TypeError, r"dout has complex dtype"),
    ("dout_string", dict(dout=np.full((6, 3), "x")), TypeError, r"dout has dtype"),
    ("dout_batch", dict(dout=np.ones((4, 6, 3)), q=np.ones((2, 6, 4))), ValueError,
     r"batch axes do not broadcast: dout \(4,\)"),
]
# a layer knows its call's output shape: a dout of another rank or batch is refused as such
LAYER_DOUT_MESSAGES = {
    "dout_rank": r"dout must have shape \(6, 3\) like the layer call's output; got \(3,\)",
    "dout_batch": r"dout must have shape \(2, 6, 3\) like the layer call's output; got \(4, 6, 3\)",
}
# method-specific rules: (id, function, overrides, exception, message)
SPECIFIC_RULES = [
    ("mask_dtype", "attention", dict(key_mask=np.ones(6)), TypeError, r"key_mask must be a boolean"),
    ("mask_length", "attention", dict(key_mask=np.ones(5, bool)), ValueError, r"key_mask must have shape \(\.\.\., 6\)"),
    ("mask_batch", "attention", dict(key_mask=np.ones((3, 6), bool), q=np.ones((2, 6, 4))),
     ValueError, r"batch axes do not broadcast: .*key_mask \(3,\)"),
    ("return_lse_flag", "attention", dict(return_lse="yes"), TypeError, r"return_lse must be True or False"),
    ("out_shape", "attention", dict(out=np.empty((6, 4))), ValueError, r"out must have shape \(6, 3\)"),
    ("out_dtype", "attention", dict(out=np.empty((6, 3), np.int64)), TypeError, r"out has dtype int64"),
    ("out_type", "attention", dict(out=[0.0]), TypeError, r"out must be a NumPy array"),
    ("lse_shape", "attention_backward", dict(lse=np.zeros(5), output=np.zeros((6, 3))), ValueError,
     r"lse must have shape \(\.\.\., 6\)"),
    ("lse_complex", "attention_backward", dict(lse=np.zeros(6, complex), output=np.zeros((6, 3))),
     TypeError, r"lse has complex dtype"),
    ("output_shape", "attention_backward", dict(lse=np.zeros(6), output=np.zeros((6, 2))), ValueError,
     r"output must have shape"),
    ("q_idx_float", "routing_attention", dict(q_idx=IDX.astype(float)), TypeError, r"q_idx must be an integer array"),
    ("k_idx_bool", "routing_attention", dict(k_idx=IDX > 0), TypeError, r"k_idx must be an integer array"),
    ("q_idx_rank", "routing_attention", dict(q_idx=np.arange(3)), ValueError, r"q_idx must have shape \(\.\.\., n_clusters, size\)"),
    ("q_idx_high", "routing_attention", dict(q_idx=np.array([[0, 6, -1], [1, 2, 3]])), ValueError, r"q_idx has entries outside \[-1, 6\)"),
    ("k_idx_low", "routing_attention", dict(k_idx=np.array([[0, -2, -1], [1, 2, 3]])), ValueError, r"k_idx has entries outside \[-1, 6\)"),
    ("k_idx_uint64_max", "routing_attention", dict(k_idx=np.array([[0, 2**64 - 1, 1], [1, 2, 3]], np.uint64)),
     ValueError, r"k_idx has entries outside \[-1, 6\)"),
    ("q_idx_repeat", "routing_attention", dict(q_idx=np.array([[1, 4, 1], [0, -1, -1]])), ValueError,
     r"q_idx repeats a position inside the list of cluster \(0,\)"),
    ("k_idx_repeat", "routing_attention_backward", dict(k_idx=np.array([[0, 1, 2], [5, 5, -1]])),
     ValueError, r"k_idx repeats a position inside the list of cluster \(1,\)"),
    ("idx_clusters", "routing_attention", dict(q_idx=IDX[:1]), ValueError,
     r"q_idx and k_idx must list the same number of clusters"),
    ("idx_batch", "routing_attention", dict(q_idx=np.stack([IDX] * 3), k_idx=np.stack([IDX] * 2)),
     ValueError, r"batch axes do not broadcast: .*q_idx \(3,\), k_idx \(2,\)"),
    ("merge", "routing_attention", dict(merge="sum"), ValueError, r"merge must be one of"),
    ("exclude_self_flag", "routing_attention_backward", dict(exclude_self="no"), TypeError,
     r"exclude_self must be True or False"),
    ("out_shape", "routing_attention", dict(out=np.empty((2, 6, 3))), ValueError, r"out must have shape \(6, 3\)"),
    ("window_zero", "local_attention", dict(window=0), ValueError, r"window must be >= 1"),
    ("window_float", "local_attention_backward", dict(window=2.5), TypeError, r"window must be an integer"),
    ("window_negative", "local_attention", dict(window=-3), ValueError, r"window must be >= 1"),
    ("plan", "combiner_attention", dict(plan="dense"), ValueError, r"plan must be one of"),
    ("plan_type", "combiner_attention_backward", dict(plan=0), ValueError, r"plan must be one of"),
    ("block_zero", "combiner_attention", dict(block=0), ValueError, r"block must be >= 1"),
    ("block_too_big", "combiner_attention", dict(block=7), ValueError, r"block must be <= 6"),
    ("block_float", "combiner_attention_backward", dict(block=2.0), TypeError, r"block must be an integer"),
    ("block_logsparse", "combiner_attention", dict(plan="logsparse", block=2), ValueError,
     r"block is not used by plan='logsparse'"),
    ("n_ne_m", "combiner_attention", dict(k=np.ones((5, 4)), v=np.ones((5, 3))), ValueError, r"n == m"),
    ("empty_sequence", "combiner_attention", dict(q=np.ones((0, 4)), k=np.ones((0, 4)), v=np.ones((0, 3))),
     ValueError, r"at least 1 position"),
    ("layer_plan", "CombinerAttention", dict(plan="nope"), ValueError, r"plan must be one of"),
    ("layer_block", "CombinerAttention", dict(block=-1), ValueError, r"block must be >= 1"),
    ("layer_causal", "CombinerAttention", dict(causal="no"), TypeError, r"causal must be True or False"),
]

ALL_RULES = (
    [pytest.param(fn, over, exc, msg, id=f"{fn}-{rid}") for rid, over, exc, msg in QKV_RULES
     for fn in QKV_CALLS]
    + [pytest.param(fn, over, exc, LAYER_DOUT_MESSAGES.get(rid, msg) if fn == "CombinerAttention"
                    else msg, id=f"{fn}-{rid}") for rid, over, exc, msg in DOUT_RULES
       for fn in BACKWARDS]
    + [pytest.param(fn, over, exc, msg, id=f"{fn}-{rid}") for rid, fn, over, exc, msg in SPECIFIC_RULES]
)


@pytest.mark.filterwarnings("error")     # a bad input must not slip through as a warning
@pytest.mark.parametrize("fn, over, exc, message", ALL_RULES)
def test_bad_input_raises_naming_the_argument(fn, over, exc, message):
    with pytest.raises(exc, match=message):
        QKV_CALLS[fn](**over)


def test_layer_backward_before_forward():
    with pytest.raises(RuntimeError, match="CombinerAttention.backward needs a forward call"):
        ra.CombinerAttention().backward(np.ones((4, 3)))


def test_index_arrays_rejected_by_the_kernels_are_named():
    """The C planner validates the lists (the wrapper leaves the repeat check to it, ~1 %
    of a large forward); when it rejects them, the wrapper's full check names the
    argument, the cluster and the entry (the C message cannot)."""
    with pytest.raises(ValueError, match=r"k_idx has entries outside \[-1, 6\): first offender 99"):
        _call_routing(k_idx=np.array([[0, 99, -1], [1, 2, 3]]))
    for call in (_call_routing, _call_routing_backward):
        with pytest.raises(ValueError, match=r"q_idx repeats a position inside the list of cluster \(1,\)"):
            call(q_idx=np.array([[0, 1, 2], [5, 3, 5]]))
    # and the C check itself: the raw gufunc on an out-of-range / repeated list
    a = _qkv1()
    for bad in (np.array([[0, 99]]), np.array([[3, 3]])):
        with pytest.raises(ValueError, match="index out of range or repeated"):
            _ext._routing_forward(a["q"], a["k"], a["v"], bad, IDX[:1], 0.5, False, False, False,
                                  0, 0, np.empty(0))


def test_huge_window_is_one_block_without_allocating_it():
    a = _qkv1()
    want = ra.local_attention(a["q"], a["k"], a["v"], 6)
    got = ra.local_attention(a["q"], a["k"], a["v"], 2**62)   # would be 2^62-long lists
    assert np.array_equal(got, want), "a window beyond the sequence is one block"


# ====================================================================== NaN / inf locality
def _poisoned(a, i, value):
    a = a.copy()
    a[..., i, :] = value
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_locality_dense(dtype, value):
    rng = np.random.default_rng(4)
    n, j = 300, 120          # n spans several tiles, the poisoned key sits mid-tile
    q, k, v = (rng.standard_normal((n, 8)).astype(dtype) for _ in range(3))
    clean = ra.attention(q, k, v, causal=True)
    with np.errstate(invalid="ignore", over="ignore"):
        # a query's own row: only that output changes, every other one is bit-identical
        out = ra.attention(_poisoned(q, j, value), k, v, causal=True)
        if value != value:
            assert np.isnan(out[j]).all(), "the poisoned query's output"
        assert np.array_equal(np.delete(out, j, 0), np.delete(clean, j, 0)), "other queries"
        # a key (k or v row): every query that sees it, none that cannot (i < j); an
        # infinite key may also just win or lose every softmax, so only NaN is checked there
        for name in ("k", "v"):
            args = (q, _poisoned(k, j, value), v) if name == "k" else (q, k, _poisoned(v, j, value))
            out = ra.attention(*args, causal=True)
            if value != value:
                assert np.isnan(out[j:]).all(), f"{name}: queries that see key {j}"
            assert np.isfinite(out[:j]).all(), f"{name}: queries before key {j} (causal)"
            np.testing.assert_allclose(out[:j], clean[:j], rtol=10 * np.finfo(dtype).eps,
                                       atol=10 * np.finfo(dtype).eps, err_msg=name)
        # a padding key sees no query at all, whatever it holds
        mask = np.ones(n, bool)
        mask[j] = False
        base = ra.attention(q, k, v, key_mask=mask)
        out = ra.attention(q, _poisoned(k, j, value), _poisoned(v, j, value), key_mask=mask)
        np.testing.assert_allclose(out, base, rtol=10 * np.finfo(dtype).eps,
                                   atol=10 * np.finfo(dtype).eps, err_msg="padding key")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_locality_routing(dtype):
    rng = np.random.default_rng(5)
    n = 40
    q, k, v = (rng.standard_normal((n, 6)).astype(dtype) for _ in range(3))
    q_idx = _members(rng, 4, 12, n, batch=())
    k_idx = _members(rng, 4, 15, n, batch=())
    j = int(k_idx[0][k_idx[0] >= 0][0])
    sees = np.zeros(n, bool)               # queries that share a cluster with key j
    for c in range(4):
        if j in k_idx[c]:
            sees[q_idx[c][q_idx[c] >= 0]] = True
    for merge in ("mean", "lse"):
        clean = ra.routing_attention(q, k, v, q_idx, k_idx, merge=merge)
        with np.errstate(invalid="ignore"):
            out = ra.routing_attention(q, k, _poisoned(v, j, np.nan), q_idx, k_idx, merge=merge)
        assert np.isnan(out[sees]).all(), f"{merge}: queries clustered with key {j}"
        assert np.isfinite(out[~sees]).all(), f"{merge}: the others stay finite"
        np.testing.assert_allclose(out[~sees], clean[~sees], rtol=10 * np.finfo(dtype).eps,
                                   atol=10 * np.finfo(dtype).eps)
        i = int(q_idx[1][q_idx[1] >= 0][0])
        with np.errstate(invalid="ignore"):
            out = ra.routing_attention(_poisoned(q, i, np.nan), k, v, q_idx, k_idx, merge=merge)
        assert np.isnan(out[i]).all() and np.array_equal(np.delete(out, i, 0), np.delete(clean, i, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_locality_local(dtype):
    rng = np.random.default_rng(6)
    n, window, j = 50, 8, 21              # key 21 is in block 2: seen by blocks 1, 2, 3
    q, k, v = (rng.standard_normal((n, 4)).astype(dtype) for _ in range(3))
    clean = ra.local_attention(q, k, v, window)
    with np.errstate(invalid="ignore"):
        out = ra.local_attention(q, _poisoned(k, j, np.nan), v, window)
    sees = (np.arange(n) // window >= 1) & (np.arange(n) // window <= 3)
    assert np.isnan(out[sees]).all() and np.isfinite(out[~sees]).all()
    assert np.array_equal(out[~sees], clean[~sees])


@pytest.mark.parametrize("plan", ["fixed", "axial", "logsparse", "mixture"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nan_locality_combiner_causal(plan, which):
    """Causal Combiner: position j (as query, key or value) reaches only queries i >= j,
    directly or through region summaries of the past."""
    rng = np.random.default_rng(7)
    n, j = 37, 17
    a = dict(zip("qkv", (rng.standard_normal((n, 5)) for _ in range(3))))
    clean = ra.combiner_attention(a["q"], a["k"], a["v"], plan=plan, causal=True)
    a[which] = _poisoned(a[which], j, np.nan)
    with np.errstate(invalid="ignore"):
        out = ra.combiner_attention(a["q"], a["k"], a["v"], plan=plan, causal=True)
    assert np.isfinite(out[:j]).all(), f"{plan}: NaN {which}[{j}] reached an earlier query"
    np.testing.assert_allclose(out[:j], clean[:j], rtol=1e-13, atol=1e-13)
    assert not np.isfinite(out[j:]).all(), f"{plan}: NaN {which}[{j}] vanished"


@pytest.mark.parametrize("plan", ["fixed", "axial", "logsparse", "mixture"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("which", ["q", "k"])
def test_nan_reaches_the_rows_the_reference_says(plan, causal, which):
    """A NaN row of q or k makes exactly the reference's rows NaN: a region summary
    max-pools a NaN like np.max (the pool used to skip it, and the queries seeing the
    region got the finite summary of the other rows).  (v is not pooled; the reference's
    dense products spread a NaN value to causally hidden rows, 0·NaN, so it is no oracle
    there: test_nan_locality_combiner_causal covers v.)"""
    rng = np.random.default_rng(8)
    a = dict(zip("qkv", (rng.standard_normal((30, 5)) for _ in range(3))))
    a[which] = _poisoned(a[which], 7, np.nan)
    with np.errstate(invalid="ignore"):
        kw = dict(plan=plan, block=None if plan == "logsparse" else 4, causal=causal)
        out = ra.combiner_attention(a["q"], a["k"], a["v"], **kw)
        want = ref.combiner_attention(a["q"], a["k"], a["v"], **kw)
    nan_rows = np.isnan(want).any(axis=-1)
    assert np.array_equal(np.isnan(out).any(axis=-1), nan_rows)
    np.testing.assert_allclose(out[~nan_rows], want[~nan_rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in METHODS if "backward" in n or n == "CombinerAttention"])
def test_nan_in_one_batch_element_stays_there(name):
    """Gradients: NaN in one problem of a batch leaves every other problem bit-identical
    (inside a problem a non-finite input may spread to every gradient; see README)."""
    a = _inputs(name)
    clean = _run(name, a)
    a["q"] = a["q"].copy()
    a["q"][0, 3, 0] = np.nan
    with np.errstate(invalid="ignore"):
        got = _run(name, a)
    for c, g in zip(clean, got):
        if g.ndim >= 3:
            assert np.array_equal(g[1], c[1]), f"{name}: batch element 1 changed"


# ====================================================================== MemoryError
def _huge(shape, dtype=np.float32):
    """A read-only view of one element broadcast to `shape`: no memory behind it."""
    return np.broadcast_to(np.zeros((1,) * len(shape), dtype), shape)


D_HUGE = 2**20            # with m = 2^29: k packs need 2^51 bytes, beyond any address space
M_HUGE = 2**29
HUGE_CALLS = {
    "attention": lambda: ra.attention(_huge((1, D_HUGE)), _huge((M_HUGE, D_HUGE)), _huge((M_HUGE, 1))),
    "attention_backward": lambda: ra.attention_backward(
        _huge((1, 1)), _huge((1, D_HUGE)), _huge((M_HUGE, D_HUGE)), _huge((M_HUGE, 1)),
        lse=np.zeros(1, np.float32), output=np.zeros((1, 1), np.float32)),
    # per-thread scratch u·d: 2^17 key slots × (2^30 - 1) features
    "routing_attention": lambda: ra.routing_attention(
        _huge((1, 2**30 - 1)), _huge((1, 2**30 - 1)), _huge((1, 1)),
        np.zeros((1, 1), np.int64), np.full((1, 2**17), -1, np.int64)),
    "routing_attention_backward": lambda: ra.routing_attention_backward(
        _huge((1, 1)), _huge((1, 2**30 - 1)), _huge((1, 2**30 - 1)), _huge((1, 1)),
        np.zeros((1, 1), np.int64), np.full((1, 2**17), -1, np.int64)),
    # region tables n·d: 2^17 positions × (2^30 - 1) features
    "combiner_attention": lambda: ra.combiner_attention(
        _huge((2**17, 2**30 - 1)), _huge((2**17, 2**30 - 1)), _huge((2**17, 1))),
    "combiner_attention_backward": lambda: ra.combiner_attention_backward(
        _huge((2**17, 1)), _huge((2**17, 2**30 - 1)), _huge((2**17, 2**30 - 1)), _huge((2**17, 1))),
    # a batch of 2^44 problems: the output alone is 2^46 bytes
    "attention_batch": lambda: ra.attention(_huge((2**44, 1, 1)), _huge((1, 1)), _huge((1, 1))),
}


@pytest.mark.parametrize("name", list(HUGE_CALLS))
def test_huge_sizes_raise_memory_error(name):
    with pytest.raises(MemoryError):
        HUGE_CALLS[name]()


def test_core_dimension_beyond_int_range_is_a_value_error():
    with pytest.raises(ValueError, match="exceeds the supported maximum"):
        ra.attention(_huge((1, 1)), _huge((2**31, 1)), _huge((2**31, 1)))


# ====================================================================== threads
def test_many_threads_give_the_serial_answers():
    names = list(METHODS)
    inputs = {name: _inputs(name, dtype, seed=i) for i, name in enumerate(names)
              for dtype in (np.float64,)}
    inputs32 = {name: _inputs(name, np.float32, seed=50 + i) for i, name in enumerate(names)}
    jobs = [(name, inputs[name]) for name in names] + [(name, inputs32[name]) for name in names]
    serial = [_run(name, a) for name, a in jobs]
    order = [i for _ in range(6) for i in range(len(jobs))]
    np.random.default_rng(8).shuffle(order)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: (i, _run(*jobs[i])), order))
    for i, got in results:
        for x, y in zip(got, serial[i]):
            assert np.array_equal(x, y, equal_nan=True), f"{jobs[i][0]}: threaded result differs"


# ====================================================================== leaks
def _raw_errors():
    """Calls that fail inside C (after scratch is allocated), through the raw gufuncs."""
    a = _qkv1()
    calls = []
    for bad in (np.array([[0, 99]]), np.array([[3, 3]])):
        calls.append(lambda bad=bad: _ext._routing_forward(
            a["q"], a["k"], a["v"], bad, IDX[:1], 0.5, False, False, False, 0, 0, np.empty(0)))
        calls.append(lambda bad=bad: _ext._routing_backward(
            a["dout"], a["q"], a["k"], a["v"], IDX[:1], bad, 0.5, False, False, False))
    calls.append(lambda: _ext._combiner_forward(a["q"], a["k"], a["v"], 9, 2, True, 0.5))
    calls.append(lambda: _ext._combiner_backward(a["dout"], a["q"], a["k"], a["v"], 0, 0, True, 0.5))
    return calls


def _error_calls():
    """Calls that raise: in the wrappers, in C (status codes) and on out-of-memory."""
    calls = [lambda fn=fn, over=over: QKV_CALLS[fn](**over)
             for fn, over, _, _ in ([(f, o, e, m) for _, o, e, m in QKV_RULES[:6] for f in QKV_CALLS]
                                    + [(f, o, e, m) for _, f, o, e, m in SPECIFIC_RULES])]
    calls += _raw_errors()
    calls += [HUGE_CALLS[n] for n in ("attention", "routing_attention_backward", "combiner_attention")]
    return calls


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_in_use():
    """Bytes in use in the C heap (glibc mallinfo2), or None where unavailable."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    info = fn()
    return info.uordblks + info.hblkhd


def _measure(calls, rounds, traced_rounds, watched):
    """Run every call `rounds` times untraced, then `traced_rounds` times under tracemalloc
    (which slows allocation down a lot); return (traced Python bytes, C heap bytes, RSS
    bytes, reference-count changes of the `watched` arrays)."""
    def run(times):
        for _ in range(times):
            for call in calls:
                try:
                    call()
                except (ValueError, TypeError, MemoryError, RuntimeError):
                    continue        # error paths are measured for leaks too
    run(20)                             # warm caches, NumPy's allocator, thread pools
    gc.collect()
    refs = [sys.getrefcount(x) for x in watched]
    c0, rss0 = _malloc_in_use(), _resident_bytes()
    run(rounds)
    gc.collect()
    c1, rss1 = _malloc_in_use(), _resident_bytes()
    tracemalloc.start()
    try:
        py0 = tracemalloc.get_traced_memory()[0]
        run(traced_rounds)
        gc.collect()
        py1 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    after = [sys.getrefcount(x) for x in watched]
    dref = [a - b for a, b in zip(after, refs)]
    return py1 - py0, (c1 - c0) if c0 is not None else 0, rss1 - rss0, dref


def _leak_check(calls, watched, rounds, traced_rounds, per_call_bytes=8):
    # one OpenMP thread: the same allocations (scratch is one block for all threads),
    # without the cost of waking a thread team on a loaded machine for every tiny call
    saved = ra.get_num_threads()
    ra.set_num_threads(1)
    try:
        py, cheap, rss, dref = _measure(calls, rounds, traced_rounds, watched)
    finally:
        ra.set_num_threads(saved)
    assert dref == [0] * len(watched), f"reference counts of the inputs changed by {dref}"
    traced = traced_rounds * len(calls)
    # 16 KiB of slack for one-off caches; a leaked array per call is far more than that
    assert py < traced * per_call_bytes + 16384, f"Python heap grew {py} B over {traced} calls"
    total = rounds * len(calls)
    if not SANITIZED:       # ASan's malloc does not report mallinfo
        assert cheap < total * per_call_bytes, f"C heap grew {cheap} B over {total} calls"
    assert rss < 32 << 20, f"resident memory grew {rss >> 20} MiB over {total} calls"


def _flag_cases():
    """(call with an infinity in the last problem's or row's data, the same call clean):
    inf − inf in a softmax, or inf · 0 in a score product, raises FE_INVALID on whichever
    thread runs that part — a worker on two or three threads."""
    g = np.random.default_rng(3)
    q, k, v = (g.standard_normal((8, 512, 16)) for _ in range(3))
    q_bad = q.copy()
    q_bad[-1, -1, 0] = np.inf
    x, mu = g.standard_normal((8192, 32)), g.standard_normal((16, 32))
    x_bad = x.copy()
    x_bad[-1] = np.inf
    return {
        "attention": (lambda: ra.attention(q_bad, k, v), lambda: ra.attention(q, k, v)),
        # w = 8: the scores stored, then top_members, which hides its comparisons' flags
        "assign_top_members": (lambda: ra.assign_top_members(x_bad, mu, 8),
                               lambda: ra.assign_top_members(x, mu, 8)),
    }


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("case", ["attention", "assign_top_members"])
def test_a_flag_raised_on_a_worker_thread_reaches_errstate(threads, case):
    """A flag raised on a worker thread is reported by np.errstate whatever the thread
    count (NumPy reads the calling thread's flags only), and the next clean call reports
    nothing stale."""
    bad, clean = _flag_cases()[case]
    saved = ra.get_num_threads()
    ra.set_num_threads(threads)
    try:
        with np.errstate(invalid="raise"):
            with pytest.raises(FloatingPointError, match="invalid value"):
                bad()
            clean()
    finally:
        ra.set_num_threads(saved)


def test_no_leaks_in_successful_calls():
    args = [_inputs(name) for name in METHODS]
    calls = [lambda name=name, a=a: _run(name, a) for name, a in zip(METHODS, args)]
    watched = [x for a in args for x in a.values()]
    _leak_check(calls, watched, 20 if SANITIZED else 1000, 10 if SANITIZED else 100)


def test_no_leaks_in_failing_calls():
    calls = _error_calls()
    _leak_check(calls, [IDX], 5 if SANITIZED else 150, 5 if SANITIZED else 20)


def test_the_leak_check_catches_a_leaked_array():
    """The harness itself: keeping one small output per call must fail the check."""
    kept = []
    a = _inputs("attention")
    calls = [lambda: kept.append(ra.attention(a["q"], a["k"], a["v"]))]
    with pytest.raises(AssertionError, match="Python heap grew"):
        _leak_check(calls, [a["q"]], 0, 1000)
    kept.clear()
    with pytest.raises(AssertionError, match="reference counts"):
        _leak_check([lambda: kept.append(a["q"])], [a["q"]], 0, 50)
    kept.clear()


# ====================================================================== fork
def _child(conn, name):
    try:
        conn.send(("ok", (ra.get_num_threads(),) + _run(name, _inputs(name))))
    except BaseException as exc:    # report anything, the parent decides
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_kernels_work_in_a_forked_child():
    """GNU libgomp cannot start a thread team in a child forked after the parent used one
    (the child hangs on the parent's pool).  The extension notices the fork and runs
    single-threaded in such a child: same answers (results do not depend on the thread
    count), get_num_threads() == 1.  The parent uses OpenMP first (2 threads), then forks."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    if not ra.build_info()["openmp"]:
        pytest.skip("a build without OpenMP always runs one thread")
    ctx = multiprocessing.get_context("fork")
    saved = ra.get_num_threads()
    ra.set_num_threads(2)
    try:
        for name in ("attention", "routing_attention_backward", "combiner_attention_backward"):
            want = _run(name, _inputs(name))            # the parent's OpenMP team is now up
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(send, name))
            proc.start()
            send.close()
            if not recv.poll(60):
                proc.kill()
                proc.join()
                pytest.fail(f"{name}: the forked child hung (OpenMP after fork)")
            status, got = recv.recv()
            proc.join(30)
            assert status == "ok", f"{name}: the child raised {got}"
            assert proc.exitcode == 0, f"{name}: child exit code {proc.exitcode}"
            assert got[0] == 1, f"{name}: the child runs on {got[0]} threads, expected 1"
            assert ra.get_num_threads() == 2, "the parent keeps its threads"
            for x, y in zip(got[1:], want):
                assert np.array_equal(x, y), f"{name}: the child's answer differs"
    finally:
        ra.set_num_threads(saved)


# ====================================================================== inputs of other kinds
class _Duck:
    """An array of another library, as NumPy sees one (dask, cupy, xarray, ...): it
    converts through __array__, which would compute or copy it behind the caller's back."""

    def __init__(self, a):
        self._a = np.asarray(a)
        self.shape, self.dtype = self._a.shape, self._a.dtype

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def _foreign_inputs():
    rng = np.random.default_rng(21)
    a = {key: x[0] for key, x in _clustered(rng, np.float64).items()}       # n = m = 10
    a.update(q_idx=IDX, k_idx=IDX, x=a["q"], centroids=a["q"][:3], scores=a["q"][:, :3],
             codes=np.arange(10), planes=np.ones((3, 5)), mask=a["key_mask"],
             labels=np.arange(10) % 3, q3=a["q"][None], k3=a["k"][None], v3=a["v"][None])
    _, a["saved"] = ra.combiner_attention(a["q"], a["k"], a["v"], return_saved=True)
    return a


# (call, the array arguments it takes): every array argument goes through _checks
FOREIGN_CALLS = {
    "attention": (lambda a: ra.attention(a["q"], a["k"], a["v"], key_mask=a["key_mask"]),
                  ["q", "k", "v", "key_mask"]),
    "attention_backward": (lambda a: ra.attention_backward(
        a["dout"], a["q"], a["k"], a["v"], lse=np.zeros(10), output=np.zeros((10, 3))),
        ["dout", "q"]),
    "routing_attention_backward": (lambda a: ra.routing_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], a["q_idx"], a["k_idx"]), ["dout", "v", "q_idx", "k_idx"]),
    "local_attention": (lambda a: ra.local_attention(a["q"], a["k"], a["v"], 3), ["q", "k"]),
    "improved_clustered_attention": (lambda a: ra.improved_clustered_attention(
        a["q"], a["k"], a["v"], a["labels"], 3, 4, key_mask=a["key_mask"]),
        ["k", "labels", "key_mask"]),
    "combiner_attention_backward": (lambda a: ra.combiner_attention_backward(
        a["dout"], a["q"], a["k"], a["v"], **a["saved"]), ["dout", "q"]),
    "spherical_kmeans": (lambda a: ra.spherical_kmeans(a["x"], 3, mask=a["mask"]), ["x", "mask"]),
    "update_centroids": (lambda a: ra.update_centroids(a["centroids"], a["x"], a["labels"]),
                         ["centroids", "x", "labels"]),
    "top_members": (lambda a: ra.top_members(a["scores"], 2), ["scores"]),
    "members_from_labels": (lambda a: ra.members_from_labels(a["labels"], 3), ["labels"]),
    "lsh_hash": (lambda a: ra.lsh_hash(a["x"], a["planes"]), ["x", "planes"]),
    "hamming_kmeans": (lambda a: ra.hamming_kmeans(a["codes"], 3), ["codes"]),
    "RoutingAttention": (lambda a: ra.RoutingAttention(2)(      # q3: q with a heads axis
        a["q3"], a["k3"], a["v3"], key_mask=a["key_mask"]), ["q3", "v3", "key_mask"]),
    "ClusteredAttention": (lambda a: ra.ClusteredAttention(3)(a["q"], a["k"], a["v"]), ["q", "v"]),
}
FOREIGN = [pytest.param(fn, arg, id=f"{fn}-{arg}") for fn, (_, args) in FOREIGN_CALLS.items()
           for arg in args]


@pytest.mark.parametrize("fn, arg", FOREIGN)
def test_another_librarys_array_is_a_type_error_naming_it(fn, arg):
    call, _ = FOREIGN_CALLS[fn]
    a = _foreign_inputs()
    call(a)                                                   # the NumPy inputs work
    name = arg.rstrip("3")
    with pytest.raises(TypeError, match=rf"^{name} is a .*_Duck, not a NumPy array; convert it "
                                        rf"with np\.asarray\({name}\)"):
        call(dict(a, **{arg: _Duck(a[arg])}))
    call(dict(a, **{arg: a[arg].tolist()}))                   # lists keep working


def test_torch_and_jax_arrays_say_what_to_use():
    a = _foreign_inputs()
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"q is a torch\.Tensor; .*use routing_attention\.torch"):
        ra.attention(torch.from_numpy(a["q"]), a["k"], a["v"])
    with pytest.raises(TypeError, match=r"lse is a torch\.Tensor"):
        ra.combiner_attention_backward(a["dout"], a["q"], a["k"], a["v"],
                                       **dict(a["saved"], lse=torch.from_numpy(a["saved"]["lse"])))
    with pytest.raises(TypeError, match=r"scale is a torch\.Tensor"):
        ra.attention(a["q"], a["k"], a["v"], scale=torch.tensor(0.5))
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(TypeError, match=r"v is a jax.*not a NumPy array; .*np\.asarray\(v\)"):
        ra.combiner_attention(a["q"], a["k"], jnp.asarray(a["v"]))


def test_promotion_rules_as_the_readme_states():
    """README: a call computes in np.result_type of its inputs' dtypes, float16 as
    float32, integer/bool-only inputs as float64."""
    q = np.random.default_rng(22).standard_normal((6, 4))
    cases = [((np.float16,) * 3, np.float32), ((np.float32, np.float32, np.int64), np.float64),
             ((np.float32, np.int8, np.float32), np.float32), ((np.int64, np.int32, bool), np.float64),
             ((np.float32, np.float64, np.float32), np.float64)]
    for dtypes, want in cases:
        args = [(q * 3).astype(t) for t in dtypes]
        assert ra.attention(*args).dtype == want, dtypes
        assert ra.combiner_attention(*args).dtype == want, dtypes


# ====================================================================== awkward sizes (issue 19)
def test_a_mask_may_not_enlarge_the_batch():
    rng = np.random.default_rng(23)
    q, k, v = (rng.standard_normal((2, 3, 8, 4)) for _ in range(3))
    torch_style = np.ones((2, 1, 1, 8), bool)         # (B, 1, 1, m) for q (B, H, n, d)
    for call in (lambda m: ra.attention(q, k, v, key_mask=m),
                 lambda m: ra.clustered_attention(q, k, v, np.zeros((2, 3, 8), int), 1, key_mask=m)):
        with pytest.raises(ValueError, match=r"key_mask must have shape \(\.\.\., 8\) with leading "
                                             r"axes that broadcast to the batch axes \(2, 3\).*"
                                             r"got \(2, 1, 1, 8\).*key_mask\[\.\.\., 0, :\]"):
            call(torch_style)
        assert call(torch_style[..., 0, :]).shape == (2, 3, 8, 4)  # the fix the message gives
    layer = ra.RoutingAttention(2)              # a layer's mask is shared by the heads
    with pytest.raises(ValueError, match=r"batch axes \(2,\) of q without its heads axis.*"
                                         r"key_mask\[:, 0, 0, :\]"):
        layer(q, k, v, key_mask=torch_style)
    assert layer(q, k, v, key_mask=torch_style[:, 0, 0, :]).shape == (2, 3, 8, 4)
    with pytest.raises(ValueError, match=r"query_mask must have shape"):
        ra.ClusteredAttention(2)(q, k, v, query_mask=np.ones((5, 2, 3, 8), bool))


def test_local_attention_on_a_huge_sequence_raises_before_building_lists():
    q = _huge((2**31, 4))
    for call in (lambda: ra.local_attention(q, q, q, 4),
                 lambda: ra.local_attention_backward(q, q, q, q, 4),
                 lambda: ra.combiner_attention(q, q, q)):
        with pytest.raises(ValueError, match=r"q: a core dimension of 2147483648 exceeds the "
                                             r"supported maximum 1073741823"):
            call()


def test_empty_and_oversized_arguments_get_messages_that_make_sense():
    assert ra.members_from_labels(np.zeros(0, np.int64), 3).shape == (3, 0)
    assert ra.members_from_labels(np.zeros((2, 0), np.int64), 3).shape == (2, 3, 0)
    with pytest.raises(ValueError, match=r"x has no rows \(shape \(0, 4\)\): k-means needs at "
                                         r"least n_clusters = 1"):
        ra.spherical_kmeans(np.zeros((0, 4)), 1)
    with pytest.raises(ValueError, match=r"n_clusters must be <= the number of rows n = 3"):
        ra.spherical_kmeans(np.ones((3, 4)), 4)
    with pytest.raises(ValueError, match=r"codes has no rows"):
        ra.hamming_kmeans(np.zeros(0, np.int64), 2)
    empty = np.zeros((1, 2, 0, 4))
    with pytest.raises(ValueError, match=r"RoutingAttention needs at least one query and one key"):
        ra.RoutingAttention()(empty, empty, empty)
    with pytest.raises(ValueError, match=r"iters must be <= 9223372036854775807; got "
                                         r"18446744073709551616"):
        ra.spherical_kmeans(np.ones((3, 4)), 2, iters=2**64)
    with pytest.raises(ValueError, match=r"iters must be <="):
        ra.hamming_kmeans(np.arange(5), 2, iters=2**64)
    a = _qkv1()
    with pytest.raises(ValueError, match=r"scale must be finite; got a number too large"):
        ra.attention(a["q"], a["k"], a["v"], scale=10**400)
    f32 = [x.astype(np.float32) for x in (a["q"], a["k"], a["v"])]
    with pytest.raises(ValueError, match=r"scale=1e\+39 overflows float32"):
        ra.attention(*f32, scale=1e39)
    with pytest.raises(ValueError, match=r"scale=1e\+39 overflows float32"):
        ra.combiner_attention_backward(a["dout"].astype(np.float32), *f32, scale=1e39)
    with pytest.raises(ValueError, match=r"n must be <= 4096"):
        ra.set_num_threads(2**40)
    with pytest.raises(TypeError, match=r"n must be an integer"):
        ra.set_num_threads(2.0)
    assert ra.MAX_THREADS == 4096


# ====================================================================== out= arrays
def _out_cases():
    """(name, call(q, k, v, out=None, return_saved=False), backward(dout, q, k, v, saved))
    for every forward that takes out=, on (2, 9, 4) / (2, 9, 3) data."""
    q_idx = np.array([[0, 2, 4, 6, 8], [1, 3, 5, 7, -1]])
    k_idx = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [8, 6, 4, 2, 0, -1, -1, -1, -1]])
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1])
    return [
        ("attention", lambda q, k, v, **kw: ra.attention(q, k, v, causal=True, **kw),
         lambda g, q, k, v, s: ra.attention_backward(g, q, k, v, **s)),
        ("routing", lambda q, k, v, **kw: ra.routing_attention(q, k, v, q_idx, k_idx, **kw),
         lambda g, q, k, v, s: ra.routing_attention_backward(g, q, k, v, q_idx, k_idx, **s)),
        ("local", lambda q, k, v, **kw: ra.local_attention(q, k, v, 4, **kw),
         lambda g, q, k, v, s: ra.local_attention_backward(g, q, k, v, 4, **s)),
        ("clustered", lambda q, k, v, **kw: ra.clustered_attention(q, k, v, labels, 3, **kw),
         lambda g, q, k, v, s: ra.clustered_attention_backward(g, q, k, v, labels, 3, **s)),
        ("improved", lambda q, k, v, **kw: ra.improved_clustered_attention(q, k, v, labels, 3,
                                                                          topk=4, **kw),
         lambda g, q, k, v, s: ra.improved_clustered_attention_backward(g, q, k, v, labels, 3,
                                                                       topk=4, **s)),
        ("combiner", lambda q, k, v, **kw: ra.combiner_attention(q, k, v, block=3, causal=True,
                                                                 **kw),
         lambda g, q, k, v, s: ra.combiner_attention_backward(g, q, k, v, **s)),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("alias", ["q", "k", "v"])
def test_out_may_be_an_input(rng, case, alias):
    """out= may be one of the inputs (d = e): the result is the one a fresh array gets
    (the routing and local kernels once read rows already overwritten)."""
    name, call, _ = _out_cases()[case]
    q, k, v = (rng.standard_normal((2, 9, 3)) for _ in range(3))
    want = call(q, k, v)
    args = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
    got = call(args["q"], args["k"], args["v"], out=args[alias])
    assert got is args[alias], name
    np.testing.assert_array_equal(got, want, err_msg=f"{name}, out={alias}")


@pytest.mark.parametrize("case", range(6))
def test_lower_precision_out_keeps_the_saved_output_exact(rng, case):
    """float64 results into a float32 out=: out gets them rounded, and the saved dict keeps
    them at float64, so the backward from it equals the recomputing one."""
    name, call, backward = _out_cases()[case]
    q, k, v = (rng.standard_normal((2, 9, 3)) for _ in range(3))
    dout = rng.standard_normal((2, 9, 3))
    out32 = np.empty((2, 9, 3), np.float32)
    got, saved = call(q, k, v, out=out32, return_saved=True)
    want, want_saved = call(q, k, v, return_saved=True)
    assert got is out32
    np.testing.assert_array_equal(out32, want.astype(np.float32), err_msg=name)
    for key in ("output", "lse"):       # (slot arrays hold unused slots' leftovers)
        if key in want_saved:
            assert saved[key].dtype == want_saved[key].dtype, f"{name}: saved {key}"
            np.testing.assert_array_equal(saved[key], want_saved[key], err_msg=f"{name}: {key}")
    for a, b in zip(backward(dout, q, k, v, saved), backward(dout, q, k, v, want_saved)):
        np.testing.assert_array_equal(a, b, err_msg=name)
