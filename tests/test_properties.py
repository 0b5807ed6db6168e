"""Property-based tests (hypothesis): random shapes (sizes of 1 included), dtypes, memory
layouts (Fortran order, gaps, negative strides), broadcast batches, masks and memberships
for every method, each checked against its dense float64 twin in `routing_attention.reference`.

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
