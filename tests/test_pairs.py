"""Attention dropout and relative position bias (routing_attention.pairs) in every method
that takes them, against the dense reference, by finite differences, and statistically."""
import numpy as np
import pytest

import routing_attention as ra
from routing_attention import reference as ref
from routing_attention.pairs import (alibi_slopes, relative_bias, relative_bias_backward,
                                     t5_buckets)

from conftest import LAYOUTS, assert_close, numeric_grad, strided

B, H = 2, 3


def members(rng, heads, n, c, w):
    """Random membership lists (heads, c, w) with some empty slots."""
    idx = np.stack([np.stack([rng.permutation(n)[:w] for _ in range(c)]) for _ in range(heads)])
    idx[:, :, -2:] = -1
    return idx


def problem(rng, dtype, n, m, d=6, e=5, batch=(B, H)):
    q, k, v = (rng.standard_normal(batch + s).astype(dtype) for s in ((n, d), (m, d), (m, e)))
    bias = relative_bias(n, m, alibi=alibi_slopes(H), table=rng.standard_normal((H, 16)))
    return q, k, v, bias


def methods(rng, n):
    """(name, forward, backward, reference forward, reference backward, extra args, kw)."""
    q_idx = members(rng, H, n, 5, 12)
    return [
        ("dense", ra.attention, ra.attention_backward, ref.attention, ref.attention_backward,
         (), dict(causal=True)),
        ("dense-bidirectional", ra.attention, ra.attention_backward, ref.attention,
         ref.attention_backward, (), dict(causal=False)),
        ("routing-mean", ra.routing_attention, ra.routing_attention_backward,
         ref.routing_attention, ref.routing_attention_backward, (q_idx, q_idx),
         dict(causal=True, merge="mean")),
        ("routing-lse-shared", ra.routing_attention, ra.routing_attention_backward,
         ref.routing_attention, ref.routing_attention_backward, (q_idx, q_idx),
         dict(exclude_self=True, merge="lse")),
        ("local", ra.local_attention, ra.local_attention_backward, ref.local_attention,
         ref.local_attention_backward, (7,), dict(causal=True)),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", range(5))
@pytest.mark.parametrize("terms", ["dropout", "bias", "both"])
def test_matches_reference(dtype, which, terms):
    rng = np.random.default_rng(which)
    n = 40
    name, fwd, bwd, rfwd, rbwd, extra, kw = methods(rng, n)[which]
    q, k, v, bias = problem(rng, dtype, n, n)
    if name == "routing-lse-shared":
        k = q
    if terms != "bias":
        kw.update(dropout_p=0.3, dropout_seed=11)
    if terms != "dropout":
        kw.update(rel_bias=bias)
    out = fwd(q, k, v, *extra, **kw)
    assert_close(out, rfwd(q, k, v, *extra, **kw), dtype, f"{name} out")
    dout = rng.standard_normal(out.shape).astype(dtype)
    got, want = bwd(dout, q, k, v, *extra, **kw), rbwd(dout, q, k, v, *extra, **kw)
    assert len(got) == len(want) == (4 if "rel_bias" in kw else 3)
    for g, w, what in zip(got, want, ("dq", "dk", "dv", "drel_bias")):
        assert_close(g, w, dtype, f"{name} {what}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_masks_and_out(layout):
    """Awkward strides, a broadcast bias (one per head), masked keys, n = 1 and out=."""
    rng = np.random.default_rng(5)
    for n, m, d in ((33, 70, 4), (1, 9, 1)):
        q, k, v, _ = problem(rng, np.float64, n, m, d=d)
        bias = relative_bias(n, m, alibi=alibi_slopes(H))          # (H, n + m - 1)
        mask = rng.random((B, 1, m)) < 0.7
        kw = dict(key_mask=mask, dropout_p=0.2, dropout_seed=2, rel_bias=strided(bias[:, None], layout)[:, 0])
        out = np.empty((B, H, n, v.shape[-1]))
        res = ra.attention(strided(q, layout), strided(k, layout), v, out=out, **kw)
        assert res is out
        assert_close(out, ref.attention(q, k, v, **kw), np.float64, f"{layout} out")
        dout = rng.standard_normal(out.shape)
        for g, w in zip(ra.attention_backward(dout, strided(q, layout), k, strided(v, layout), **kw),
                        ref.attention_backward(dout, q, k, v, **kw)):
            assert_close(g, w, np.float64, f"{layout} grads")


@pytest.mark.parametrize("which", [0, 2, 4])
def test_finite_differences(which):
    """float64 gradients, rel_bias's included, by central differences at a fixed seed."""
    rng = np.random.default_rng(7)
    n = 12
    name, fwd, bwd, _, _, extra, kw = methods(rng, n)[which]
    if extra and np.ndim(extra[0]):
        extra = (members(rng, 1, n, 3, 6)[0],) * 2
    q, k, v, _ = problem(rng, np.float64, n, n, d=3, e=2, batch=())
    bias = rng.standard_normal(2 * n - 1)
    kw.update(dropout_p=0.25, dropout_seed=4, rel_bias=bias)
    dout = rng.standard_normal((n, 2))

    def loss():
        return float((fwd(q, k, v, *extra, **kw) * dout).sum())
    grads = bwd(dout, q, k, v, *extra, **kw)
    for x, g, what in zip((q, k, v, bias), grads, ("dq", "dk", "dv", "drel_bias")):
        num = numeric_grad(loss, x)
        assert np.abs(g - num).max() <= 1e-7 * max(1.0, np.abs(num).max()), f"{name} {what}"


def test_keep_rate_and_rescaling():
    """With v = I the output is the dropped weight matrix itself: the kept fraction is
    1 - p within binomial noise, kept weights are p_ij / (1 - p), every problem of a
    batch and every seed draws its own mask, and the same seed the same one."""
    rng = np.random.default_rng(3)
    n = m = 256
    p = 0.375          # a multiple of 2^-24: exactly the probability the mask uses
    q = rng.standard_normal((2, n, 8))
    k = rng.standard_normal((2, m, 8))
    v = np.broadcast_to(np.eye(m), (2, m, m))
    plain = ra.attention(q, k, v)
    dropped = ra.attention(q, k, v, dropout_p=p, dropout_seed=123)
    kept = dropped != 0
    rate = kept.mean()
    assert abs(rate - (1 - p)) < 5 * np.sqrt(p * (1 - p) / kept.size)
    np.testing.assert_allclose(dropped[kept], plain[kept] / (1 - p), rtol=1e-12)
    assert (kept[0] != kept[1]).mean() > 0.3                    # problems differ
    again = ra.attention(q, k, v, dropout_p=p, dropout_seed=123)
    other = ra.attention(q, k, v, dropout_p=p, dropout_seed=124)
    assert np.array_equal(dropped, again)
    assert ((other != 0) != kept).mean() > 0.3


def test_no_terms_is_the_plain_kernel():
    rng = np.random.default_rng(9)
    q, k, v, _ = problem(rng, np.float32, 50, 60)
    a = ra.attention(q, k, v, causal=True)
    b = ra.attention(q, k, v, causal=True, dropout_p=0.0, dropout_seed=5,
                     rel_bias=np.zeros(109, np.float32))
    assert np.array_equal(a, b)


def test_thread_count_does_not_change_bits():
    rng = np.random.default_rng(2)
    n = 300
    q, k, v, bias = problem(rng, np.float32, n, n)
    q_idx = members(rng, H, n, 6, 80)
    kw = dict(dropout_p=0.3, dropout_seed=99, rel_bias=bias)
    results = []
    for threads in (1, 2):
        ra.set_num_threads(threads)
        try:
            o = ra.attention(q, k, v, causal=True, **kw)
            g = ra.attention_backward(o, q, k, v, causal=True, **kw)
            ro = ra.routing_attention(q, k, v, q_idx, q_idx, merge="lse", **kw)
            rg = ra.routing_attention_backward(ro, q, k, v, q_idx, q_idx, merge="lse", **kw)
        finally:
            ra.set_num_threads(0)
        results.append((o, *g, ro, *rg))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_saved_keywords_carry_the_dropout():
    rng = np.random.default_rng(4)
    q, k, v, bias = problem(rng, np.float64, 20, 20)
    out, saved = ra.attention(q, k, v, dropout_p=0.5, dropout_seed=8, rel_bias=bias,
                              return_saved=True)
    dout = rng.standard_normal(out.shape)
    got = ra.attention_backward(dout, q, k, v, rel_bias=bias, **saved)
    want = ref.attention_backward(dout, q, k, v, dropout_p=0.5, dropout_seed=8, rel_bias=bias)
    for g, w in zip(got, want):
        assert_close(g, w, np.float64, "from saved")
    with pytest.raises(ValueError, match="dropout_seed"):
        ra.attention_backward(dout, q, k, v, dropout_seed=9, **saved)


@pytest.mark.parametrize("kw, error, match", [
    (dict(dropout_p=1.0, dropout_seed=1), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1, dropout_seed=1), ValueError, "dropout_p"),
    (dict(dropout_p=0.1), ValueError, "dropout_seed"),
    (dict(dropout_p=0.1, dropout_seed=-3), ValueError, "dropout_seed"),
    (dict(dropout_p="0.1", dropout_seed=1), TypeError, "dropout_p"),
    (dict(rel_bias=np.zeros(5)), ValueError, "rel_bias"),
    (dict(rel_bias=np.zeros((7, 19))), ValueError, "broadcast"),
])
def test_bad_arguments_name_themselves(kw, error, match):
    q = np.zeros((2, 10, 4))
    with pytest.raises(error, match=match):
        ra.attention(q, q, q, **kw)
    with pytest.raises(error, match=match):
        ra.routing_attention(q, q, q, np.arange(10)[None], np.arange(10)[None], **kw)


def test_raw_gufunc_checks_its_pair_operands():
    q = np.zeros((10, 4))
    with pytest.raises(ValueError, match="threshold"):
        ra._ext._attention_forward(q, q, q, np.ones(10, bool), False, 0.5, False, 1 << 24, 0,
                                   np.empty(0))
    with pytest.raises(ValueError, match="n \\+ m - 1"):
        ra._ext._attention_forward(q, q, q, np.ones(10, bool), False, 0.5, False, 0, 0,
                                   np.zeros(5))


def test_t5_buckets_and_bias_gradients():
    off = np.arange(-300, 301)
    b = t5_buckets(off, 32, 128, True)
    assert b.min() == 0 and b.max() == 31
    np.testing.assert_array_equal(b[300 - np.arange(8)], np.arange(8))       # exact, past
    np.testing.assert_array_equal(b[300 + np.arange(1, 8)], 16 + np.arange(1, 8))  # future
    assert np.all(np.diff(b[:301][::-1]) >= 0) and np.all(np.diff(b[300:]) >= 0)
    assert b[0] == 15 and b[-1] == 31                              # far: the last buckets
    causal = t5_buckets(off, 32, 128, False)
    assert np.all(causal[off >= 0] == 0) and causal[0] == 31
    # relative_bias_backward is the adjoint of relative_bias
    rng = np.random.default_rng(0)
    slopes, table = alibi_slopes(4), rng.standard_normal((4, 32))
    g = rng.standard_normal((4, 2 * 20 - 1))
    da, dt = relative_bias_backward(g, 20, 20, alibi=slopes, table=table)
    eps = 1e-6
    for x, dx in ((slopes, da), (table, dt)):
        num = np.zeros_like(x)
        for i in np.ndindex(*x.shape):
            x[i] += eps
            hi = (relative_bias(20, 20, alibi=slopes, table=table) * g).sum()
            x[i] -= 2 * eps
            lo = (relative_bias(20, 20, alibi=slopes, table=table) * g).sum()
            x[i] += eps
            num[i] = (hi - lo) / (2 * eps)
        np.testing.assert_allclose(dx, num, atol=1e-6)
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    for heads in (0, -4):                   # used to give one slope, silently
        with pytest.raises(ValueError, match="heads must be >= 1"):
            alibi_slopes(heads)
    with pytest.raises(TypeError, match="heads must be an integer"):
        alibi_slopes(2.5)


# ------------------------------------------------------------------ clustered
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("topk", [None, 1, 7, 400])
def test_clustered_matches_reference(dtype, topk):
    """Plain: dropout of the centroid weights; improved: dropout of the exact and the
    centroid weights, rel_bias on the exact part's logits (topk 400 > m: all exact)."""
    rng = np.random.default_rng(topk or 0)
    n, m, C = 40, 300, 5
    q, k, v, bias = problem(rng, dtype, n, m)
    labels = rng.integers(-1, C, (B, H, n))
    kw = dict(dropout_p=0.25, dropout_seed=3, key_mask=rng.random((B, 1, m)) < 0.8)
    if topk:
        kw["rel_bias"] = bias
        fwd, bwd = ra.improved_clustered_attention, ra.improved_clustered_attention_backward
        rfwd, rbwd = ref.improved_clustered_attention, ref.improved_clustered_attention_backward
        extra = (labels, C, topk)
    else:
        fwd, bwd = ra.clustered_attention, ra.clustered_attention_backward
        rfwd, rbwd = ref.clustered_attention, ref.clustered_attention_backward
        extra = (labels, C)
    out, saved = fwd(q, k, v, *extra, return_saved=True, **kw)
    assert_close(out, rfwd(q, k, v, *extra, **kw), dtype, "out")
    dout = rng.standard_normal(out.shape).astype(dtype)
    want = rbwd(dout, q, k, v, *extra, **kw)
    again = {"rel_bias": bias} if topk else {}          # arrays are passed again
    for got in (bwd(dout, q, k, v, *extra, **kw), bwd(dout, q, k, v, *extra, **again, **saved)):
        assert len(got) == len(want) == (4 if topk else 3)
        for g, w, what in zip(got, want, ("dq", "dk", "dv", "drel_bias")):
            assert_close(g, w, dtype, f"topk={topk} {what}")


def test_clustered_finite_differences():
    """float64: the plain form's gradient by central differences; the improved form's
    against central differences of the reference with T_c and m̂_c held (the kernel's
    gradient treats them as constants, as the paper does)."""
    rng = np.random.default_rng(8)
    n, m, C = 9, 11, 3
    q, k, v, _ = problem(rng, np.float64, n, m, d=3, e=2, batch=())
    labels = rng.integers(0, C, n)
    bias = rng.standard_normal(n + m - 1)
    dout = rng.standard_normal((n, 2))
    kw = dict(dropout_p=0.3, dropout_seed=6)
    grads = ra.clustered_attention_backward(dout, q, k, v, labels, C, **kw)
    for x, g in zip((q, k, v), grads):
        num = numeric_grad(lambda: float((ra.clustered_attention(q, k, v, labels, C, **kw)
                                           * dout).sum()), x)
        assert np.abs(g - num).max() <= 1e-7 * max(1.0, np.abs(num).max())
    hold = ref.improved_clustered_selection(q, k, labels, C, 4)
    grads = ra.improved_clustered_attention_backward(dout, q, k, v, labels, C, 4, rel_bias=bias,
                                                     **kw)
    for x, g in zip((q, k, v, bias), grads):
        num = numeric_grad(lambda: float((ref.improved_clustered_attention(
            q, k, v, labels, C, 4, rel_bias=bias, _hold=hold, **kw) * dout).sum()), x)
        assert np.abs(g - num).max() <= 1e-7 * max(1.0, np.abs(num).max())


def test_clustered_members_share_the_centroid_mask():
    """Plain clustered attention with v = I: every member of a cluster gets the same
    row, zeros (dropped weights) included, and the kept rate is about 1 - p."""
    rng = np.random.default_rng(1)
    n, m, C = 64, 512, 4
    q, k = rng.standard_normal((n, 8)), rng.standard_normal((m, 8))
    labels = np.arange(n) % C
    out = ra.clustered_attention(q, k, np.eye(m), labels, C, dropout_p=0.375, dropout_seed=2)
    for c in range(C):
        assert np.array_equal(out[labels == c], np.broadcast_to(out[c], (n // C, m)))
    kept = (out[:C] != 0).mean()
    assert abs(kept - 0.625) < 5 * np.sqrt(0.375 * 0.625 / (C * m))


def test_plain_clustered_refuses_a_bias():
    """No keyword for it, and the raw gufunc refuses a bias with topk 0 (test_clustered)."""
    q = np.zeros((10, 4))
    with pytest.raises(TypeError, match="rel_bias"):
        ra.clustered_attention(q, q, q, np.zeros(10, int), 2, rel_bias=np.zeros(19))


def test_clustered_thread_bit_identity():
    rng = np.random.default_rng(3)
    n = 700
    q, k, v, bias = problem(rng, np.float32, n, n)
    labels = rng.integers(0, 20, (B, H, n))
    kw = dict(dropout_p=0.2, dropout_seed=5, rel_bias=bias)
    results = []
    for threads in (1, 2):
        ra.set_num_threads(threads)
        try:
            o = ra.improved_clustered_attention(q, k, v, labels, 20, 16, **kw)
            results.append((o, *ra.improved_clustered_attention_backward(o, q, k, v, labels, 20,
                                                                         16, **kw)))
        finally:
            ra.set_num_threads(0)
    for a, b in zip(*results):
        assert np.array_equal(a, b)


# ------------------------------------------------------------------ Combiner
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("plan", ["fixed", "axial", "logsparse", "mixture"])
@pytest.mark.parametrize("causal", [False, True])
def test_combiner_matches_reference(dtype, plan, causal):
    """Direct weights dropped per (i, j) and biased; summary weights dropped per
    (i, -1 - vid); with saved statistics too; odd n (short last grid row)."""
    rng = np.random.default_rng(hash((plan, causal)) % 2**32)
    n = 23
    q, k, v, _ = problem(rng, dtype, n, n)
    bias = relative_bias(n, n, alibi=alibi_slopes(H), table=rng.standard_normal((H, 16)))
    kw = dict(plan=plan, causal=causal, dropout_p=0.25, dropout_seed=3, rel_bias=bias)
    if plan != "logsparse":
        kw["block"] = 5
    out, saved = ra.combiner_attention(q, k, v, return_saved=True, **kw)
    assert_close(out, ref.combiner_attention(q, k, v, **kw), dtype, "out")
    dout = rng.standard_normal(out.shape).astype(dtype)
    want = ref.combiner_attention_backward(dout, q, k, v, **kw)
    for got in (ra.combiner_attention_backward(dout, q, k, v, **kw),
                ra.combiner_attention_backward(dout, q, k, v, rel_bias=bias, **saved)):
        for g, w, what in zip(got, want, ("dq", "dk", "dv", "drel_bias")):
            assert_close(g, w, dtype, f"{plan} {what}")


@pytest.mark.parametrize("plan", ["fixed", "mixture"])
def test_combiner_finite_differences(plan):
    rng = np.random.default_rng(9)
    n = 10
    q, k, v, _ = problem(rng, np.float64, n, n, d=3, e=2, batch=())
    bias = rng.standard_normal(2 * n - 1)
    kw = dict(plan=plan, block=3, causal=True, dropout_p=0.3, dropout_seed=5, rel_bias=bias)
    dout = rng.standard_normal((n, 2))
    grads = ra.combiner_attention_backward(dout, q, k, v, **kw)
    for x, g in zip((q, k, v, bias), grads):
        num = numeric_grad(lambda: float((ra.combiner_attention(q, k, v, **kw) * dout).sum()), x)
        assert np.abs(g - num).max() <= 1e-7 * max(1.0, np.abs(num).max())


def test_combiner_thread_bit_identity():
    rng = np.random.default_rng(4)
    n = 600
    q, k, v, _ = problem(rng, np.float32, n, n)
    bias = relative_bias(n, n, alibi=alibi_slopes(H)).astype(np.float32)
    results = []
    for threads in (1, 2):
        ra.set_num_threads(threads)
        try:
            row = []
            for plan in ("fixed", "mixture", "logsparse"):
                kw = dict(plan=plan, causal=True, dropout_p=0.2, dropout_seed=1, rel_bias=bias)
                o = ra.combiner_attention(q, k, v, **kw)
                row += [o, *ra.combiner_attention_backward(o, q, k, v, **kw)]
            results.append(row)
        finally:
            ra.set_num_threads(0)
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_readme_dropout_and_bias_snippet_runs():
    """The README's dropout / relative-bias example, executed as written on its own: the
    backward of the same seed and bias is the reference's gradient of that forward."""
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Attention dropout and relative position bias", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    out, dq, dbias = scope["out"], scope["dq"], scope["dbias"]
    assert out.shape == (8, 4096, 64) and dq.shape == (8, 4096, 64) and dbias.shape == (8, 8191)
    # causal: the first 64 queries see only the first 64 keys, so head 0's prefix is the
    # reference on that prefix (same offsets j - i, same dropout positions, seed `step`)
    q, k, v = (scope[x][:1, :64].astype(np.float64) for x in "qkv")
    bias = relative_bias(64, 64, alibi=alibi_slopes(8))[:1]
    want = ref.attention(q, k, v, causal=True, dropout_p=0.1, dropout_seed=scope["step"],
                         rel_bias=bias)
    assert_close(out[:1, :64], want, np.float32, "README snippet, head 0, first 64 queries")
