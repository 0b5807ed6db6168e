"""Dense attention: the C tile engine against the NumPy reference."""
import numpy as np
import pytest

import routing_attention as ra
from routing_attention import reference as ref
from conftest import LAYOUTS, assert_close, run_with_simd, strided

DTYPES = [np.float32, np.float64]


def make(rng, dtype, batch, n, m, d, e):
    q = rng.standard_normal(batch + (n, d)).astype(dtype)
    k = rng.standard_normal(batch + (m, d)).astype(dtype)
    v = rng.standard_normal(batch + (m, e)).astype(dtype)
    return q, k, v


def check_forward_backward(q, k, v, dtype, tag, **kw):
    out, lse = ra.attention(q, k, v, return_lse=True, **kw)
    rout, rlse = ref.attention(q, k, v, return_lse=True, **kw)
    assert_close(out, rout, dtype, f"{tag} out")
    assert np.array_equal(np.isneginf(lse), np.isneginf(rlse)), f"{tag}: -inf lse rows differ"
    finite = np.isfinite(rlse)
    assert_close(np.where(finite, lse, 0), np.where(finite, rlse, 0), dtype, f"{tag} lse")
    dout = np.random.default_rng(7).standard_normal(out.shape).astype(dtype)
    grads = ra.attention_backward(dout, q, k, v, **kw)
    rgrads = ref.attention_backward(dout, q, k, v, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(g, r, dtype, f"{tag} {name}")


# sizes straddling the tile sizes (64 query rows, 128 keys) and degenerate ones
SHAPES = [(1, 1, 1, 1), (5, 7, 3, 2), (64, 128, 16, 16), (65, 129, 64, 64), (200, 70, 1, 5),
          (3, 300, 33, 1), (130, 130, 64, 48),
          (70, 300, 150, 75)]   # products deeper than 64 with columns left over after vectors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(rng, dtype, shape, causal):
    q, k, v = make(rng, dtype, (2,), *shape)
    check_forward_backward(q, k, v, dtype, f"{shape} causal={causal}", causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_and_fully_masked_rows(rng, dtype, causal):
    q, k, v = make(rng, dtype, (3,), 70, 150, 16, 8)
    mask = rng.random((3, 150)) > 0.4
    mask[1] = False                 # a problem with no visible key at all
    mask[2, :5] = False             # causal: the first queries of problem 2 see nothing
    check_forward_backward(q, k, v, dtype, f"mask causal={causal}", causal=causal, key_mask=mask)
    out, lse = ra.attention(q, k, v, causal=causal, key_mask=mask, return_lse=True)
    assert np.all(out[1] == 0) and np.all(np.isneginf(lse[1])), "fully masked rows: out 0, lse -inf"
    dq, dk, dv = ra.attention_backward(rng.standard_normal(out.shape).astype(dtype), q, k, v,
                                       causal=causal, key_mask=mask)
    assert np.all(dq[1] == 0) and np.all(dk[1] == 0) and np.all(dv[1] == 0)
    assert np.all(dk[0][~mask[0]] == 0) and np.all(dv[0][~mask[0]] == 0), "padding keys get no gradient"
    if causal:
        assert np.all(out[2, :5] == 0) and np.all(np.isneginf(lse[2, :5]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_batch_axes(rng, dtype):
    q = rng.standard_normal((2, 1, 3, 40, 8)).astype(dtype)
    k = rng.standard_normal((4, 1, 50, 8)).astype(dtype)
    v = rng.standard_normal((1, 50, 6)).astype(dtype)
    mask = rng.random((3, 50)) > 0.2
    out = ra.attention(q, k, v, key_mask=mask)
    assert out.shape == (2, 4, 3, 40, 6)
    check_forward_backward(q, k, v, dtype, "broadcast", key_mask=mask, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_layouts(rng, dtype, layout):
    q, k, v = make(rng, dtype, (2,), 67, 131, 12, 10)
    expect = ra.attention(q, k, v, causal=True)
    got = ra.attention(strided(q, layout), strided(k, layout), strided(v, layout), causal=True)
    assert np.array_equal(got, expect), f"{layout}: result depends on memory layout"
    check_forward_backward(strided(q, layout), strided(k, layout), strided(v, layout), dtype,
                           layout, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_argument(rng, dtype):
    q, k, v = make(rng, dtype, (2,), 30, 40, 8, 5)
    expect = ra.attention(q, k, v)
    buf = np.full((2, 5, 30), np.nan, dtype)
    out_view = np.swapaxes(buf, -1, -2)          # non-contiguous destination
    res = ra.attention(q, k, v, out=out_view)
    assert res is out_view
    assert np.array_equal(out_view, expect)
    with pytest.raises(ValueError):
        ra.attention(q, k, v, out=np.empty((2, 30, 4), dtype))
    for bad in ("U3", np.complex128, object, np.int64):     # never a silent cast into out
        with pytest.raises(TypeError, match="out has dtype"):
            ra.attention(q, k, v, out=np.empty((2, 30, 5), bad))


def test_scale_and_lse_reuse(rng):
    q, k, v = make(rng, np.float64, (), 20, 25, 4, 3)
    check_forward_backward(q, k, v, np.float64, "scale", scale=0.3, causal=True)
    out, lse = ra.attention(q, k, v, scale=0.3, return_lse=True)
    dout = rng.standard_normal(out.shape)
    a = ra.attention_backward(dout, q, k, v, scale=0.3)
    b = ra.attention_backward(dout, q, k, v, scale=0.3, lse=lse, output=out)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_finite_differences_float64(rng):
    n, m, d, e = 6, 9, 4, 3
    q, k, v = make(rng, np.float64, (), n, m, d, e)
    mask = np.ones(m, bool)
    mask[3] = False
    w = rng.standard_normal((n, e))
    kw = dict(causal=True, key_mask=mask)

    def loss(q, k, v):
        return float(np.sum(w * ra.attention(q, k, v, **kw)))

    grads = ra.attention_backward(w, q, k, v, **kw)
    h = 1e-6
    for name, arr, g in zip("qkv", (q, k, v), grads):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            args = [q.copy(), k.copy(), v.copy()]
            a = args["qkv".index(name)]
            a[idx] += h
            up = loss(*args)
            a[idx] -= 2 * h
            down = loss(*args)
            num[idx] = (up - down) / (2 * h)
        err = np.max(np.abs(num - g))
        assert err < 1e-8, f"d{name}: finite differences differ by {err:.2e}"


def test_dtype_rules(rng):
    q, k, v = make(rng, np.float64, (), 5, 6, 3, 2)
    assert ra.attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)).dtype == np.float32
    assert ra.attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16)).dtype == np.float32
    assert ra.attention(q.astype(np.float32), k, v).dtype == np.float64
    ints = ra.attention((q * 10).astype(np.int64), (k * 10).astype(np.int64), v)
    assert ints.dtype == np.float64
    with pytest.raises(TypeError, match="q has complex dtype"):
        ra.attention(q.astype(complex), k, v)
    with pytest.raises(TypeError, match="v has dtype"):
        ra.attention(q, k, v.astype(object))


@pytest.mark.parametrize("bad, message", [
    (dict(q=np.zeros(3)), "q must have at least 2 dimensions"),
    (dict(k=np.zeros((6, 4))), "q and k must have the same feature size"),
    (dict(v=np.zeros((7, 2))), "k and v must have the same sequence length"),
    (dict(key_mask=np.ones(5, bool)), "key_mask must have shape"),
    (dict(key_mask=np.ones(6)), "key_mask must be a boolean array"),
    (dict(q=np.zeros((2, 5, 3)), k=np.zeros((3, 6, 3))), "batch axes do not broadcast"),
    (dict(causal="yes"), "causal must be True or False"),
    (dict(scale=np.nan), "scale must be finite"),
])
def test_bad_input(bad, message):
    args = dict(q=np.zeros((5, 3)), k=np.zeros((6, 3)), v=np.zeros((6, 2)))
    kw = {}
    for name, value in bad.items():
        (args if name in args else kw)[name] = value
    with pytest.raises((ValueError, TypeError), match=message):
        ra.attention(args["q"], args["k"], args["v"], **kw)


def test_bad_backward_input(rng):
    q, k, v = make(rng, np.float64, (), 5, 6, 3, 2)
    with pytest.raises(ValueError, match="dout must have shape"):
        ra.attention_backward(np.zeros((5, 3)), q, k, v)
    with pytest.raises(ValueError, match="lse must have shape"):
        ra.attention_backward(np.zeros((5, 2)), q, k, v, lse=np.zeros(4), output=np.zeros((5, 2)))


def test_empty_sequences(rng):
    q, k, v = make(rng, np.float64, (2,), 0, 6, 3, 2)
    assert ra.attention(q, k, v).shape == (2, 0, 2)
    q, k, v = make(rng, np.float64, (2,), 4, 0, 3, 2)
    out, lse = ra.attention(q, k, v, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse)), "no keys: output 0, lse -inf"


def test_nan_stays_in_its_row(rng):
    q, k, v = make(rng, np.float64, (), 70, 140, 8, 4)
    q[3, 2] = np.nan
    with np.errstate(invalid="ignore"):
        out = ra.attention(q, k, v)
    assert np.all(np.isnan(out[3])), "the NaN query's row is NaN"
    rows = np.arange(70) != 3
    assert np.all(np.isfinite(out[rows])), "other rows unaffected"
    k2 = k.copy()
    k2[100, 0] = np.inf           # under causal, only queries >= 100 see key 100
    with np.errstate(invalid="ignore"):
        out = ra.attention(q[rows], k2, v, causal=True)
    assert np.all(np.isfinite(out[:100])) and np.all(np.isnan(out[100:]))


def test_thread_count_bit_identical(rng):
    q, k, v = make(rng, np.float32, (3,), 300, 400, 64, 64)
    dout = rng.standard_normal((3, 300, 64)).astype(np.float32)
    results = {}
    before = ra.get_num_threads()
    try:
        for threads in (1, 2, 3):
            ra.set_num_threads(threads)
            results[threads] = (ra.attention(q, k, v, causal=True),) + ra.attention_backward(
                dout, q, k, v, causal=True)
    finally:
        ra.set_num_threads(0)
    assert ra.get_num_threads() == before
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert np.array_equal(a, b), f"{threads} threads differ from 1 thread"


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_problems_taken_whole(rng, dtype):
    """From 4 problems per thread on, a thread takes a problem whole (packed in its own
    scratch); below, the problems are packed first and their tiles shared out.  Both
    agree with the reference, and with each other bit for bit."""
    q, k, v = make(rng, dtype, (3, 4), 150, 300, 16, 12)          # 12 problems
    key_mask = rng.random((3, 4, 300)) > 0.2
    check_forward_backward(q, k, v, dtype, "12 problems", causal=True, key_mask=key_mask)
    # every operand with the full batch shape, so NumPy hands over all 12 problems at once
    bias = rng.standard_normal((3, 4, 150 + 300 - 1)).astype(dtype)
    kw = dict(causal=True, key_mask=key_mask, dropout_p=0.2, dropout_seed=5, rel_bias=bias)
    dout = rng.standard_normal((3, 4, 150, 12)).astype(dtype)
    results = {}
    try:
        for threads in (1, 2, 3, 4):      # whole problems for 1-3 threads (12 >= 4·3), not 4
            ra.set_num_threads(threads)
            results[threads] = (ra.attention(q, k, v, **kw),) + ra.attention_backward(
                dout, q, k, v, **kw)
    finally:
        ra.set_num_threads(0)
    for threads in (2, 3, 4):
        for a, b in zip(results[1], results[threads]):
            assert np.array_equal(a, b), f"{threads} threads differ from 1 thread"


def test_batch_one_backward_groups(rng):
    """Batch 1 splits the keys into groups; the result must still match the reference."""
    q, k, v = make(rng, np.float64, (), 100, 1100, 8, 8)
    check_forward_backward(q, k, v, np.float64, "batch-1 groups", causal=True)


@pytest.mark.parametrize("simd", ["avx2", "generic"])
def test_lower_simd_paths(simd):
    """The AVX2 and baseline kernels (forced by RA_SIMD) agree with the reference too."""
    code = (
        "import numpy as np, routing_attention as ra\n"
        "from routing_attention import reference as ref\n"
        f"assert ra.build_info()['simd'] in ({simd!r}, 'generic'), ra.build_info()\n"
        "rng = np.random.default_rng(0)\n"
        "for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-10)):\n"
        "    q = rng.standard_normal((2, 70, 20)).astype(dt); k = rng.standard_normal((2, 150, 20)).astype(dt)\n"
        "    v = rng.standard_normal((2, 150, 9)).astype(dt); do = rng.standard_normal((2, 70, 9)).astype(dt)\n"
        "    got = (ra.attention(q, k, v, causal=True),) + ra.attention_backward(do, q, k, v, causal=True)\n"
        "    want = (ref.attention(q, k, v, causal=True),) + ref.attention_backward(do, q, k, v, causal=True)\n"
        "    for g, w in zip(got, want):\n"
        "        assert np.max(np.abs(g - w)) <= tol * max(1, np.max(np.abs(w))), (dt, np.max(np.abs(g - w)))\n"
        "print('ok')\n")
    run_with_simd(code, simd)


def test_build_info():
    info = ra.build_info()
    assert info["simd"] in ("avx512-vpopcnt", "avx512", "avx2", "generic")
    assert isinstance(info["openmp"], bool)
    assert info["num_threads"] >= 1
    with pytest.raises(ValueError):
        ra.set_num_threads(-1)
