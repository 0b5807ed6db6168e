"""Routing attention and local attention: C planner on the tile engine vs the reference."""
import numpy as np
import pytest

import routing_attention as ra
from routing_attention import _ext
from routing_attention import reference as ref
from conftest import LAYOUTS, assert_close, strided

DTYPES = [np.float32, np.float64]


def random_members(rng, batch, c, w, length, pad=0.0):
    """(batch…, c, w) lists of distinct positions in [0, length), some slots -1."""
    idx = np.empty(batch + (c, w), np.int64)
    for pos in np.ndindex(*batch, c):
        idx[pos] = rng.choice(length, w, replace=False)
    idx[rng.random(idx.shape) < pad] = -1
    return idx


def make(rng, dtype, batch, n, m, d, e):
    return tuple(rng.standard_normal(batch + shape).astype(dtype)
                 for shape in ((n, d), (m, d), (m, e)))


def check(q, k, v, q_idx, k_idx, dtype, tag, **kw):
    out, lse = ra.routing_attention(q, k, v, q_idx, k_idx, return_lse=True, **kw)
    rout, rlse = ref.routing_attention(q, k, v, q_idx, k_idx, return_lse=True, **kw)
    assert_close(out, rout, dtype, f"{tag} out")
    assert np.array_equal(np.isneginf(lse), np.isneginf(rlse)), f"{tag}: -inf lse differ"
    fin = np.isfinite(rlse)
    assert_close(np.where(fin, lse, 0), np.where(fin, rlse, 0), dtype, f"{tag} lse")
    dout = np.random.default_rng(3).standard_normal(out.shape).astype(dtype)
    got = ra.routing_attention_backward(dout, q, k, v, q_idx, k_idx, **kw)
    want = ref.routing_attention_backward(dout, q, k, v, q_idx, k_idx, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, r, dtype, f"{tag} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("merge", ["mean", "lse"])
def test_matches_reference(rng, dtype, causal, exclude_self, merge):
    n, d, e, c, w = 90, 12, 7, 6, 20
    q, k, v = make(rng, dtype, (2,), n, n, d, e)
    q_idx = random_members(rng, (2,), c, w, n, pad=0.1)   # tokens in 0, 1 or more clusters
    k_idx = q_idx if exclude_self else random_members(rng, (2,), c, w + 5, n, pad=0.1)
    check(q, k, v, q_idx, k_idx, dtype, f"causal={causal} excl={exclude_self} {merge}",
          causal=causal, exclude_self=exclude_self, merge=merge)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_clusters_span_several_tiles(rng, dtype):
    n, c = 700, 2
    q, k, v = make(rng, dtype, (), n, n, 16, 16)
    q_idx = random_members(rng, (), c, 300, n)          # > 128 queries per cluster: several tiles
    k_idx = random_members(rng, (), c, 600, n)          # > 256 keys per cluster
    check(q, k, v, q_idx, k_idx, dtype, "big clusters", causal=True, merge="lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_one_cluster_is_dense_attention(rng, dtype, causal):
    q, k, v = make(rng, dtype, (3,), 70, 70, 8, 5)
    everyone = np.arange(70)[None, :]
    for merge in ("mean", "lse"):
        got = ra.routing_attention(q, k, v, everyone, everyone, causal=causal, merge=merge)
        assert_close(got, ref.attention(q, k, v, causal=causal), dtype, f"one cluster {merge}")
        assert_close(got, ra.attention(q, k, v, causal=causal), dtype, "one cluster vs engine")


def test_lse_merge_is_softmax_over_concatenated_lists(rng):
    """Query lists overlap, key lists are disjoint: lse merge = dense attention over the
    union of the key lists of the query's clusters."""
    n = 40
    q, k, v = make(rng, np.float64, (), n, n, 6, 4)
    perm = rng.permutation(n)
    k_idx = perm.reshape(4, 10)
    q_idx = np.stack([np.arange(0, 20), np.arange(10, 30), np.arange(20, 40), np.arange(5, 25)])
    out = ra.routing_attention(q, k, v, q_idx, k_idx, merge="lse")
    for i in range(n):
        clusters = [c for c in range(4) if i in q_idx[c]]
        mask = np.zeros(n, bool)
        mask[k_idx[clusters].ravel()] = True
        want = ref.attention(q[i:i + 1], k, v, key_mask=mask)[0]
        assert_close(out[i], want, np.float64, f"token {i}")


def test_tokens_in_no_cluster_get_zero(rng):
    q, k, v = make(rng, np.float64, (), 30, 30, 4, 3)
    q_idx = np.array([[0, 1, 2, -1], [5, 6, -1, -1]])
    out, lse = ra.routing_attention(q, k, v, q_idx, q_idx, return_lse=True)
    lonely = np.setdiff1d(np.arange(30), [0, 1, 2, 5, 6])
    assert np.all(out[lonely] == 0) and np.all(np.isneginf(lse[lonely]))
    dq, dk, dv = ra.routing_attention_backward(np.ones((30, 3)), q, k, v, q_idx, q_idx)
    assert np.all(dq[lonely] == 0) and np.all(dk[lonely] == 0) and np.all(dv[lonely] == 0)


def test_exclude_self_falls_back_to_self(rng):
    q, k, v = make(rng, np.float64, (), 10, 10, 4, 3)
    idx = np.array([[2, 5, 7]])
    out = ra.routing_attention(q, k, v, idx, idx, causal=True, exclude_self=True)
    # under causal, position 2 sees only itself in its cluster: output v[2]
    assert_close(out[2], v[2], np.float64, "self fallback")
    # position 5 sees key 2 only (self excluded)
    assert_close(out[5], v[2], np.float64, "self excluded")
    # the fallback is the softmax of one logit: NaN when that logit is not finite, as in
    # the reference (it used to give v[2] whatever the logit)
    # (a logit of -inf: the key is not seen, output 0 and zero gradients, as the reference)
    for sign, value in ((1, np.nan), (1, np.inf), (-1, np.inf)):
        bad = q.copy()
        bad[2, :] = 0
        bad[2, 0] = sign * np.sign(k[2, 0]) * value
        with np.errstate(invalid="ignore"):
            out = ra.routing_attention(bad, k, v, idx, idx, causal=True, exclude_self=True)
            want = ref.routing_attention(bad, k, v, idx, idx, causal=True, exclude_self=True)
        assert np.array_equal(np.isnan(out), np.isnan(want)), (sign, value)
        assert_close(np.nan_to_num(out), np.nan_to_num(want), np.float64, f"{sign * value}")
    bad[2, 0] = -np.sign(k[2, 0]) * np.inf
    dout = np.ones((10, 3))
    with np.errstate(invalid="ignore"):     # inf · 0 in the products of other rows
        got = ra.routing_attention_backward(dout, bad, k, v, idx, idx, causal=True,
                                            exclude_self=True)
    assert np.all(got[0][2] == 0)           # query 2 saw nothing: no gradient


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_membership_over_heads(rng, dtype):
    q, k, v = make(rng, dtype, (2, 3), 40, 40, 8, 8)
    q_idx = random_members(rng, (3,), 4, 10, 40)        # per head, broadcast over batch
    k_idx = random_members(rng, (1,), 4, 15, 40)
    assert ra.routing_attention(q, k, v, q_idx, k_idx).shape == (2, 3, 40, 8)
    check(q, k, v, q_idx, k_idx, dtype, "broadcast", causal=True, merge="lse")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_layouts(rng, layout):
    q, k, v = make(rng, np.float32, (2,), 50, 60, 8, 6)
    q_idx = random_members(rng, (2,), 5, 10, 50)
    k_idx = random_members(rng, (2,), 5, 12, 60)
    want = ra.routing_attention(q, k, v, q_idx, k_idx, causal=True)
    got = ra.routing_attention(strided(q, layout), strided(k, layout), strided(v, layout),
                               strided(q_idx, layout), strided(k_idx, layout), causal=True)
    assert np.array_equal(got, want), layout
    check(strided(q, layout), strided(k, layout), strided(v, layout), q_idx, k_idx,
          np.float32, layout, causal=True)


def test_out_argument(rng):
    q, k, v = make(rng, np.float64, (), 20, 20, 4, 3)
    idx = random_members(rng, (), 2, 10, 20)
    buf = np.zeros((3, 20))
    res = ra.routing_attention(q, k, v, idx, idx, out=buf.T)
    assert res.base is buf or res is buf.T or np.shares_memory(res, buf)
    assert np.array_equal(buf.T, ra.routing_attention(q, k, v, idx, idx))


def test_degenerate_sizes(rng):
    q, k, v = make(rng, np.float64, (), 1, 1, 1, 1)
    idx = np.zeros((1, 1), np.int64)
    check(q, k, v, idx, idx, np.float64, "n=d=1", causal=True)
    q, k, v = make(rng, np.float64, (), 5, 5, 3, 2)
    empty = np.full((2, 3), -1)
    out = ra.routing_attention(q, k, v, empty, empty)
    assert np.all(out == 0)
    # a zero-length sequence: the saved statistics have no element (any strides will do;
    # the kernel used to refuse them as not C-contiguous)
    q, k, v = make(rng, np.float64, (2,), 0, 0, 3, 4)
    out, saved = ra.local_attention(q, k, v, 4, return_saved=True)
    for g, x in zip(ra.local_attention_backward(np.zeros_like(out), q, k, v, **saved), (q, k, v)):
        assert g.shape == x.shape


def test_finite_differences_float64(rng):
    n, d, e = 12, 3, 2
    q, k, v = make(rng, np.float64, (), n, n, d, e)
    q_idx = np.array([[0, 3, 5, 7, 11, -1], [1, 3, 4, 8, 9, 10], [2, 5, 6, 7, 8, -1]])
    k_idx = np.array([[0, 1, 3, 5, 9, -1], [3, 4, 8, 10, 11, 2], [2, 5, 6, 7, 8, 1]])
    w = rng.standard_normal((n, e))
    for merge in ("mean", "lse"):
        for exclude_self, kk in ((False, k_idx), (True, q_idx)):
            kw = dict(causal=True, exclude_self=exclude_self, merge=merge)
            grads = ra.routing_attention_backward(w, q, k, v, q_idx, kk, **kw)
            for which, g in enumerate(grads):
                num = np.zeros_like(g)
                for idx in np.ndindex(g.shape):
                    args = [q.copy(), k.copy(), v.copy()]
                    args[which][idx] += 1e-6
                    up = np.sum(w * ra.routing_attention(*args, q_idx, kk, **kw))
                    args[which][idx] -= 2e-6
                    down = np.sum(w * ra.routing_attention(*args, q_idx, kk, **kw))
                    num[idx] = (up - down) / 2e-6
                err = np.max(np.abs(num - g))
                assert err < 1e-8, f"{merge} exclude_self={exclude_self} d{'qkv'[which]}: {err:.2e}"


def test_thread_count_bit_identical(rng):
    q, k, v = make(rng, np.float32, (2,), 400, 400, 32, 32)
    q_idx = random_members(rng, (2,), 20, 40, 400)
    k_idx = random_members(rng, (2,), 20, 50, 400)
    dout = rng.standard_normal((2, 400, 32)).astype(np.float32)
    res = {}
    try:
        for t in (1, 2):
            ra.set_num_threads(t)
            res[t] = (ra.routing_attention(q, k, v, q_idx, k_idx, causal=True, merge="lse"),) + \
                ra.routing_attention_backward(dout, q, k, v, q_idx, k_idx, causal=True, merge="lse")
    finally:
        ra.set_num_threads(0)
    for a, b in zip(res[1], res[2]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("bad, message", [
    (dict(q_idx=np.array([[0, 30]])), r"q_idx has entries outside \[-1, 20\)"),
    (dict(k_idx=np.array([[0, -2]])), r"k_idx has entries outside"),
    (dict(q_idx=np.array([[1, 2, 1]])), "q_idx repeats a position"),
    (dict(k_idx=np.array([[4, 4]])), "k_idx repeats a position"),
    (dict(q_idx=np.array([[0.0, 1.0]])), "q_idx must be an integer array"),
    (dict(q_idx=np.array([0, 1])), "q_idx must have shape"),
    (dict(k_idx=np.array([[0, 1], [2, 3]])), "same number of clusters"),
    (dict(merge="max"), "merge must be one of"),
])
def test_bad_input(rng, bad, message):
    q, k, v = make(rng, np.float64, (), 20, 20, 4, 3)
    args = dict(q_idx=np.array([[0, 1, 2]]), k_idx=np.array([[0, 1]]))
    kw = {}
    for name, value in bad.items():
        (args if name in args else kw)[name] = value
    with pytest.raises((ValueError, TypeError), match=message):
        ra.routing_attention(q, k, v, args["q_idx"], args["k_idx"], **kw)


def test_kernel_checks_indices_itself(rng):
    """The C planner validates memberships before use, even when called directly."""
    q, k, v = make(rng, np.float64, (), 20, 20, 4, 3)
    for bad in (np.array([[0, 25]]), np.array([[3, 3]]), np.array([[-7, 1]])):
        with pytest.raises(ValueError, match="index out of range or repeated"):
            _ext._routing_forward(q, k, v, bad, bad, 0.5, False, False, False, 0, 0, np.empty(0))
        unused = [np.zeros((20, 3)), np.zeros(20), np.zeros((1, 2, 3)), np.zeros((1, 2)),
                  np.zeros((1, 2), bool)]
        with pytest.raises(ValueError, match="index out of range or repeated"):
            _ext._routing_backward(np.ones((20, 3)), q, k, v, bad, bad, *unused, False, 0.5,
                                   False, False, False, 0, 0, np.empty(0))


# ------------------------------------------------------------------ local attention
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, window", [(100, 16), (64, 64), (37, 5), (10, 1), (5, 20)])
def test_local_attention_matches_reference(rng, dtype, causal, n, window):
    q, k, v = make(rng, dtype, (2,), n, n, 8, 6)
    out = ra.local_attention(q, k, v, window, causal=causal)
    assert_close(out, ref.local_attention(q, k, v, window, causal=causal), dtype, "local fwd")
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = ra.local_attention_backward(dout, q, k, v, window, causal=causal)
    want = ref.local_attention_backward(dout, q, k, v, window, causal=causal)
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, r, dtype, f"local {name}")


def test_local_attention_bad_window(rng):
    q, k, v = make(rng, np.float64, (), 10, 10, 4, 3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        ra.local_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="window must be an integer"):
        ra.local_attention(q, k, v, 2.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("merge", ["mean", "lse"])
def test_saved_statistics_skip_the_recompute(rng, dtype, merge):
    """backward(**saved) gives bit-identical gradients to the recomputing backward."""
    n = 120
    q, k, v = make(rng, dtype, (2,), n, n, 16, 8)
    q_idx = random_members(rng, (2,), 8, 30, n, pad=0.1)
    kw = dict(causal=True, exclude_self=True, merge=merge)
    out, saved = ra.routing_attention(q, k, v, q_idx, q_idx, return_saved=True, **kw)
    assert np.array_equal(out, ra.routing_attention(q, k, v, q_idx, q_idx, **kw))
    assert saved["slot_self"].any(), "the exclude_self fallback is exercised"
    dout = rng.standard_normal(out.shape).astype(dtype)
    plain = ra.routing_attention_backward(dout, q, k, v, q_idx, q_idx, **kw)
    fast = ra.routing_attention_backward(dout, q, k, v, q_idx, q_idx, **kw, **saved)
    for a, b in zip(plain, fast):
        assert np.array_equal(a, b)
    # a dout with a batch axis more than the forward's: the statistics broadcast
    d3 = np.stack([dout, 2 * dout, -dout])
    for a, b in zip(ra.routing_attention_backward(d3, q, k, v, q_idx, q_idx, **kw),
                    ra.routing_attention_backward(d3, q, k, v, q_idx, q_idx, **kw, **saved)):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="pass all saved statistics"):
        ra.routing_attention_backward(dout, q, k, v, q_idx, q_idx, lse=saved["lse"], **kw)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ra.routing_attention_backward(dout, q, k, v, q_idx, q_idx, bogus=1, **kw)
    bad = dict(saved, slot_lse=saved["slot_lse"][:1])
    with pytest.raises(ValueError, match="slot_lse must have shape"):
        ra.routing_attention_backward(dout, q, k, v, q_idx, q_idx, **kw, **bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slot_rows_kept_only_for_tokens_in_several_clusters(rng, dtype):
    """saved["slot_output"]: a token in several clusters has each cluster's own output in
    its slots; a token in one cluster has its row in the merged output only, and the
    backward reads it there (poisoning its slot rows changes no gradient)."""
    n = 90
    q, k, v = make(rng, dtype, (), n, n, 8, 5)
    q_idx = random_members(rng, (), 6, 25, n, pad=0.1)
    out, saved = ra.routing_attention(q, k, v, q_idx, q_idx, causal=True, return_saved=True)
    slots = saved["slot_output"]
    counts = np.bincount(q_idx[q_idx >= 0], minlength=n)
    assert (counts == 1).any() and (counts > 1).any(), "both kinds of token are exercised"
    for cl in range(q_idx.shape[0]):
        own = ref.routing_attention(q, k, v, q_idx[cl:cl + 1], q_idx[cl:cl + 1], causal=True)
        for r, i in enumerate(q_idx[cl][q_idx[cl] >= 0]):   # slot r: the r-th listed member
            if counts[i] > 1:
                assert_close(slots[cl, r], own[i], dtype, f"slot ({cl}, {r}) of token {i}")
            else:
                slots[cl, r] = np.nan
    dout = rng.standard_normal(out.shape).astype(dtype)
    plain = ra.routing_attention_backward(dout, q, k, v, q_idx, q_idx, causal=True)
    fast = ra.routing_attention_backward(dout, q, k, v, q_idx, q_idx, causal=True, **saved)
    for a, b in zip(plain, fast):
        assert np.array_equal(a, b)
