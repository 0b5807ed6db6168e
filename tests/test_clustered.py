"""Clustered and improved clustered attention: the C planner against the NumPy reference."""
import numpy as np
import pytest

import routing_attention as ra
from routing_attention import reference as ref
from conftest import LAYOUTS, assert_close, numeric_grad, run_with_simd, strided

DTYPES = [np.float32, np.float64]
FORMS = [None, 1, 5, 1000]          # topk: None = plain clustered attention


def make(rng, dtype, batch, n, m, d, e, C, drop=0.1):
    q = rng.standard_normal(batch + (n, d)).astype(dtype)
    k = rng.standard_normal(batch + (m, d)).astype(dtype)
    v = rng.standard_normal(batch + (m, e)).astype(dtype)
    labels = rng.integers(0, C, batch + (n,))
    labels[rng.random(labels.shape) < drop] = -1
    return q, k, v, labels


def forward(topk, q, k, v, labels, C, impl=ra, **kw):
    if topk is None:
        return impl.clustered_attention(q, k, v, labels, C, **kw)
    return impl.improved_clustered_attention(q, k, v, labels, C, topk, **kw)


def backward(topk, dout, q, k, v, labels, C, impl=ra, **kw):
    if topk is None:
        return impl.clustered_attention_backward(dout, q, k, v, labels, C, **kw)
    return impl.improved_clustered_attention_backward(dout, q, k, v, labels, C, topk, **kw)


def check(topk, q, k, v, labels, C, dtype, tag, **kw):
    out = forward(topk, q, k, v, labels, C, **kw)
    assert_close(out, forward(topk, q, k, v, labels, C, impl=ref, **kw), dtype, f"{tag} out")
    dout = np.random.default_rng(7).standard_normal(out.shape).astype(dtype)
    grads = backward(topk, dout, q, k, v, labels, C, **kw)
    rgrads = backward(topk, dout, q, k, v, labels, C, impl=ref, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(g, r, dtype, f"{tag} {name}")
    return out, grads


# (n, m, d, e, C): degenerate sizes and sizes straddling the tiles (64 query rows, 128
# centroid rows, 256 keys)
SHAPES = [(1, 1, 1, 1, 1), (5, 7, 3, 2, 2), (70, 150, 16, 8, 6), (130, 300, 33, 20, 70),
          (200, 70, 1, 5, 9), (3, 300, 8, 1, 3), (400, 520, 8, 4, 140)]


@pytest.mark.parametrize("simd", ["default", "avx2", "generic"])
def test_every_simd_path_with_ties(simd):
    """Every kernel table (the lower ones forced by RA_SIMD; the top-k candidate lists are
    a SIMD kernel) agrees with the reference, key mask and tied weights included."""
    code = (
        "import numpy as np, routing_attention as ra\n"
        "from routing_attention import reference as ref\n"
        "g = np.random.default_rng(7)\n"
        "for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-10)):\n"
        "    q = g.standard_normal((2, 90, 12)).astype(dt)\n"
        "    k = np.round(g.standard_normal((2, 300, 12)), 1).astype(dt)\n"
        "    k[:, 150:] = k[:, :150]                     # repeated keys: tied weights\n"
        "    v = g.standard_normal((2, 300, 5)).astype(dt)\n"
        "    labels = g.integers(-1, 7, (2, 90)); mask = g.random((2, 300)) > 0.2\n"
        "    for topk in (3, 40):\n"
        "        args = (q, k, v, labels, 7, topk)\n"
        "        got = ra.improved_clustered_attention(*args, key_mask=mask)\n"
        "        want = ref.improved_clustered_attention(*args, key_mask=mask)\n"
        "        assert np.max(np.abs(got - want)) <= tol * max(1, np.max(np.abs(want))), dt\n"
        "print('ok', ra.build_info()['simd'])\n")
    out = run_with_simd(code, simd)
    if simd != "default":
        assert out.split()[1] in (simd, "generic"), out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", FORMS)
def test_matches_reference(rng, dtype, shape, topk):
    n, m, d, e, C = shape
    q, k, v, labels = make(rng, dtype, (2,), n, m, d, e, C, drop=0.1 if n > 1 else 0)
    check(topk, q, k, v, labels, C, dtype, f"{shape} topk={topk}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", FORMS)
def test_key_mask_empty_clusters_and_padded_queries(rng, dtype, topk):
    q, k, v, labels = make(rng, dtype, (3,), 90, 260, 16, 8, 12, drop=0.2)
    labels[labels == 3] = 4                         # cluster 3 empty
    mask = rng.random((3, 260)) > 0.4
    mask[1] = False                                 # a problem with no visible key
    mask[2, :] = False
    mask[2, [5, 140, 259]] = True                   # three visible keys, topk may exceed them
    out, (dq, dk, dv) = check(topk, q, k, v, labels, 12, dtype, f"mask topk={topk}", key_mask=mask)
    pad = labels == -1
    assert np.all(out[pad] == 0) and np.all(dq[pad] == 0), "padded queries: output 0, no gradient"
    assert np.all(out[1] == 0) and np.all(dq[1] == 0) and np.all(dk[1] == 0) and np.all(dv[1] == 0)
    assert np.all(dk[~mask] == 0) and np.all(dv[~mask] == 0), "masked keys get no gradient"


@pytest.mark.parametrize("topk", [1, 3, 50])
def test_padded_keys_never_weighted(rng, topk):
    """Padding keys get no weight even when topk exceeds a sequence's valid keys."""
    q, k, v, labels = make(rng, np.float64, (2,), 40, 100, 8, 4, 5, drop=0)
    mask = np.zeros((2, 100), bool)
    mask[0, [3, 50, 97]] = True
    mask[1, :30] = True
    out = ra.improved_clustered_attention(q, k, v, labels, 5, topk, key_mask=mask)
    k2, v2 = k.copy(), v.copy()
    k2[~mask] = 1e3                                 # would dominate any softmax it entered
    v2[~mask] = 1e6
    out2 = ra.improved_clustered_attention(q, k2, v2, labels, 5, topk, key_mask=mask)
    assert np.array_equal(out, out2), "masked keys changed the output"
    ones = ra.improved_clustered_attention(q, k, np.ones_like(v), labels, 5, topk, key_mask=mask)
    assert_close(ones, np.ones_like(ones), np.float64, "weights of every query sum to 1")


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_batch_axes(rng, dtype):
    q = rng.standard_normal((2, 1, 3, 40, 8)).astype(dtype)
    k = rng.standard_normal((4, 1, 50, 8)).astype(dtype)
    v = rng.standard_normal((1, 50, 6)).astype(dtype)
    labels = rng.integers(-1, 7, (3, 40))
    mask = rng.random((3, 50)) > 0.2
    for topk in (None, 4):
        out, _ = check(topk, q, k, v, labels, 7, dtype, f"broadcast topk={topk}", key_mask=mask)
        assert out.shape == (2, 4, 3, 40, 6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_layouts(rng, dtype, layout):
    q, k, v, labels = make(rng, dtype, (2,), 66, 140, 12, 7, 5)
    mask = rng.random((2, 140)) > 0.3
    lab = np.ascontiguousarray(labels[:, ::-1])[:, ::-1] if layout == "negative" else labels
    for topk in (None, 6):
        want = forward(topk, q, k, v, labels, 5, key_mask=mask)
        got = forward(topk, strided(q, layout), strided(k, layout), strided(v, layout), lab, 5,
                      key_mask=mask)
        assert np.array_equal(got, want), f"{layout} topk={topk}: layout changed the output"
        dout = rng.standard_normal(want.shape).astype(dtype)
        g1 = backward(topk, dout, q, k, v, labels, 5, key_mask=mask)
        g2 = backward(topk, strided(dout, layout), strided(q, layout), strided(k, layout),
                      strided(v, layout), lab, 5, key_mask=mask)
        for name, a, b in zip(("dq", "dk", "dv"), g1, g2):
            assert np.array_equal(a, b), f"{layout} topk={topk} {name}: layout changed the gradient"


def test_output_argument(rng):
    q, k, v, labels = make(rng, np.float64, (), 20, 30, 4, 3, 4)
    buf = np.full((20, 3), np.nan)
    res = ra.improved_clustered_attention(q, k, v, labels, 4, 2, out=buf)
    assert res is buf
    assert np.array_equal(buf, ra.improved_clustered_attention(q, k, v, labels, 4, 2))
    with pytest.raises(ValueError, match="out must have shape"):
        ra.clustered_attention(q, k, v, labels, 4, out=np.empty((20, 4)))
    with pytest.raises(TypeError, match="out has dtype"):
        ra.clustered_attention(q, k, v, labels, 4, out=np.empty((20, 3), np.int64))


@pytest.mark.parametrize("topk", [None, 2])
def test_output_argument_may_be_an_input(rng, topk):
    """out= may be q, k or v itself (the kernel rereads their rows after writing output
    rows, so the result goes through a separate array first)."""
    q, k, v, labels = make(rng, np.float64, (2,), 24, 24, 3, 3, 4)
    want = forward(topk, q, k, v, labels, 4)
    for which in range(3):
        args = [q.copy(), k.copy(), v.copy()]
        got = forward(topk, *args, labels, 4, out=args[which])
        assert got is args[which]
        assert np.array_equal(got, want), f"out= input {which}"


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("topk", [None, 3])
def test_finite_differences(rng, topk):
    """Central differences of the loss Σ dout∘out; improved: T_c and m̂_c held constant."""
    q, k, v, labels = make(rng, np.float64, (), 9, 11, 3, 2, 3, drop=0.15)
    labels[0] = 0
    mask = np.ones(11, bool)
    mask[4] = False
    dout = rng.standard_normal((9, 2))
    kw = dict(key_mask=mask, scale=0.7)
    if topk is None:
        loss = lambda: float(np.sum(dout * ra.clustered_attention(q, k, v, labels, 3, **kw)))
    else:
        hold = ref.improved_clustered_selection(q, k, labels, 3, topk, **kw)
        loss = lambda: float(np.sum(dout * ref.improved_clustered_attention(
            q, k, v, labels, 3, topk, _hold=hold, **kw)))
    grads = backward(topk, dout, q, k, v, labels, 3, **kw)
    for name, x, g in zip(("dq", "dk", "dv"), (q, k, v), grads):
        num = numeric_grad(loss, x)
        err = np.max(np.abs(num - g))
        assert err < 1e-7 * max(1.0, np.max(np.abs(num))), f"topk={topk} {name}: FD error {err:.2e}"


# ------------------------------------------------------------------ special cases
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_at_least_m_is_dense(rng, dtype):
    q, k, v, labels = make(rng, dtype, (2,), 70, 140, 16, 8, 6, drop=0)
    mask = rng.random((2, 140)) > 0.3
    for topk in (140, 141, 10**6):
        out = ra.improved_clustered_attention(q, k, v, labels, 6, topk, key_mask=mask)
        assert_close(out, ref.attention(q, k, v, key_mask=mask), dtype, f"topk={topk} vs dense")
        assert_close(out, ra.attention(q, k, v, key_mask=mask), dtype, f"topk={topk} vs ra.attention")
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = ra.improved_clustered_attention_backward(dout, q, k, v, labels, 6, 140, key_mask=mask)
    want = ref.attention_backward(dout, q, k, v, key_mask=mask)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, dtype, f"topk=m backward {name} vs dense")


def test_improved_differs_from_plain(rng):
    q, k, v, labels = make(rng, np.float64, (), 60, 80, 8, 4, 4, drop=0)
    plain = ra.clustered_attention(q, k, v, labels, 4)
    improved = ra.improved_clustered_attention(q, k, v, labels, 4, 8)
    dense = ra.attention(q, k, v)
    assert not np.allclose(plain, improved)
    assert np.linalg.norm(improved - dense) < np.linalg.norm(plain - dense), \
        "the exact top-k weights should move the output towards dense attention"


def test_single_cluster_plain_is_mean_query_attention(rng):
    q, k, v, labels = make(rng, np.float64, (), 30, 20, 5, 3, 1, drop=0)
    out = ra.clustered_attention(q, k, v, labels, 1)
    row = ref.attention(q.mean(axis=0, keepdims=True), k, v)
    assert_close(out, np.repeat(row, 30, axis=0), np.float64, "one cluster")


@pytest.mark.parametrize("topk", [None, 7])
def test_bit_identical_across_thread_counts(rng, topk):
    q, k, v, labels = make(rng, np.float32, (1,), 700, 1500, 32, 32, 20)
    mask = rng.random((1, 1500)) > 0.1
    dout = rng.standard_normal((1, 700, 32)).astype(np.float32)
    before = ra.get_num_threads()
    try:
        results = []
        for nt in (1, 2, 3):
            ra.set_num_threads(nt)
            out = forward(topk, q, k, v, labels, 20, key_mask=mask)
            results.append((out,) + tuple(backward(topk, dout, q, k, v, labels, 20, key_mask=mask)))
    finally:
        ra.set_num_threads(before)
    for nt, res in zip((2, 3), results[1:]):
        for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], res):
            assert np.array_equal(a, b), f"topk={topk} {name}: 1 vs {nt} threads differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", [None, 7])
@pytest.mark.parametrize("batch", [(2, 3), (3, 4)])
def test_many_problems_taken_whole(rng, dtype, topk, batch):
    """From 4 problems per thread on, a thread takes a problem of the improved form whole
    through every step; below (and always for the plain form, here as a control), each
    step runs over all problems with their units shared out.  Both agree with the
    reference, and with each other bit for bit (forward, saved statistics, backward from
    them and recomputed, the bias gradient); a bad label, or a bad saved position, in one
    problem is reported either way.  Six problems of 600 keys: whole on 1 thread, with the
    centroid passes' keys in the whole batch's two groups; twelve: whole on 1-3 threads
    (several problems at once, each thread in its own slice).  Every operand has the full
    batch shape, so NumPy hands the C planner the whole batch in one call."""
    B = batch[0] * batch[1]
    q, k, v, labels = make(rng, dtype, batch, 90, 600, 16, 12, 9)
    mask = rng.random(batch + (600,)) > 0.2
    before = ra.get_num_threads()
    try:
        ra.set_num_threads(1)
        check(topk, q, k, v, labels, 9, dtype, f"{B} problems whole", key_mask=mask)
        kw = dict(key_mask=mask, dropout_p=0.2, dropout_seed=5)
        if topk is not None:
            kw["rel_bias"] = rng.standard_normal(batch + (90 + 600 - 1,)).astype(dtype)
        dout = rng.standard_normal(batch + (90, 12)).astype(dtype)
        results = {}
        for threads in (1, 2, 3, 4):
            ra.set_num_threads(threads)
            out, saved = forward(topk, q, k, v, labels, 9, return_saved=True, **kw)
            stats = tuple(saved[key] for key in sorted(saved) if key != "keywords")
            results[threads] = ((out,) + stats
                                + tuple(backward(topk, dout, q, k, v, labels, 9, **kw, **saved))
                                + tuple(backward(topk, dout, q, k, v, labels, 9, **kw)))
            bad = labels.copy()
            bad[1, 1, 5] = 9                  # one problem's label, seen by the C planner
            K = topk or 0
            with pytest.raises(ValueError, match="labels"):
                ra._ext._clustered_forward(q, k, v, bad, mask, True, 9, K, 0.25, 0, 0,
                                           np.empty(0, dtype), out=(
                                               None, np.empty(batch + (9, 12), dtype),
                                               np.empty(batch + (9,), dtype),
                                               np.empty(batch + (9, K), np.int64),
                                               np.empty(batch + (9, K), dtype)))
            if topk is not None:              # one problem's saved T_c out of range
                tampered = dict(saved, topk_index=saved["topk_index"].copy())
                tampered["topk_index"][1, 2, 0] = 10 ** 6
                with pytest.raises(ValueError, match="saved topk_index must come from the same forward"):
                    backward(topk, dout, q, k, v, labels, 9, **kw, **tampered)
        ra.set_num_threads(4)
        check(topk, q, k, v, labels, 9, dtype, f"{B} problems shared", key_mask=mask)
    finally:
        ra.set_num_threads(before)
    for threads in (2, 3, 4):
        for i, (a, b) in enumerate(zip(results[1], results[threads])):
            assert np.array_equal(a, b), f"result {i}: {threads} threads differ from 1 thread"


@pytest.mark.filterwarnings("ignore:invalid value")
def test_nan_stays_in_its_cluster(rng):
    q, k, v, labels = make(rng, np.float64, (), 40, 50, 4, 3, 4, drop=0)
    q[0, 0] = np.nan
    for topk in (None, 5):
        out = forward(topk, q, k, v, labels, 4)
        bad = labels == labels[0]
        assert np.all(np.isnan(out[bad])) and np.all(np.isfinite(out[~bad])), f"topk={topk}"


# ------------------------------------------------------------------ errors
def test_errors_name_the_argument(rng):
    q, k, v, labels = make(rng, np.float64, (), 10, 12, 4, 3, 3)
    with pytest.raises(ValueError, match="labels"):
        ra.clustered_attention(q, k, v, np.full(10, 3), 3)
    with pytest.raises(ValueError, match="labels"):
        ra.improved_clustered_attention(q, k, v, np.full(10, -2), 3, 2)
    with pytest.raises(ValueError, match="labels"):
        ra.clustered_attention(q, k, v, labels[:9], 3)
    with pytest.raises(TypeError, match="labels"):
        ra.clustered_attention(q, k, v, labels.astype(float), 3)
    with pytest.raises(ValueError, match="n_clusters"):
        ra.clustered_attention(q, k, v, labels, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        ra.clustered_attention(q, k, v, labels, 11)
    with pytest.raises(TypeError, match="n_clusters"):
        ra.clustered_attention(q, k, v, labels, 2.5)
    with pytest.raises(ValueError, match="topk"):
        ra.improved_clustered_attention(q, k, v, labels, 3, 0)
    with pytest.raises(ValueError, match="same feature size"):
        ra.clustered_attention(q, k[:, :3], v, labels, 3)
    with pytest.raises(ValueError, match="sequence length"):
        ra.clustered_attention(q, k, v[:5], labels, 3)
    with pytest.raises(ValueError, match="key_mask"):
        ra.clustered_attention(q, k, v, labels, 3, key_mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="dout"):
        ra.clustered_attention_backward(np.ones((10, 4)), q, k, v, labels, 3)
    with pytest.raises(TypeError, match="q"):
        ra.clustered_attention(q.astype(complex), k, v, labels, 3)


def test_private_gufunc_rejects_bad_labels(rng):
    """The C planner checks labels itself: no read out of bounds when called directly."""
    q, k, v, labels = make(rng, np.float64, (), 10, 12, 4, 3, 3)
    mask = np.ones(12, bool)
    saved_out = lambda K: (None, np.empty((3, 3)), np.empty(3), np.empty((3, K), np.int64),
                           np.empty((3, K)))
    with pytest.raises(ValueError, match="labels"):
        ra._ext._clustered_forward(q, k, v, np.full(10, 7), mask, False, 3, 0, 0.5, 0, 0,
                                   np.empty(0), out=saved_out(0))
    with pytest.raises(ValueError, match="saved statistics"):
        ra._ext._clustered_forward(q, k, v, labels, mask, False, 3, 2, 0.5, 0, 0, np.empty(0),
                                   out=saved_out(4))
    dummy = (np.zeros((3, 3)), np.zeros(3), np.zeros((3, 0), np.int64), np.zeros((3, 0)))
    with pytest.raises(ValueError, match="n_clusters"):
        ra._ext._clustered_backward(q[:, :3], q, k, v, labels, mask, *dummy, False, False, 0, 0,
                                    0.5, 0, 0, np.empty(0))
    with pytest.raises(ValueError, match="invalid argument"):   # the plain form has no pairs
        ra._ext._clustered_forward(q, k, v, labels, mask, False, 3, 0, 0.5, 0, 0,
                                   np.zeros(21), out=saved_out(0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", [None, 1, 5, 1000])
def test_saved_statistics_give_the_same_gradients(rng, dtype, topk):
    """backward(**saved) skips the forward's recomputation and gives the same bits."""
    q, k, v, labels = make(rng, dtype, (2,), 70, 150, 16, 8, 6)
    mask = rng.random((2, 150)) > 0.2
    dout = rng.standard_normal((3, 2, 70, 8)).astype(dtype)        # broadcast batch
    out, saved = forward(topk, q, k, v, labels, 6, key_mask=mask, return_saved=True)
    assert np.array_equal(out, forward(topk, q, k, v, labels, 6, key_mask=mask))
    assert sorted(saved) == ["centroid_lse", "centroid_out", "keywords", "topk_index",
                             "topk_weight"]
    recorded = saved["keywords"]
    assert (recorded["n_clusters"], recorded["topk"]) == (6, topk)
    assert recorded["key_mask"] is not mask and np.array_equal(recorded["key_mask"], mask)
    kmax = 0 if topk is None else min(topk, 150)
    assert saved["topk_index"].shape == (2, 6, kmax) and saved["centroid_out"].shape == (2, 6, 8)
    got = backward(topk, dout, q, k, v, labels, 6, key_mask=mask, **saved)
    want = backward(topk, dout, q, k, v, labels, 6, key_mask=mask)
    for g, w in zip(got, want):
        assert g.dtype == dtype and np.array_equal(g, w)
    if topk is not None:      # T_c: increasing unmasked positions, min(topk, unmasked) each
        for b in range(2):
            for c in range(6):
                sel = saved["topk_index"][b, c]
                kept = sel[sel >= 0]
                assert len(kept) == min(topk, mask[b].sum()) and np.all(np.diff(kept) > 0)
                assert mask[b, kept].all()


def test_saved_statistics_are_checked(rng):
    q, k, v, labels = make(rng, np.float64, (), 30, 40, 8, 4, 3)
    dout = rng.standard_normal((30, 4))
    _, saved = forward(5, q, k, v, labels, 3, return_saved=True)
    with pytest.raises(ValueError, match="pass all saved statistics"):
        backward(5, dout, q, k, v, labels, 3, centroid_out=saved["centroid_out"])
    with pytest.raises(TypeError, match="unexpected keyword"):
        backward(5, dout, q, k, v, labels, 3, bogus=1, **saved)
    with pytest.raises(ValueError, match="topk_index must have shape"):
        backward(5, dout, q, k, v, labels, 3, **dict(saved, topk_index=saved["topk_index"][:, :4]))
    for bad in (45, -3):              # out of range, or not increasing: never read
        sel = saved["topk_index"].copy()
        sel[1, 2] = bad
        with pytest.raises(ValueError, match="same forward"):
            backward(5, dout, q, k, v, labels, 3, **dict(saved, topk_index=sel))
    sel = saved["topk_index"].copy()
    sel[0, [0, 1]] = sel[0, [1, 0]]
    with pytest.raises(ValueError, match="same forward"):
        backward(5, dout, q, k, v, labels, 3, **dict(saved, topk_index=sel))


# ------------------------------------------------------------------ layer
def test_layer_runs_the_pipeline(rng):
    """Needs lsh_hash / hamming_kmeans from issue 3 (routing_attention.clustering)."""
    clustering = pytest.importorskip("routing_attention.clustering",
                                     reason="lsh_hash/hamming_kmeans (issue 3) not merged yet")
    q, k, v, _ = make(rng, np.float64, (2,), 120, 90, 16, 8, 1)
    for topk in (None, 6):
        layer = ra.ClusteredAttention(10, bits=16, iterations=5, topk=topk, seed=3)
        out = layer(q, k, v)
        labels = layer.labels
        assert labels.shape == (2, 120) and labels.min() >= 0 and labels.max() < 10
        codes = clustering.lsh_hash(q, layer.planes)
        assert np.array_equal(labels, clustering.hamming_kmeans(codes, 10, iters=5, seed=3))
        assert np.array_equal(out, forward(topk, q, k, v, labels, 10))
        assert np.array_equal(out, layer.forward(q, k, v)[0]), "deterministic for a given seed"
        dout = rng.standard_normal(out.shape)
        for name, g, w in zip(("dq", "dk", "dv"), layer.backward(dout),
                              backward(topk, dout, q, k, v, labels, 10)):
            assert np.array_equal(g, w), f"layer backward {name}"


def test_layer_hashes_integer_queries_as_float64(rng):
    """Integer inputs promote to float64 everywhere, the hyperplanes included."""
    q = rng.integers(-3, 4, (2, 40, 5))
    k, v = rng.standard_normal((2, 40, 5)), rng.standard_normal((2, 40, 3))
    a, b = ra.ClusteredAttention(6, bits=16, seed=1), ra.ClusteredAttention(6, bits=16, seed=1)
    assert np.array_equal(a(q, k, v), b(q.astype(np.float64), k, v))
    assert np.array_equal(a.labels, b.labels)


def test_layer_backward_before_call():
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        ra.ClusteredAttention(4).backward(np.zeros((3, 2)))
