"""Property-based tests (hypothesis): random shapes (sizes of 1 included), dtypes, memory
layouts (Fortran order, gaps, negative strides), broadcast batches, masks and memberships
for every method and the routing decisions, each checked against its twin in
`routing_attention.reference`.

Profiles (registered in conftest.py): "fast" (default, ~30 examples per test) and
"thorough" (`pytest tests/test_properties.py --hypothesis-profile=thorough`).
"""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import routing_attention as ra  # noqa: E402
from routing_attention import reference as ref  # noqa: E402
from conftest import LAYOUTS, assert_close, strided  # noqa: E402

DTYPES = st.sampled_from([np.float32, np.float64])
SIZE = st.integers(1, 9)
FEAT = st.integers(1, 6)
BATCH = st.sampled_from([(), (1,), (2,), (2, 1)])


@st.composite
def tensors(draw, n_max=9, same_nm=False):
    """(dtype, q, k, v, dout, rng) in random layouts; k/v may broadcast against q."""
    dtype = draw(DTYPES)
    n = draw(st.integers(1, n_max))
    m = n if same_nm else draw(st.integers(1, n_max))
    d, e = draw(FEAT), draw(FEAT)
    bq = draw(BATCH)
    bk = draw(st.sampled_from([bq, bq[1:], ()]))       # k, v broadcast over q's batch
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lay = [draw(st.sampled_from(LAYOUTS)) for _ in range(4)]
    q = strided(rng.standard_normal(bq + (n, d)).astype(dtype), lay[0])
    k = strided(rng.standard_normal(bk + (m, d)).astype(dtype), lay[1])
    v = strided(rng.standard_normal(bk + (m, e)).astype(dtype), lay[2])
    dout = strided(rng.standard_normal(bq + (n, e)).astype(dtype), lay[3])
    return dtype, q, k, v, dout, rng


def members(rng, batch, c, w, length, pad):
    """(batch…, c, w) lists of distinct positions in [0, length), a fraction -1."""
    w = min(w, length)
    idx = np.empty(batch + (c, w), np.int64)
    for pos in np.ndindex(*batch, c):
        idx[pos] = rng.choice(length, w, replace=False)
    idx[rng.random(idx.shape) < pad] = -1
    return idx


def compare_lse(got, want, dtype, what):
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), f"{what}: -inf entries differ"
    fin = np.isfinite(want)
    assert_close(np.where(fin, got, 0), np.where(fin, want, 0), dtype, what)


def compare_grads(got, want, dtype, what):
    for name, g, r in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, r, dtype, f"{what} {name}")


@given(tensors(), st.booleans(), st.booleans(), st.sampled_from([None, 0.3]), st.data())
def test_attention(t, causal, masked, scale, data):
    dtype, q, k, v, dout, rng = t
    m = k.shape[-2]
    mask = None
    if masked:
        mask_batch = data.draw(st.sampled_from([(), q.shape[:-2]]))
        mask = rng.random(mask_batch + (m,)) < 0.7
    kw = dict(causal=causal, key_mask=mask, scale=scale)
    out, lse = ra.attention(q, k, v, return_lse=True, **kw)
    rout, rlse = ref.attention(q, k, v, return_lse=True, **kw)
    what = f"attention {q.shape} {k.shape} {v.shape} {kw}"
    assert_close(out, rout, dtype, what)
    compare_lse(lse, rlse, dtype, what + " lse")
    compare_grads(ra.attention_backward(dout, q, k, v, **kw),
                  ref.attention_backward(dout, q, k, v, **kw), dtype, what)


@given(tensors(), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), st.booleans(),
       st.booleans(), st.sampled_from(["mean", "lse"]), st.sampled_from([0.0, 0.3]))
def test_routing_attention(t, c, w, u, causal, exclude_self, merge, pad):
    dtype, q, k, v, dout, rng = t
    n, m = q.shape[-2], k.shape[-2]
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    q_idx = members(rng, batch, c, w, n, pad)
    k_idx = members(rng, batch, c, u, m, pad)
    kw = dict(causal=causal, exclude_self=exclude_self, merge=merge)
    out, lse = ra.routing_attention(q, k, v, q_idx, k_idx, return_lse=True, **kw)
    rout, rlse = ref.routing_attention(q, k, v, q_idx, k_idx, return_lse=True, **kw)
    what = f"routing {q.shape} {k.shape} {v.shape} c={c} {kw}"
    assert_close(out, rout, dtype, what)
    compare_lse(lse, rlse, dtype, what + " lse")
    compare_grads(ra.routing_attention_backward(dout, q, k, v, q_idx, k_idx, **kw),
                  ref.routing_attention_backward(dout, q, k, v, q_idx, k_idx, **kw), dtype, what)


@given(tensors(), st.integers(1, 12), st.booleans())
def test_local_attention(t, window, causal):
    dtype, q, k, v, dout, rng = t
    what = f"local {q.shape} {k.shape} window={window} causal={causal}"
    assert_close(ra.local_attention(q, k, v, window, causal=causal),
                 ref.local_attention(q, k, v, window, causal=causal), dtype, what)
    compare_grads(ra.local_attention_backward(dout, q, k, v, window, causal=causal),
                  ref.local_attention_backward(dout, q, k, v, window, causal=causal), dtype, what)


@given(tensors(n_max=16, same_nm=True), st.sampled_from(["fixed", "axial", "logsparse", "mixture"]),
       st.booleans(), st.data())
def test_combiner_attention(t, plan, causal, data):
    dtype, q, k, v, dout, rng = t
    n = q.shape[-2]
    block = None if plan == "logsparse" else data.draw(st.sampled_from([None, 1, n, (n + 1) // 2]))
    kw = dict(plan=plan, block=block, causal=causal)
    what = f"combiner {q.shape} {k.shape} {kw}"
    assert_close(ra.combiner_attention(q, k, v, **kw), ref.combiner_attention(q, k, v, **kw),
                 dtype, what)
    compare_grads(ra.combiner_attention_backward(dout, q, k, v, **kw),
                  ref.combiner_attention_backward(dout, q, k, v, **kw), dtype, what)


@given(tensors(), st.integers(1, 4), st.sampled_from([0, 1, 3, 20]), st.booleans(), st.data())
def test_clustered_attention(t, n_clusters, topk, masked, data):
    """Plain (topk 0) and improved clustered attention, random labels (-1 included)."""
    dtype, q, k, v, dout, rng = t
    n_clusters = min(n_clusters, q.shape[-2])       # the API asks for n_clusters <= n
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    labels = rng.integers(-1, n_clusters, batch + (q.shape[-2],))
    mask = (rng.random(batch + (k.shape[-2],)) < 0.7) if masked else None
    kw = dict(key_mask=mask)
    what = f"clustered {q.shape} {k.shape} C={n_clusters} topk={topk} masked={masked}"
    if topk == 0:
        got = ra.clustered_attention(q, k, v, labels, n_clusters, **kw)
        want = ref.clustered_attention(q, k, v, labels, n_clusters, **kw)
        grads = (ra.clustered_attention_backward(dout, q, k, v, labels, n_clusters, **kw),
                 ref.clustered_attention_backward(dout, q, k, v, labels, n_clusters, **kw))
    else:
        got = ra.improved_clustered_attention(q, k, v, labels, n_clusters, topk, **kw)
        want = ref.improved_clustered_attention(q, k, v, labels, n_clusters, topk, **kw)
        grads = (ra.improved_clustered_attention_backward(dout, q, k, v, labels, n_clusters, topk, **kw),
                 ref.improved_clustered_attention_backward(dout, q, k, v, labels, n_clusters, topk, **kw))
    assert_close(got, want, dtype, what)
    compare_grads(*grads, dtype, what)


@given(st.integers(1, 40), st.integers(1, 9), st.integers(1, 6), BATCH, DTYPES,
       st.sampled_from(LAYOUTS), st.integers(0, 2**32 - 1), st.data())
def test_routing_decisions(n, c, d, batch, dtype, layout, seed, data):
    """assign_clusters, top_members, members_from_labels and lsh_hash equal their
    references exactly.  Small integer values make products exact in both precisions,
    so ties are real ties and exercise the tie rules."""
    rng = np.random.default_rng(seed)
    x = strided(rng.integers(-3, 4, batch + (n, d)).astype(dtype), layout)
    cent = rng.integers(-3, 4, (c, d)).astype(dtype)
    labels = ra.assign_clusters(x, cent)
    assert np.array_equal(labels, ref.assign_clusters(x, cent)), "assign_clusters"
    scores = strided(rng.integers(-4, 5, batch + (n, c)).astype(dtype), layout)
    w = data.draw(st.integers(1, n))
    assert np.array_equal(ra.top_members(scores, w), ref.top_members(scores, w)), "top_members"
    assert np.array_equal(ra.members_from_labels(labels, c), ref.members_from_labels(labels, c))
    bits = data.draw(st.integers(1, 63))
    planes = rng.integers(-2, 3, (bits, d + 1)).astype(np.float64)
    xd = x.astype(np.float64)
    assert np.array_equal(ra.lsh_hash(xd, planes), ref.lsh_hash(xd, planes)), "lsh_hash"
