"""Combiner attention (docs/design.md, Combiner): the C kernels against the plain NumPy reference."""
import numpy as np
import pytest

import routing_attention as ra
from routing_attention import reference as ref
from conftest import run_with_simd

PLANS = ["fixed", "axial", "logsparse", "mixture"]
DTYPES = [np.float64, np.float32]
# (n, block): multiples and non-multiples of the block, block 1 and block n
SIZES = [(16, 4), (13, None), (11, 3), (7, 7), (9, 1)]


def tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)


def blk(plan, block):
    return None if plan == "logsparse" else block


def inputs(rng, shape_q, n, d=5, e=3, dtype=np.float64, batch_kv=None):
    bkv = shape_q if batch_kv is None else batch_kv
    q = rng.standard_normal(shape_q + (n, d)).astype(dtype)
    k = rng.standard_normal(bkv + (n, d)).astype(dtype)
    v = rng.standard_normal(bkv + (n, e)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("plan", PLANS)
def test_forward_backward_match_reference(plan, causal, dtype):
    rng = np.random.default_rng(1)
    for n, block in SIZES:
        b = blk(plan, block)
        q, k, v = inputs(rng, (2,), n, dtype=dtype)
        kw = dict(plan=plan, block=b, causal=causal)
        out = ra.combiner_attention(q, k, v, **kw)
        assert out.dtype == dtype and out.shape == (2, n, 3)
        np.testing.assert_allclose(out, ref.combiner_attention(q, k, v, **kw), **tol(dtype),
                                   err_msg=f"forward {plan} causal={causal} n={n} block={b}")
        g = rng.standard_normal(out.shape).astype(dtype)
        got = ra.combiner_attention_backward(g, q, k, v, **kw)
        want = ref.combiner_attention_backward(g, q, k, v, **kw)
        for name, x, y in zip("qkv", got, want):
            assert x.dtype == dtype
            np.testing.assert_allclose(x, y, **tol(dtype),
                                       err_msg=f"d{name} {plan} causal={causal} n={n} block={b}")


@pytest.mark.parametrize("plan", PLANS)
def test_many_grid_shapes(plan):
    """Every n in 1..20 with every block: catches a region the planner forgets."""
    rng = np.random.default_rng(2)
    for n in range(1, 21):
        blocks = sorted({min(b, n) for b in (1, 2, 3, n // 2 or 1, n)})
        for block in ([None] if plan == "logsparse" else blocks):
            for causal in (True, False):
                q, k, v = inputs(rng, (), n, d=3, e=2)
                kw = dict(plan=plan, block=block, causal=causal)
                np.testing.assert_allclose(ra.combiner_attention(q, k, v, **kw),
                                           ref.combiner_attention(q, k, v, **kw), **tol(np.float64),
                                           err_msg=f"{plan} n={n} block={block} causal={causal}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("plan", PLANS)
def test_effective_rows(plan, causal):
    """With v = I the kernel returns its effective attention matrix: rows sum to 1;
    causal rows give exactly 0 to the future and > 0 to every past key."""
    rng = np.random.default_rng(3)
    n = 23
    q, k, _ = inputs(rng, (), n, d=4)
    A = ra.combiner_attention(q, k, np.eye(n), plan=plan, causal=causal)
    np.testing.assert_allclose(A, ref.combiner_attention_weights(q, k, plan=plan, causal=causal),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    past = np.tril(np.ones((n, n), dtype=bool))
    if causal:
        assert np.all(A[~past] == 0.0), f"{plan}: weight on a future key"
        assert np.all(A[past] > 0.0), f"{plan}: a past key is unreachable"
    else:
        assert np.all(A > 0.0), f"{plan}: a key is unreachable"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_block_1_and_n_is_dense(causal, dtype):
    rng = np.random.default_rng(4)
    n = 37
    q, k, v = inputs(rng, (2,), n, d=8, e=6, dtype=dtype)
    dense = ra.attention(q, k, v, causal=causal)
    g = rng.standard_normal(dense.shape).astype(dtype)
    dense_grads = ra.attention_backward(g, q, k, v, causal=causal)
    for block in (1, n):
        kw = dict(plan="fixed", block=block, causal=causal)
        np.testing.assert_allclose(ra.combiner_attention(q, k, v, **kw), dense, **tol(dtype),
                                   err_msg=f"block={block}")
        for name, x, y in zip("qkv", ra.combiner_attention_backward(g, q, k, v, **kw), dense_grads):
            np.testing.assert_allclose(x, y, **tol(dtype), err_msg=f"d{name} block={block}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("plan", PLANS)
def test_backward_finite_differences(plan, causal):
    rng = np.random.default_rng(5)
    n, d, e = 10, 3, 2
    q, k, v = inputs(rng, (), n, d=d, e=e)
    g = rng.standard_normal((n, e))
    kw = dict(plan=plan, block=None if plan == "logsparse" else 3, causal=causal)
    loss = lambda q_, k_, v_: float(np.sum(ra.combiner_attention(q_, k_, v_, **kw) * g))  # noqa: E731
    grads = ra.combiner_attention_backward(g, q, k, v, **kw)
    h = 1e-6
    for which, x in enumerate((q, k, v)):
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args = [q, k, v]
            xp, xm = x.copy(), x.copy()
            xp[idx] += h
            xm[idx] -= h
            args[which] = xp
            lp = loss(*args)
            args[which] = xm
            fd[idx] = (lp - loss(*args)) / (2 * h)
        np.testing.assert_allclose(grads[which], fd, rtol=1e-6, atol=1e-7,
                                   err_msg=f"d{'qkv'[which]} {plan} causal={causal}")


def test_maxpool_ties_go_to_lowest_position():
    """Integer-valued q and k make max-pool ties everywhere: the gradient goes to the
    lowest position holding the maximum, as in the reference."""
    rng = np.random.default_rng(6)
    n = 12
    q = rng.integers(-1, 2, (n, 4)).astype(np.float64)
    k = rng.integers(-1, 2, (n, 4)).astype(np.float64)
    v = rng.standard_normal((n, 3))
    g = rng.standard_normal((n, 3))
    for plan in PLANS:
        for causal in (True, False):
            kw = dict(plan=plan, causal=causal)
            for name, x, y in zip("qkv", ra.combiner_attention_backward(g, q, k, v, **kw),
                                  ref.combiner_attention_backward(g, q, k, v, **kw)):
                np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10,
                                           err_msg=f"d{name} {plan} causal={causal}")


@pytest.mark.long
@pytest.mark.parametrize("simd", ["default", "avx2", "generic"])
def test_maxpool_wide_rows_on_every_kernel_table(simd):
    """d = 37: whole vector blocks and a tail for every instruction set's pooling kernel
    (forced by RA_SIMD), with integer data so ties are everywhere; forward and gradients
    against the reference for every plan, both dtypes."""
    code = (
        "import numpy as np, routing_attention as ra\n"
        "from routing_attention import reference as ref\n"
        "g = np.random.default_rng(9)\n"
        "for dt, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):\n"
        "    q, k = (g.integers(-1, 2, (70, 37)).astype(dt) * 0.3 for _ in range(2))\n"
        "    v, dout = (g.standard_normal((70, 6)).astype(dt) for _ in range(2))\n"
        "    for plan in ('fixed', 'axial', 'logsparse', 'mixture'):\n"
        "        for causal in (True, False):\n"
        "            kw = dict(plan=plan, causal=causal)\n"
        "            got = (ra.combiner_attention(q, k, v, **kw),) + \\\n"
        "                ra.combiner_attention_backward(dout, q, k, v, **kw)\n"
        "            want = (ref.combiner_attention(q, k, v, **kw),) + \\\n"
        "                ref.combiner_attention_backward(dout, q, k, v, **kw)\n"
        "            for a, b in zip(got, want):\n"
        "                err = np.max(np.abs(a - b)) / max(1, np.max(np.abs(b)))\n"
        "                assert err <= tol, (dt, plan, causal, err)\n"
        "print('ok', ra.build_info()['simd'])\n")
    out = run_with_simd(code, simd)
    assert out.split()[0] == "ok", out


def test_broadcast_batch_axes():
    rng = np.random.default_rng(7)
    n = 10
    q = rng.standard_normal((2, 1, n, 4))
    k = rng.standard_normal((1, 3, n, 4))
    v = rng.standard_normal((n, 2))
    for plan in PLANS:
        kw = dict(plan=plan, causal=False)
        out = ra.combiner_attention(q, k, v, **kw)
        assert out.shape == (2, 3, n, 2)
        np.testing.assert_allclose(out, ref.combiner_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)
        g = rng.standard_normal(out.shape)
        got = ra.combiner_attention_backward(g, q, k, v, **kw)
        want = ref.combiner_attention_backward(g, q, k, v, **kw)
        for name, x, y, a in zip("qkv", got, want, (q, k, v)):
            assert x.shape == a.shape, f"d{name} shape {x.shape} != {a.shape}"
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10, err_msg=f"d{name} {plan}")


def test_strided_inputs():
    """Negative strides, every-other-row views and Fortran order give the same result."""
    rng = np.random.default_rng(8)
    n = 14
    big = rng.standard_normal((3, 2 * n, 10))
    q = big[0, ::-2, :5]
    k = np.asfortranarray(big[1, 1::2, 2:7])
    v = big[2, ::2, ::-3]
    assert not q.flags.c_contiguous and not v.flags.c_contiguous
    g = rng.standard_normal((n, v.shape[-1]))[::-1]
    for plan in PLANS:
        kw = dict(plan=plan, causal=True)
        out = ra.combiner_attention(q, k, v, **kw)
        np.testing.assert_array_equal(out, ra.combiner_attention(q.copy(), k.copy(), v.copy(), **kw))
        np.testing.assert_allclose(out, ref.combiner_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)
        got = ra.combiner_attention_backward(g, q, k, v, **kw)
        contiguous = ra.combiner_attention_backward(g.copy(), q.copy(), k.copy(), v.copy(), **kw)
        for x, y in zip(got, contiguous):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_and_strided_gradient_outputs(dtype):
    """out= (a strided, reversed view) receives the forward; gradient outputs with
    strides accumulate in the kernel's own tables instead of in place, bit for bit."""
    rng = np.random.default_rng(11)
    n = 23
    q, k, v = inputs(rng, (2,), n, d=6, e=4, dtype=dtype)
    g = rng.standard_normal((2, n, 4)).astype(dtype)
    for plan in PLANS:
        for causal in (True, False):
            kw = dict(plan=plan, causal=causal, scale=0.375)
            want = ra.combiner_attention(q, k, v, **kw)
            buf = np.full((2, n, 9), 7, dtype)
            view = buf[:, ::-1, 1::2]
            assert ra.combiner_attention(q, k, v, out=view, **kw) is view
            np.testing.assert_array_equal(view, want)
            np.testing.assert_array_equal(buf[:, :, 0::2], 7)   # nothing outside the view
            grads = ra.combiner_attention_backward(g, q, k, v, **kw)
            outs = tuple(np.zeros((2, n, 2 * x.shape[-1]), dtype)[:, ::-1, ::2] for x in grads)
            b = None if plan == "logsparse" else int(np.ceil(np.sqrt(n)))
            code = ra.combiner.PLANS.index(plan)
            res = ra._ext._combiner_backward(g, q, k, v, want, want[..., 0], False, code, b or 1,
                                             causal, 0.375, 0, 0, np.empty(0, dtype),
                                             out=outs + (None,))
            for name, x, y in zip("qkv", res, grads):
                np.testing.assert_array_equal(x, y, err_msg=f"d{name} {plan} causal={causal}")
    with pytest.raises(ValueError, match="out must have shape"):
        ra.combiner_attention(q, k, v, out=np.empty((2, n, 3), dtype))


@pytest.mark.parametrize("plan", PLANS)
def test_n_or_d_of_one(plan):
    rng = np.random.default_rng(9)
    for n, d in ((1, 4), (6, 1), (1, 1)):
        q, k, v = inputs(rng, (2,), n, d=d, e=1)
        for causal in (True, False):
            kw = dict(plan=plan, causal=causal)
            out = ra.combiner_attention(q, k, v, **kw)
            np.testing.assert_allclose(out, ref.combiner_attention(q, k, v, **kw), rtol=1e-10, atol=1e-12)
            g = rng.standard_normal(out.shape)
            for x, y in zip(ra.combiner_attention_backward(g, q, k, v, **kw),
                            ref.combiner_attention_backward(g, q, k, v, **kw)):
                np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12, err_msg=f"n={n} d={d}")
    q, k, v = inputs(rng, (), 1, d=3, e=2)
    np.testing.assert_allclose(ra.combiner_attention(q, k, v, plan=plan), v, rtol=1e-12)


def test_bit_identical_across_thread_counts():
    rng = np.random.default_rng(10)
    n = 700
    q, k, v = inputs(rng, (2,), n, d=16, e=16, dtype=np.float32)
    g = rng.standard_normal((2, n, 16)).astype(np.float32)
    before = ra.get_num_threads()
    try:
        for plan in PLANS:
            for causal in (True, False):
                kw = dict(plan=plan, causal=causal)
                results = []
                for threads in (1, 2):
                    ra.set_num_threads(threads)
                    results.append((ra.combiner_attention(q, k, v, **kw),)
                                   + ra.combiner_attention_backward(g, q, k, v, **kw))
                for name, x, y in zip(("out", "dq", "dk", "dv"), *results):
                    np.testing.assert_array_equal(x, y, err_msg=f"{name} {plan} causal={causal}")
    finally:
        ra.set_num_threads(before)


def test_layer_matches_functions():
    rng = np.random.default_rng(11)
    q, k, v = inputs(rng, (2,), 20, d=4, e=3)
    g = rng.standard_normal((2, 20, 3))
    layer = ra.CombinerAttention("mixture", block=6, causal=False)
    with pytest.raises(RuntimeError, match="forward call first"):
        layer.backward(g)
    kw = dict(plan="mixture", block=6, causal=False)
    np.testing.assert_array_equal(layer(q, k, v), ra.combiner_attention(q, k, v, **kw))
    for x, y in zip(layer.backward(g), ra.combiner_attention_backward(g, q, k, v, **kw)):
        np.testing.assert_array_equal(x, y)
    assert "mixture" in repr(layer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("plan", PLANS)
def test_saved_statistics_give_the_same_gradients(plan, causal, dtype):
    """backward(**saved) skips the forward's query softmaxes and gives the same bits."""
    rng = np.random.default_rng(11)
    q, k, v = inputs(rng, (2,), 300, d=8, e=4, dtype=dtype)     # several query units
    kw = dict(plan=plan, block=blk(plan, 16), causal=causal)
    out, saved = ra.combiner_attention(q, k, v, return_saved=True, **kw)
    assert sorted(saved) == ["keywords", "lse", "output"] and saved["output"] is out
    assert saved["keywords"] == dict(plan=plan, block=blk(plan, 16), causal=causal,
                                     scale=float(np.dtype(dtype).type(1 / np.sqrt(8))),
                                     dropout_p=0.0, dropout_seed=None, rel_bias=None)
    assert np.array_equal(out, ra.combiner_attention(q, k, v, **kw))
    dout = rng.standard_normal((3, 2, 300, 4)).astype(dtype)       # broadcast batch
    got = ra.combiner_attention_backward(dout, q, k, v, **kw, **saved)
    want = ra.combiner_attention_backward(dout, q, k, v, **kw)
    for g, w in zip(got, want):
        assert g.dtype == dtype and np.array_equal(g, w)
    # lse is each query's log-sum-exp over everything it sees: with one block it is dense
    if plan == "fixed":
        dense = ra.combiner_attention(q, k, v, return_saved=True, plan="fixed", block=300,
                                      causal=causal)[1]["lse"]
        _, want_lse = ra.attention(q, k, v, causal=causal, return_lse=True)
        np.testing.assert_allclose(dense, want_lse, **tol(dtype))


def test_saved_statistics_are_checked():
    q, k, v = inputs(np.random.default_rng(12), (), 20)
    dout = np.ones((20, 3))
    _, saved = ra.combiner_attention(q, k, v, return_saved=True)
    with pytest.raises(ValueError, match="pass all saved statistics"):
        ra.combiner_attention_backward(dout, q, k, v, lse=saved["lse"])
    with pytest.raises(TypeError, match="unexpected keyword"):
        ra.combiner_attention_backward(dout, q, k, v, bogus=1, **saved)
    with pytest.raises(ValueError, match="lse must have shape"):
        ra.combiner_attention_backward(dout, q, k, v, **dict(saved, lse=saved["lse"][:5]))


def test_layer_backward_survives_an_in_place_edit_of_its_output():
    q, k, v = inputs(np.random.default_rng(13), (2,), 40)
    layer = ra.CombinerAttention("axial", block=6)
    out = layer(q, k, v)
    want = ra.combiner_attention_backward(np.ones_like(out), q, k, v, plan="axial", block=6)
    out += 1.0                                  # a residual added in place
    for g, w in zip(layer.backward(np.ones_like(out)), want):
        assert np.array_equal(g, w)
    # a second call with the same shapes keeps its copy in the first call's array: the
    # first output stays the caller's, the gradients follow the second call
    q2, snapshot, kept = q[:, ::-1].copy(), out.copy(), layer._kept[3]["output"]
    out2 = layer(q2, k, v)
    assert layer._kept[3]["output"] is kept, "same shapes: the copy reuses its array"
    want2 = ra.combiner_attention_backward(np.ones_like(out2), q2, k, v, plan="axial", block=6)
    out2 *= 3.0
    assert np.array_equal(out, snapshot), "the first call's output is the caller's"
    for g, w in zip(layer.backward(np.ones_like(out2)), want2):
        assert np.array_equal(g, w)


def test_scale_keyword():
    rng = np.random.default_rng(12)
    q, k, v = inputs(rng, (), 12, d=4)
    for plan in PLANS:
        kw = dict(plan=plan, causal=False, scale=-0.7)
        np.testing.assert_allclose(ra.combiner_attention(q, k, v, **kw),
                                   ref.combiner_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)


def test_clear_errors():
    rng = np.random.default_rng(13)
    q, k, v = inputs(rng, (), 8, d=4)
    with pytest.raises(ValueError, match="plan must be one of"):
        ra.combiner_attention(q, k, v, plan="strided")
    with pytest.raises(ValueError, match="plan must be one of"):
        ra.CombinerAttention("dense")
    with pytest.raises(ValueError, match="block must be >= 1"):
        ra.combiner_attention(q, k, v, block=0)
    with pytest.raises(ValueError, match="block must be <= 8"):
        ra.combiner_attention(q, k, v, plan="axial", block=9)
    with pytest.raises(TypeError, match="block must be an integer"):
        ra.combiner_attention(q, k, v, block=2.5)
    with pytest.raises(ValueError, match="block is not used by plan='logsparse'"):
        ra.combiner_attention(q, k, v, plan="logsparse", block=2)
    with pytest.raises(ValueError, match="n == m"):
        ra.combiner_attention(q, k[:5], v[:5])
    with pytest.raises(ValueError, match="q must have at least 2 dimensions"):
        ra.combiner_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same feature size d"):
        ra.combiner_attention(q, k[:, :3], v)
    with pytest.raises(ValueError, match="same sequence length m"):
        ra.combiner_attention(q, k, v[:7])
    with pytest.raises(ValueError, match="dout must have shape"):
        ra.combiner_attention_backward(np.zeros((8, 2)), q, k, v)
    with pytest.raises(TypeError, match="causal must be True or False"):
        ra.combiner_attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="complex"):
        ra.combiner_attention(q.astype(complex), k, v)
    with pytest.raises(ValueError, match="at least 1 position"):
        ra.combiner_attention(q[:0], k[:0], v[:0])


# Larger shapes: several query tiles (RA_BQ = 64) per logsparse unit list, region units with
# more than 64 nested regions (several region tiles) and spans longer than one key tile
# (RA_BK = 256), so the engine's explicit visibility bitmap is exercised at tile offsets.
LARGE = [("logsparse", None, 517), ("logsparse", None, 1100), ("mixture", 2, 530),
         ("mixture", 260, 520), ("axial", 2, 520), ("fixed", 70, 300)]


@pytest.mark.long
@pytest.mark.parametrize("plan, block, n", LARGE)
@pytest.mark.parametrize("causal", [True, False])
def test_large_shapes_match_reference(plan, block, n, causal):
    rng = np.random.default_rng(11)
    q, k, v = inputs(rng, (), n, d=4, e=3)
    kw = dict(plan=plan, block=block, causal=causal)
    np.testing.assert_allclose(ra.combiner_attention(q, k, v, **kw),
                               ref.combiner_attention(q, k, v, **kw), **tol(np.float64))
    g = rng.standard_normal((n, 3))
    for name, x, y in zip("qkv", ra.combiner_attention_backward(g, q, k, v, **kw),
                          ref.combiner_attention_backward(g, q, k, v, **kw)):
        np.testing.assert_allclose(x, y, **tol(np.float64), err_msg=f"d{name}")


@pytest.mark.long
@pytest.mark.parametrize("plan, block, n", [("fixed", 520, 1100), ("logsparse", None, 1100)])
@pytest.mark.parametrize("ties", [False, True])
def test_long_regions_in_windows(plan, block, n, ties):
    """Regions longer than the kernel's window of packed members (512) are pooled and
    attended window by window: the same summaries and gradients as the reference, ties
    across windows going to the lowest position."""
    rng = np.random.default_rng(12)
    q, k, v = inputs(rng, (), n, d=4, e=3)
    if ties:   # few distinct values: the max of a long region ties in many windows
        q, k = np.round(q), np.round(k)
    g = rng.standard_normal((n, 3))
    for causal in (True, False):
        kw = dict(plan=plan, block=block, causal=causal)
        np.testing.assert_allclose(ra.combiner_attention(q, k, v, **kw),
                                   ref.combiner_attention(q, k, v, **kw), **tol(np.float64))
        for name, x, y in zip("qkv", ra.combiner_attention_backward(g, q, k, v, **kw),
                              ref.combiner_attention_backward(g, q, k, v, **kw)):
            np.testing.assert_allclose(x, y, **tol(np.float64), err_msg=f"d{name} causal={causal}")


def _masked_reference(q, k, v, mask, dout):
    s = np.where(mask, q @ k.T, -np.inf)
    mx = s.max(axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0)
    p = np.exp(s - mx)
    z = p.sum(axis=1, keepdims=True)
    p = np.divide(p, z, out=np.zeros_like(p), where=z > 0)
    out = p @ v
    lse = np.where(z[:, 0] > 0, np.log(np.where(z[:, 0] > 0, z[:, 0], 1)) + mx[:, 0], -np.inf)
    dp = dout @ v.T
    ds = p * (dp - (dout * out).sum(axis=1, keepdims=True))
    return out, lse, ds @ k, ds.T @ q, p.T @ dout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, m", [(1, 1), (7, 5), (64, 256), (65, 257), (130, 600)])
def test_engine_visibility_bitmap(n, m, dtype):
    """The engine's explicit per-(query, key) bitmap (RaKTile.vis), alone, across query
    and key tile boundaries, with rows that see nothing, against NumPy."""
    from routing_attention import _ext
    rng = np.random.default_rng(12)
    q, k = (rng.standard_normal((x, 6)).astype(dtype) for x in (n, m))
    v = rng.standard_normal((m, 3)).astype(dtype)
    dout = rng.standard_normal((n, 3)).astype(dtype)
    mask = rng.random((n, m)) < 0.3
    mask[0] = False                      # a row that sees nothing: out 0, lse -inf
    if n > 2:
        mask[2] = True
    got = _ext._engine_masked(q, k, v, mask, dout)
    want = _masked_reference(*(x.astype(np.float64) for x in (q, k, v)), mask,
                             dout.astype(np.float64))
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert x.dtype == dtype
        np.testing.assert_allclose(x, y, **tol(dtype), err_msg=name)


@pytest.mark.parametrize("plan", ["fixed", "axial", "logsparse", "mixture"])
def test_dropout_numbers_problems_over_every_batch_axis(plan):
    """A batch axis on v alone numbers the problems (and their dropout masks) as on q:
    the kernel, the reference forward and backward agree (the reference forward once
    numbered them over q and k only)."""
    g = np.random.default_rng(5)
    n, d, e = 16, 4, 3
    q, k, v = g.standard_normal((n, d)), g.standard_normal((n, d)), g.standard_normal((3, n, e))
    kw = dict(plan=plan, causal=True, dropout_p=0.4, dropout_seed=11)
    want = ref.combiner_attention(q, k, v, **kw)
    full = ref.combiner_attention(np.broadcast_to(q, (3, n, d)), np.broadcast_to(k, (3, n, d)),
                                  v, **kw)
    np.testing.assert_allclose(want, full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ra.combiner_attention(q, k, v, **kw), want, rtol=1e-10, atol=1e-12)
    assert not np.allclose(want[0], want[1]), "the three problems' masks should differ"
