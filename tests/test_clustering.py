"""Routing decisions against the NumPy reference: exact for labels / indices / codes,
dtype tolerances for centroids and losses; recovery, determinism, thread independence
and argument errors."""
import contextlib

import numpy as np
import pytest

import routing_attention as ra
from routing_attention import reference as ref
from conftest import run_with_simd

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-5, np.float64: 1e-10}
# row sizes whose squares overflow / underflow the dtype, and powers of two just as far out
HUGE = {np.float32: 1e20, np.float64: 1e200}
TINY = {np.float32: 1e-25, np.float64: 1e-160}
HUGE2 = {np.float32: 2.0 ** 66, np.float64: 2.0 ** 665}
TINY2 = {np.float32: 2.0 ** -83, np.float64: 2.0 ** -532}


def rng(seed=0):
    return np.random.default_rng(seed)


def out_of_range(x, dtype, huge, tiny):
    """x with every third row times huge[dtype] and the next one times tiny[dtype]."""
    y = x.copy()
    y[0::3] *= dtype(huge[dtype])
    y[1::3] *= dtype(tiny[dtype])
    return y


def assert_close(got, want, dtype, what):
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype], err_msg=what)


def assert_same(got, want, what):
    assert got.dtype == np.int64, f"{what}: dtype {got.dtype}, expected int64"
    np.testing.assert_array_equal(got, want, err_msg=what)


def int_data(shape, seed, lo=-2, hi=3):
    """Small integers: every dot product is exact, so ties are real ties."""
    return rng(seed).integers(lo, hi, size=shape).astype(np.float64)


def separated(n_per, c, d, seed, noise=0.02):
    """c well-separated unit directions, n_per noisy rows each, rows shuffled."""
    g = rng(seed)
    centers = np.linalg.qr(g.standard_normal((d, d)))[0][:c]        # orthonormal
    truth = g.permutation(np.repeat(np.arange(c), n_per))
    x = centers[truth] + noise * g.standard_normal((truth.size, d))
    return x * g.uniform(0.5, 2.0, (truth.size, 1)), truth


def same_partition(labels, truth):
    """labels equals truth up to renaming the clusters."""
    pairs = set(zip(labels.tolist(), truth.tolist()))
    return len(pairs) == len(set(truth.tolist())) == len(set(labels.tolist()))


@contextlib.contextmanager
def threads(k):
    before = ra.get_num_threads()
    ra.set_num_threads(k)
    try:
        yield
    finally:
        ra.set_num_threads(before)


# ------------------------------------------------------------------ assign_clusters
@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_exact_with_ties(dtype):
    x = int_data((2, 1, 300, 5), 1).astype(dtype)
    cent = int_data((3, 7, 5), 2).astype(dtype)
    cent[:, 3] = cent[:, 1]                                  # duplicate centroid: ties
    got = ra.assign_clusters(x, cent)
    assert got.shape == (2, 3, 300)
    assert_same(got, ref.assign_clusters(x, cent), "integer data, ties to lowest")
    assert not (got == 3).any(), "a duplicate centroid must never win over the lower one"


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_random_against_reference(dtype):
    g = rng(3)
    x = g.standard_normal((400, 24)).astype(dtype)
    cent = g.standard_normal((37, 24)).astype(dtype)
    got, want = ra.assign_clusters(x, cent), ref.assign_clusters(x, cent)
    s = x.astype(np.float64) @ cent.astype(np.float64).T
    top2 = np.sort(s, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3 * np.abs(top2[:, 1])
    assert clear.mean() > 0.9
    assert_same(got[clear], want[clear], "rows with a clear winner")
    # every other row picked a score within rounding of the best
    np.testing.assert_allclose(s[np.arange(400), got], s.max(axis=1), rtol=1e-4)


def test_assign_strided_and_out():
    x = int_data((300, 9), 4)
    cent = int_data((6, 9), 5)
    xs = np.asfortranarray(x)[::-1, ::2]                     # negative + non-unit strides
    cs = cent[::-1, ::2]
    out = np.full(300, 99, np.int64)
    res = ra.assign_clusters(xs, cs, out=out)
    assert res is out
    assert_same(out, ref.assign_clusters(xs, cs), "strided views")


def test_assign_nan_row_and_tiny_shapes():
    x = np.array([[1.0], [-2.0], [np.nan]])
    cent = np.array([[1.0], [-1.0]])
    assert_same(ra.assign_clusters(x, cent), np.array([0, 1, -1]), "d=1, NaN row -> -1")
    assert_same(ra.assign_clusters(x[:1], cent[:1]), np.array([0]), "n=c=d=1")


@pytest.mark.parametrize("simd", ["default", "avx2", "generic"])
def test_assign_argmax_across_vector_blocks_on_every_kernel_table(simd):
    """The vector argmax: ties split across column blocks and the tail, a NaN column, a
    ±inf column and an all-NaN row, for widths below, at and above two vectors; labels
    and best scores equal the reference on each instruction set's kernels.  Also the row
    normalisation kernel the layer uses, on the same tables (huge and tiny rows too)."""
    code = (
        "import numpy as np, routing_attention as ra\n"
        "from routing_attention import reference as ref\n"
        "g = np.random.default_rng(31)\n"
        "for c in (3, 16, 33, 70):\n"
        "    for dt in (np.float32, np.float64):\n"
        "        x = g.integers(-2, 3, (2, 200, 6)).astype(dt)\n"
        "        cent = g.integers(-2, 3, (2, c, 6)).astype(dt)\n"
        "        cent[:, c - 1] = cent[:, c // 2] = cent[:, 0]        # ties in far blocks\n"
        "        if c > 2:\n"
        "            cent[0, 1, 0] = np.nan                           # a NaN column\n"
        "            cent[1, 1] = 0; cent[1, 1, 2] = np.inf           # +inf, -inf and NaN\n"
        "        x[0, 7] = np.nan                                     # an all-NaN row\n"
        "        with np.errstate(invalid='ignore'):\n"
        "            lab, sc, best = ra.assign_clusters(x, cent, return_scores=True)\n"
        "            want = ref.assign_clusters(x, cent)\n"
        "        assert np.array_equal(lab, want), (c, dt)\n"
        "        assert np.array_equal(ra.assign_clusters(x, cent), want), (c, dt)\n"
        "        top = np.take_along_axis(sc, np.maximum(lab, 0)[..., None], -1)[..., 0]\n"
        "        assert np.array_equal(best, np.where(lab >= 0, top, np.nan), equal_nan=True)\n"
        "# the layer's row normalisation kernel on the same table (whole vectors and a tail)\n"
        "for dt, tol in ((np.float32, 1e-6), (np.float64, 1e-14)):\n"
        "    x = g.standard_normal((50, 37)).astype(dt)\n"
        "    x[3] = 0\n"
        "    xhat, nrm, sq = ra._ext._normalize_rows(x)\n"
        "    want = np.linalg.norm(x.astype(np.float64), axis=-1)\n"
        "    assert np.allclose(nrm, want, rtol=tol, atol=0), dt\n"
        "    assert np.allclose(xhat, x / np.where(want > 0, want, 1)[:, None], rtol=tol, atol=tol), dt\n"
        "    assert np.allclose(sq, (xhat.astype(np.float64) ** 2).sum(-1), rtol=tol, atol=tol), dt\n"
        "    assert sq[3] == 0 and (xhat[3] == 0).all()\n"
        "    for size in ((1e20, 1e-25) if dt == np.float32 else (1e200, 1e-160)):\n"
        "        assert np.allclose(ra._ext._normalize_rows(x * dt(size))[0], xhat, rtol=tol,\n"
        "                           atol=tol), (dt, size)               # squares out of range\n"
        "print('ok', ra.build_info()['simd'])\n")
    out = run_with_simd(code, simd)
    assert out.split()[0] == "ok", out


# ------------------------------------------------------------------ spherical_kmeans
@pytest.mark.parametrize("iters", [0, 1, 4])
def test_spherical_kmeans_float64_against_reference(iters):
    g = rng(6)
    x = g.standard_normal((2, 350, 12))
    mask = g.random((2, 350)) > 0.2
    got = ra.spherical_kmeans(x, 9, iters=iters, seed=11, mask=mask)
    want = ref.spherical_kmeans(x, 9, iters=iters, seed=11, mask=mask)
    assert_close(got, want, np.float64, f"iters={iters}")
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1, rtol=1e-12)


@pytest.mark.parametrize("iters", [0, 3])
def test_spherical_kmeans_nan_rows_take_no_part(iters):
    """Rows with a NaN or an infinity take no part, exactly as if masked (never a seed,
    in no cluster); zero rows stay eligible (their cosines are 0)."""
    for seed in range(12):
        g = rng(40 + seed)
        x = g.standard_normal((60, 5))
        bad = np.zeros(60, bool)
        bad[g.integers(0, 60, 12)] = True
        x[bad] = np.nan
        x[g.integers(0, 60, 2), 1] = np.inf
        bad |= ~np.isfinite(x).all(axis=1)
        x[g.integers(0, 60, 2)] = 0.0
        bad &= ~(x == 0).all(axis=1)
        with np.errstate(invalid="ignore"):
            got = ra.spherical_kmeans(x, 7, iters=iters, seed=seed)
        masked = ra.spherical_kmeans(np.where(bad[:, None], 1.0, x), 7, iters=iters, seed=seed,
                                     mask=~bad)
        assert np.array_equal(got, masked), f"seed {seed}: not the same as masking the rows"
        assert_close(got, ref.spherical_kmeans(x, 7, iters=iters, seed=seed), np.float64,
                     f"seed {seed} iters={iters}")


def test_spherical_kmeans_seeds_are_masked_rows_free():
    x, _ = separated(40, 5, 8, 7)
    mask = np.ones(200, bool)
    mask[::3] = False
    mu = ra.spherical_kmeans(x, 6, iters=0, seed=2, mask=mask)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    picked = [np.flatnonzero(np.all(np.abs(xn - m) < 1e-12, axis=1)) for m in mu]
    assert all(len(p) == 1 and mask[p[0]] for p in picked), "seeds must be unmasked rows"


@pytest.mark.parametrize("dtype", DTYPES)
def test_spherical_kmeans_init_and_float32(dtype):
    x, _ = separated(50, 6, 10, 8)
    x = x.astype(dtype)
    init = ra.spherical_kmeans(x, 6, iters=0, seed=4)
    want = ref.spherical_kmeans(x, 6, iters=0, seed=4)
    assert_close(init, want, dtype, "k-means++ seeds")
    got = ra.spherical_kmeans(x, 6, iters=3, init=init)
    assert got.dtype == dtype
    assert_close(got, ref.spherical_kmeans(x, 6, iters=3, init=init), dtype, "Lloyd from init")


def test_spherical_kmeans_recovers_separated_clusters():
    x, truth = separated(60, 8, 16, 9)
    mu = ra.spherical_kmeans(x, 8, iters=10, seed=0)
    assert same_partition(ra.assign_clusters(x, mu), truth)


def test_spherical_kmeans_empty_cluster_keeps_centroid():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    init = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])       # cluster 2 gets no row
    mu = ra.spherical_kmeans(x, 3, iters=5, init=init)
    np.testing.assert_array_equal(mu[2], init[2])
    assert_close(mu, ref.spherical_kmeans(x, 3, iters=5, init=init), np.float64, "empty")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [65, 130])
def test_spherical_kmeans_lloyd_ties_and_padding(dtype, n):
    # A duplicated centroid ties with its first copy on every row: the first wins, so the
    # copy keeps no row and stays as given; the rows past the last whole block of 64 are
    # labelled like the others, and an infinite centroid raises no invalid-operation flag
    # from the block's padding (one thread: a flag raised on a worker thread is not seen).
    x = rng(3).standard_normal((n, 5)).astype(dtype)
    init = np.array([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], dtype)
    mu = ra.spherical_kmeans(x, 4, iters=1, init=init)
    np.testing.assert_array_equal(mu[1], init[1])
    assert not np.array_equal(mu[0], init[0])
    assert_close(mu, ref.spherical_kmeans(x, 4, iters=1, init=init), dtype, "Lloyd with ties")
    init[2, 0] = np.inf
    threads = ra.get_num_threads()
    ra.set_num_threads(1)
    try:
        with np.errstate(invalid="raise"):
            ra.spherical_kmeans(x, 4, iters=1, init=init)
    finally:
        ra.set_num_threads(threads)


def test_spherical_kmeans_determinism_and_batch_consistency():
    x = rng(10).standard_normal((3, 200, 6))
    a = ra.spherical_kmeans(x, 7, seed=123)
    np.testing.assert_array_equal(a, ra.spherical_kmeans(x, 7, seed=123))
    assert not np.array_equal(a, ra.spherical_kmeans(x, 7, seed=124))
    np.testing.assert_array_equal(a[1], ra.spherical_kmeans(x[1], 7, seed=123))


def test_spherical_kmeans_seeding_past_the_distinct_directions():
    """Fewer distinct directions than clusters: once every direction is a centroid all D²
    weights are 0 and the remaining seeds are uniform picks (the dot-product update, not
    the candidates' gemm column); 9000 rows span several reduction chunks and a short last
    block."""
    g = rng(31)
    # three axis directions scaled by powers of two: unit rows and cosines exactly 0 or 1,
    # so the weights reach exactly 0 (rounding noise would decide the later draws)
    x = np.eye(10)[g.integers(0, 3, 9000)] * 2.0 ** g.integers(-2, 3, (9000, 1))
    got = ra.spherical_kmeans(x, 5, iters=0, seed=4)
    assert_close(got, ref.spherical_kmeans(x, 5, iters=0, seed=4), np.float64, "seeds")
    assert sorted(set(np.argmax(got, axis=1))) == [0, 1, 2] and (got.max(axis=1) == 1).all()
    assert_close(ra.spherical_kmeans(x, 5, iters=3, seed=4),
                 ref.spherical_kmeans(x, 5, iters=3, seed=4), np.float64, "Lloyd")


def test_spherical_kmeans_n_equals_one():
    mu = ra.spherical_kmeans(np.array([[3.0, 4.0]]), 1)
    np.testing.assert_allclose(mu, [[0.6, 0.8]], rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_spherical_kmeans_huge_and_tiny_rows(dtype):
    """Rows whose squares overflow or underflow the dtype are clustered as the same rows
    at ordinary size (spherical k-means sees only directions): the same centroids and
    labels, and the reference's; scaled by powers of two, the very bits.  (Their plain
    sums of squares made them non-finite rows, left out, or zero rows.)"""
    x, _ = separated(40, 5, 8, 21)
    x = x.astype(dtype)
    with np.errstate(over="raise"):           # a rescued sum reports no overflow
        for iters in (0, 3):
            want = ra.spherical_kmeans(x, 5, iters=iters, seed=2)
            y = out_of_range(x, dtype, HUGE, TINY)
            got = ra.spherical_kmeans(y, 5, iters=iters, seed=2)
            with threads(1):
                np.testing.assert_array_equal(ra.spherical_kmeans(y, 5, iters=iters, seed=2),
                                              got, err_msg=f"iters={iters}: one thread")
            assert_close(got, want, dtype, f"iters={iters}: against the ordinary rows")
            assert_close(got, ref.spherical_kmeans(y, 5, iters=iters, seed=2), dtype,
                         f"iters={iters}: against the reference")
            assert_same(ra.assign_clusters(y, got), ra.assign_clusters(x, want),
                        f"iters={iters}: labels")
            exact = ra.spherical_kmeans(out_of_range(x, dtype, HUGE2, TINY2), 5,
                                        iters=iters, seed=2)
            np.testing.assert_array_equal(exact, want, err_msg=f"iters={iters}: powers of 2")


# ------------------------------------------------------------------ update_centroids
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_centroids_against_reference_with_pooling(dtype):
    g = rng(12)
    cent = g.standard_normal((3, 5, 8))
    cent /= np.linalg.norm(cent, axis=-1, keepdims=True)
    x = g.standard_normal((4, 3, 60, 8))
    labels = g.integers(-1, 4, size=(4, 3, 60))                 # cluster 4 empty, some -1
    mask = g.random((4, 3, 60)) > 0.3
    cent, x = cent.astype(dtype), x.astype(dtype)
    got = ra.update_centroids(cent, x, labels, decay=0.7, mask=mask)
    assert got.shape == (3, 5, 8) and got.dtype == dtype
    assert_close(got, ref.update_centroids(cent, x, labels, decay=0.7, mask=mask), dtype,
                 "pooled batch axis")
    np.testing.assert_array_equal(got[:, 4], cent[:, 4], err_msg="empty cluster unchanged")


def test_update_centroids_in_place_and_strided():
    g = rng(13)
    cent = g.standard_normal((6, 4))
    x = g.standard_normal((4, 90))[:, ::-1].T                  # (90, 4), negative strides
    labels = g.integers(0, 6, 90)
    want = ref.update_centroids(cent, x, labels, decay=0.5)
    res = ra.update_centroids(cent, x, labels, decay=0.5, out=cent)
    assert res is cent
    assert_close(cent, want, np.float64, "out=centroids")


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_centroids_huge_and_tiny_rows(dtype):
    """Rows whose squares overflow or underflow: with decay 0 the new centroid is the
    normalised mean, the same for rows scaled by any one factor (before, a huge mean
    became a zero centroid and a tiny one was left unnormalised); with decay 0.7 the
    reference's."""
    g = rng(22)
    cent = g.standard_normal((5, 8))
    cent = (cent / np.linalg.norm(cent, axis=-1, keepdims=True)).astype(dtype)
    x = g.standard_normal((60, 8)).astype(dtype)
    labels = g.integers(-1, 5, 60)
    want = ra.update_centroids(cent, x, labels, decay=0.0)
    with np.errstate(over="raise"):           # a rescued sum reports no overflow
        for size in (HUGE, TINY):
            y = x * dtype(size[dtype])
            assert_close(ra.update_centroids(cent, y, labels, decay=0.0), want, dtype,
                         f"x times {size[dtype]:g}, decay 0")
            assert_close(ra.update_centroids(cent, y, labels, decay=0.7),
                         ref.update_centroids(cent, y, labels, decay=0.7), dtype,
                         f"x times {size[dtype]:g}, decay 0.7")


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_rows_huge_and_tiny_rows(dtype):
    """The layer's row normalisation (its routing decisions) on rows whose squares
    overflow or underflow: the unit rows and |x̂|² of the same rows at ordinary size, the
    norms times the factor, strided rows too; powers of two give the very bits of x̂.  A
    norm beyond the dtype is inf (an overflow warning), its unit row still exact; rows
    with a NaN or an infinity are left as they were (NaN norm, or x / inf)."""
    x = rng(23).standard_normal((30, 37)).astype(dtype)
    x[5] = 0
    want, want_norm, want_sq = ra._ext._normalize_rows(x)
    third = np.arange(30) % 3
    for huge, tiny in ((HUGE, TINY), (HUGE2, TINY2)):
        factor = np.where(third == 0, huge[dtype], np.where(third == 1, tiny[dtype], 1.0))
        y = out_of_range(x, dtype, huge, tiny)
        for name, rows in (("contiguous", y), ("strided", np.asfortranarray(y))):
            with np.errstate(over="raise"):   # a rescued sum reports no overflow
                xhat, norm, sq = ra._ext._normalize_rows(rows)
            what = f"{name}, x times {huge[dtype]:g} and {tiny[dtype]:g}"
            assert_close(xhat, want, dtype, what)
            assert_close(sq, want_sq, dtype, what + ": |x̂|²")
            np.testing.assert_allclose(norm / factor, want_norm, rtol=RTOL[dtype],
                                       err_msg=what + ": norms")
            if huge is HUGE2 and name == "contiguous":
                np.testing.assert_array_equal(xhat, want, err_msg=what)
    beyond = np.full((2, 4), np.finfo(dtype).max / 1.5, dtype)     # norms: 1.33 max
    beyond[1, 0] = -beyond[1, 0]
    with pytest.warns(RuntimeWarning, match="overflow"):
        xhat, norm, sq = ra._ext._normalize_rows(beyond)
    assert np.isinf(norm).all(), "a norm beyond the dtype is inf"
    np.testing.assert_array_equal(xhat, np.sign(beyond) * dtype(0.5), err_msg="beyond")
    bad = np.array([[np.inf, 1e20, 0], [np.nan, 1e20, 0]], dtype)
    with np.errstate(invalid="ignore"):
        xhat, norm, sq = ra._ext._normalize_rows(bad)
    assert np.isinf(norm[0]) and np.array_equal(xhat[0], [np.nan, 0, 0], equal_nan=True)
    assert np.isnan(norm[1]) and np.array_equal(xhat[1], bad[1], equal_nan=True)


def test_commitment_loss_against_reference():
    g = rng(14)
    x = g.standard_normal((2, 100, 6)).astype(np.float32)
    cent = g.standard_normal((5, 6)).astype(np.float32)
    labels = g.integers(-1, 5, (2, 100))
    mask = g.random(100) > 0.1
    got = ra.commitment_loss(x, cent, labels, mask=mask)
    assert got.shape == (2,)
    assert_close(got, ref.commitment_loss(x, cent, labels, mask=mask), np.float32, "loss")
    assert ra.commitment_loss(x, cent, np.full(100, -1)).tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ top_members
@pytest.mark.parametrize("dtype", DTYPES)
def test_top_members_ties_and_nan(dtype):
    s = int_data((2, 250, 19), 15, -3, 4).astype(dtype)        # many exact ties
    s[0, 7, :] = np.nan
    s[1, :, 2] = np.nan                                        # a whole NaN column
    for w in (1, 17, 250):
        got = ra.top_members(s, w)
        assert got.shape == (2, 19, w)
        assert_same(got, ref.top_members(s, w), f"w={w}")
    assert_same(ra.top_members(s, 5)[1, 2], np.arange(5), "all-NaN column: first rows")


def test_top_members_random_strided_out():
    s = rng(16).standard_normal((24, 3000))
    view = s.T[::-1]                                           # (3000, 24) strided view
    out = np.empty((24, 100), np.int64)
    assert ra.top_members(view, 100, out=out) is out
    assert_same(out, ref.top_members(view, 100), "strided scores")
    assert (np.diff(out, axis=1) > 0).all(), "listed by increasing position"


def test_top_members_adversarial_order_and_single_row():
    s = np.arange(5000, dtype=np.float64)[:, None] * np.array([[1.0, -1.0]])  # sorted rows
    assert_same(ra.top_members(s, 64), ref.top_members(s, 64), "ascending / descending")
    assert_same(ra.top_members(np.array([[2.0, 1.0]]), 1), np.array([[0], [0]]), "n=1")


def _top_members_hard_columns(n, seed):
    """Columns aimed at the rare paths of the sampled top-w kernel (whatever its sampling
    stride, periods 8..64 are covered): a sample that overestimates (sampled rows high:
    too few candidates, redo) or underestimates (sampled rows low: the candidate lists
    overflow), masses of ties at the threshold, all-equal, NaN / ±inf columns, too few
    finite scores, and plain random columns."""
    g = rng(seed)
    i = np.arange(n)[:, None]
    cols = []
    for period in (8, 10, 16, 20, 32, 40, 64):
        hi = g.standard_normal((n, 1))
        hi[i[:, 0] % period == 0] += 100.0                     # the sample looks great
        lo = g.standard_normal((n, 1))
        lo[i[:, 0] % period == 0] -= 100.0                     # the sample looks awful
        cols += [hi, lo]
    cols.append(g.integers(0, 3, (n, 1)).astype(float))        # huge ties at the threshold
    cols.append(g.integers(0, 40, (n, 1)).astype(float))       # moderate ties
    cols.append(np.full((n, 1), 0.25))                         # all equal
    cols.append(np.full((n, 1), np.nan))                       # all NaN
    cols.append(np.full((n, 1), -np.inf))                      # all -inf
    mix = np.where(g.random((n, 1)) < 0.5, np.nan, -np.inf)
    cols.append(mix)                                           # NaN and -inf only
    few = np.full((n, 1), np.nan)
    m = min(n, 30)
    few[g.choice(n, m, replace=False)] = g.standard_normal((m, 1))
    cols.append(few)                                           # 30 finite, rest NaN
    some = g.standard_normal((n, 1))
    some[g.random(n) < 0.7] = np.nan
    cols.append(some)                                          # 70% NaN
    pinf = g.standard_normal((n, 1))
    pinf[g.random(n) < 0.1] = np.inf
    cols.append(pinf)                                          # 10% +inf
    ninf = g.standard_normal((n, 1))
    ninf[g.random(n) < 0.9] = -np.inf
    cols.append(ninf)                                          # 90% -inf
    cols.append(np.arange(n, dtype=float)[:, None])            # ascending
    cols.append(-np.arange(n, dtype=float)[:, None])           # descending
    cols.append(g.standard_normal((n, 14)))                    # ordinary columns
    return np.concatenate(cols, axis=1)                        # 44 columns: a 12-lane tail


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w", [1, 2, 7, 64, 100, 300])
def test_top_members_rare_paths(dtype, w):
    s = _top_members_hard_columns(6000, 30 + w).astype(dtype)
    want = ref.top_members(s, w)
    for k in (1, 2):
        with threads(k), np.errstate(all="raise"):             # comparisons raise no flag
            assert_same(ra.top_members(s, w), want, f"w={w}, {k} thread(s)")


@pytest.mark.parametrize("n, w", [(5, 5), (40, 40), (3000, 3000), (3000, 2999), (3000, 1),
                                  (17, 3), (1100, 16), (20000, 5)])
def test_top_members_extreme_w_and_small_n(n, w):
    s = _top_members_hard_columns(n, n + w)
    s32 = s.astype(np.float32)
    assert_same(ra.top_members(s, w), ref.top_members(s, w), f"n={n}, w={w} f64")
    assert_same(ra.top_members(s32, w), ref.top_members(s32, w), f"n={n}, w={w} f32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_members_small_w_ties_keep_row_order(dtype):
    """w <= 16 runs an insertion network over every row: displaced entries must keep
    their place ahead of equal later rows (ties to the lower position)."""
    for hi in (3, 12, 40, 200):
        s = int_data((3000, 37), 40 + hi, 0, hi).astype(dtype)
        s[::7] = hi - 1                                          # late equal rows too
        for w in (2, 5, 11, 16):
            assert_same(ra.top_members(s, w), ref.top_members(s, w), f"hi={hi}, w={w}")


def test_top_members_all_equal_and_many_ties():
    s = np.full((5000, 20), 3.0, np.float32)
    assert_same(ra.top_members(s, 120), np.tile(np.arange(120), (20, 1)), "all equal")
    t = int_data((2, 8000, 37), 31, 0, 2).astype(np.float32)   # two values: half tie
    assert_same(ra.top_members(t, 150), ref.top_members(t, 150), "ties at the threshold")


def test_top_members_wide_batched_strided():
    """More clusters than one work unit, a batch, a non-contiguous view, odd c."""
    g = rng(32)
    s = g.standard_normal((2, 300, 4100)).astype(np.float32)
    view = np.swapaxes(s, -1, -2)[:, ::-1]                      # (2, 4100, 300) strided
    want = ref.top_members(view, 50)
    for k in (1, 2):
        with threads(k):
            assert_same(ra.top_members(view, 50), want, f"strided batch, {k} thread(s)")
            assert_same(ra.top_members(np.ascontiguousarray(view[:, :, :261]), 50),
                        want[:, :261], f"contiguous, c=261, {k} thread(s)")


# ------------------------------------------------------------------ assign_top_members
def assign_then_top(x, cent, w):
    """What assign_top_members must equal: the two kernels through the stored scores."""
    labels, scores, best = ra.assign_clusters(x, cent, return_scores=True)
    return labels, best, ra.top_members(scores, w), scores


def assert_assign_top(x, cent, w, what):
    labels, best, members, scores = assign_then_top(x, cent, w)
    for k in (1, 2, 3):         # 3: row parts of unequal size, lists joined from three
        with threads(k), np.errstate(all="raise"):             # comparisons raise no flag
            got = ra.assign_top_members(x, cent, w)
        assert_same(got[0], labels, f"{what}: labels, {k} thread(s)")
        assert got[1].dtype == x.dtype and got[1].shape == best.shape, what
        np.testing.assert_array_equal(got[1], best, err_msg=f"{what}: best, {k} thread(s)")
        assert_same(got[2], members, f"{what}: members, {k} thread(s)")
    return scores, members


# (n, c, d, w): n·c >= 2**20 scores run the fused kernel (c = 70: a partial last unit of
# clusters; c = 300: several units on one thread), smaller ones store the scores, w <= 16
# has no sampling plan
ASSIGN_TOP_CASES = [(16384, 64, 8, 256), (20000, 70, 3, 300), (4000, 300, 4, 40),
                    (3000, 17, 5, 100), (500, 10, 6, 9), (64, 3, 2, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, c, d, w", ASSIGN_TOP_CASES)
def test_assign_top_members_equals_assign_then_top(dtype, n, c, d, w):
    g = rng(n + c)
    x = g.standard_normal((n, d)).astype(dtype)
    cent = g.standard_normal((c, d)).astype(dtype)
    scores, members = assert_assign_top(x, cent, w, f"n={n} c={c} d={d} w={w}")
    assert_same(members, ref.top_members(scores, w), "against the reference")


@pytest.mark.parametrize("simd", ["default", "avx2", "generic"])
def test_assign_top_members_on_every_kernel_table(simd):
    """The fused kernel scores the sampled rows per unit of clusters and a block of 16
    columns again, with gemm calls narrower than assign_clusters' one: equal bits on every
    instruction set's vector width, for a partial last unit and a tail narrower than a
    vector."""
    code = (
        "import numpy as np, routing_attention as ra\n"
        "g = np.random.default_rng(5)\n"
        "for dt in (np.float32, np.float64):\n"
        "    for n, c, w in ((30000, 37, 1000), (5000, 261, 19)):\n"
        "        x = g.standard_normal((n, 9)).astype(dt)\n"
        "        x[::4] = np.nan                             # every column takes the exact path\n"
        "        x[1::4] = g.standard_normal((len(x[1::4]), 9)).astype(dt)\n"
        "        cent = g.standard_normal((c, 9)).astype(dt)\n"
        "        with np.errstate(invalid='ignore'):\n"
        "            lab, sc, best = ra.assign_clusters(x, cent, return_scores=True)\n"
        "            want = ra.top_members(sc, w)\n"
        "        for k in (1, 2):\n"
        "            ra.set_num_threads(k)\n"
        "            got = ra.assign_top_members(x, cent, w)\n"
        "            assert np.array_equal(got[0], lab) and np.array_equal(got[2], want), (dt, n, k)\n"
        "            assert np.array_equal(got[1], best, equal_nan=True), (dt, n, k)\n"
        "        x = g.standard_normal((n, 9)).astype(dt)   # finite rows: the sampled path\n"
        "        lab, sc, best = ra.assign_clusters(x, cent, return_scores=True)\n"
        "        got = ra.assign_top_members(x, cent, w // 4)\n"
        "        assert np.array_equal(got[2], ra.top_members(sc, w // 4)), (dt, n)\n"
        "        assert np.array_equal(got[0], lab) and np.array_equal(got[1], best), (dt, n)\n"
        "print('ok', ra.build_info()['simd'])\n")
    out = run_with_simd(code, simd)
    assert out.split()[0] == "ok", out


def test_assign_top_members_ties_across_units():
    """Small integers: exact ties between clusters (c = 300: two threshold units even on
    one thread) go to the lowest cluster, as in assign_clusters."""
    x, cent = int_data((8000, 3), 21, -1, 2), int_data((300, 3), 22, -1, 2)
    assert_assign_top(x, cent, 50, "integer ties")
    want = ref.assign_clusters(x, cent)
    assert_same(ra.assign_top_members(x, cent, 50)[0], want, "labels against the reference")


@pytest.mark.parametrize("w", [20, 64, 100, 300])
def test_assign_top_members_rare_paths(w):
    """The hard finite columns of the top_members tests as exact scores (x · identity):
    samples that over- or underestimate, masses of ties, sorted columns; the fused
    kernel's short or overflowing lists score their column again."""
    hard = _top_members_hard_columns(60000, 7 + w)
    hard = hard[:, np.isfinite(hard).all(axis=0)]              # x·μ with NaN/inf is not exact
    cent = np.eye(hard.shape[1])
    assert hard.shape[0] * hard.shape[1] >= 2**20, "the fused kernel runs"
    _, members = assert_assign_top(hard, cent, w, f"hard columns, w={w}")
    assert_same(members, ref.top_members(hard, w), f"hard columns against the reference, w={w}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_top_members_nan_rows(dtype):
    """Every 4th row NaN (so every sampled row is, whatever the sampling stride): each
    cluster's threshold is -inf and every column takes the exact path; NaN rows get
    label -1, best NaN, and rank last."""
    g = rng(9)
    x = g.standard_normal((40000, 6)).astype(dtype)
    x[::4] = np.nan
    x[1::8, 2] = np.inf
    cent = g.standard_normal((33, 6)).astype(dtype)
    assert_assign_top(x, cent, 1300, "NaN rows")
    labels, best, members = ra.assign_top_members(x, cent, 1300)
    assert (labels[::4] == -1).all() and np.isnan(best[::4]).all()


def test_assign_top_members_strided_broadcast_out():
    g = rng(12)
    x = g.standard_normal((2, 1, 9000, 10)).astype(np.float32)[..., ::-1, ::2]   # (2,1,9000,5)
    cent = g.standard_normal((3, 130, 5)).astype(np.float32)
    out = (np.empty((2, 3, 9000), np.int64), np.empty((2, 3, 9000), np.float32),
           np.empty((2, 3, 130, 69), np.int64))
    got = ra.assign_top_members(x, cent, 69, out=out)
    assert all(a is b for a, b in zip(got, out))
    labels, best, members, _ = assign_then_top(x, cent, 69)
    assert_same(out[0], labels, "labels")
    np.testing.assert_array_equal(out[1], best)
    assert_same(out[2], members, "members")


def test_assign_top_members_bad_input():
    x, cent = np.zeros((10, 4)), np.ones((3, 4))
    with pytest.raises(ValueError, match="w"):
        ra.assign_top_members(x, cent, 11)
    with pytest.raises(ValueError, match="w"):
        ra.assign_top_members(x, cent, 0)
    with pytest.raises(ValueError, match="centroids"):
        ra.assign_top_members(x, np.ones((3, 5)), 2)
    with pytest.raises(TypeError, match="tuple"):
        ra.assign_top_members(x, cent, 2, out=np.empty(10, np.int64))
    with pytest.raises(TypeError, match="out has dtype float64"):
        ra.assign_top_members(x, cent, 2, out=(np.empty(10), np.empty(10), np.empty((3, 2))))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 2\)"):
        ra.assign_top_members(x, cent, 2, out=(np.empty(10, np.int64), np.empty(10),
                                               np.empty((3, 3), np.int64)))
    labels = np.empty(10, np.int64)
    with pytest.raises(ValueError, match="overlap"):
        ra.assign_top_members(x, cent, 2, out=(labels, np.empty(10), labels[:6].reshape(3, 2)))
    scores = np.empty((10, 3))
    with pytest.raises(ValueError, match="overlap"):
        ra.assign_clusters(x, cent, return_scores=True, out=(labels, scores, scores[:, 0]))
    from routing_attention import _ext
    with pytest.raises(ValueError, match="w must be"):
        _ext._assign_top(x, cent, out=(np.empty(10, np.int64), np.empty(10),
                                       np.empty((3, 11), np.int64)))


def test_no_clusters_through_the_raw_gufuncs():
    """c = 0 reaches the kernels only through the private gufuncs (the wrappers want a
    centroid): no members to list, every label -1, and no crash."""
    from routing_attention import _ext
    x = rng(2).standard_normal((4096, 8)).astype(np.float32)
    out = (np.zeros(4096, np.int64), np.zeros(4096, np.float32), np.empty((0, 20), np.int64))
    _ext._assign_top(x, np.empty((0, 8), np.float32), out=out)
    assert (out[0] == -1).all() and np.isnan(out[1]).all()
    assert ra.top_members(np.empty((4096, 0), np.float32), 20).shape == (0, 20)


@pytest.mark.parametrize("n, c", [(4096, 256), (512, 16)])
def test_assign_top_members_invalid_flag_like_assign_clusters(n, c):
    """inf·0 in the product raises the invalid flag, in the fused kernel (4096 x 256) as
    in the stored path and in assign_clusters; NaN inputs and the comparisons never do."""
    info = ra.build_info()
    if "clang" in info["compiler"].lower() and info["openmp"]:
        pytest.skip("clang + LLVM's OpenMP runtime: a product's FE_INVALID raised inside a "
                    "parallel region does not reach the caller (values are unaffected)")
    g = rng(4)
    x = g.standard_normal((n, 8)).astype(np.float32)
    x[::3, 0] = np.inf
    cent = g.standard_normal((c, 8)).astype(np.float32)
    cent[:, 0] = 0
    for k in (1, 2):
        with threads(k), np.errstate(invalid="raise"):
            with pytest.raises(FloatingPointError):
                ra.assign_clusters(x, cent, return_scores=True)
            with pytest.raises(FloatingPointError):
                ra.assign_top_members(x, cent, 20)
    x[::3, 0] = np.nan
    with np.errstate(all="raise"):
        labels, best, _ = ra.assign_top_members(x, cent, 20)
    assert (labels[::3] == -1).all() and np.isnan(best[::3]).all()


# ------------------------------------------------------------------ members_from_labels
def test_members_from_labels_against_reference():
    labels = rng(17).integers(-1, 6, (3, 80))
    got = ra.members_from_labels(labels, 7)
    assert_same(got, ref.members_from_labels(labels, 7), "default max_size")
    assert (got[:, 6] == -1).all()
    short = ra.members_from_labels(labels, 7, max_size=4)
    assert_same(short, ref.members_from_labels(labels, 7, max_size=4), "truncated")
    assert ra.members_from_labels(np.full(5, -1), 2).shape == (2, 0)


# ------------------------------------------------------------------ lsh_hash
@pytest.mark.parametrize("dtype", DTYPES)
def test_lsh_hash_exact_on_integer_data(dtype):
    x = int_data((2, 200, 7), 18).astype(dtype)
    planes = int_data((2, 63, 8), 19).astype(dtype)           # many projections == threshold
    got = ra.lsh_hash(x, planes)
    assert_same(got, ref.lsh_hash(x, planes), "63 bits, exact ties -> 0")
    assert (got >= 0).all()


def test_lsh_hash_random_broadcast_and_strided():
    g = rng(20)
    x = g.standard_normal((3, 1, 150, 16))[..., ::-1, :]
    planes = g.standard_normal((4, 24, 17))
    got = ra.lsh_hash(x, planes)
    assert got.shape == (3, 4, 150)
    want = ref.lsh_hash(x, planes)
    proj = x @ np.swapaxes(planes[..., :16], -1, -2) - planes[..., None, :, 16]
    near = (np.abs(proj) < 1e-12).any(axis=-1)
    assert not near.any()
    assert_same(got, want, "random planes")


def test_lsh_hash_d1_bit1():
    x = np.array([[-1.0], [0.5], [2.0]])
    assert_same(ra.lsh_hash(x, np.array([[1.0, 0.5]])), np.array([0, 0, 1]), "d=1, 1 bit")


# ------------------------------------------------------------------ hamming_kmeans
@pytest.mark.parametrize("iters", [0, 1, 3, 25])
def test_hamming_kmeans_against_reference(iters):
    g = rng(21)
    codes = g.integers(0, 2**20, (2, 300))
    mask = g.random((2, 300)) > 0.15
    got = ra.hamming_kmeans(codes, 12, iters=iters, seed=5, mask=mask, return_centroids=True)
    want = ref.hamming_kmeans(codes, 12, iters=iters, seed=5, mask=mask, return_centroids=True)
    assert_same(got[0], want[0], "labels")
    assert_same(got[1], want[1], "centroids")
    assert (got[0][~mask] == -1).all() and (got[0][mask] >= 0).all()


@pytest.mark.parametrize("simd", ["default", "avx512", "avx2", "generic"])
def test_hamming_kmeans_on_every_kernel_table(simd):
    """Each instruction set's Hamming kernels (VPOPCNTQ, popcnt, SWAR; forced by RA_SIMD)
    give the reference labels over more than one row chunk, on full 64-bit codes and on
    codes that fit 32 bits (the narrow-word kernels); and its LSH code kernel the
    reference codes."""
    code = (
        "import numpy as np, routing_attention as ra\n"
        "from routing_attention import reference as ref\n"
        "g = np.random.default_rng(24)\n"
        "for hi in (2**63 - 1, 2**32 - 1):\n"
        "    codes = g.integers(-hi - 1 if hi > 2**32 else 0, hi, (2, 5000), dtype=np.int64)\n"
        "    mask = g.random((2, 5000)) > 0.1\n"
        "    got = ra.hamming_kmeans(codes, 17, iters=4, seed=3, mask=mask, return_centroids=True)\n"
        "    want = ref.hamming_kmeans(codes, 17, iters=4, seed=3, mask=mask, return_centroids=True)\n"
        "    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), hi\n"
        "# the LSH codes' vector threshold compares: exact integer products, whole vectors\n"
        "# and tails, a NaN row (bits 0, and no invalid flag: the compares are quiet)\n"
        "for dt in (np.float32, np.float64):\n"
        "    for bits in (5, 16, 33, 63):\n"
        "        x = g.integers(-3, 4, (2, 300, 9)).astype(dt)\n"
        "        x[0, 4] = np.nan\n"
        "        p = g.integers(-3, 4, (bits, 10)).astype(dt)\n"
        "        p[:, -1] += 0.5\n"
        "        with np.errstate(all='raise'):\n"
        "            got = ra.lsh_hash(x, p)\n"
        "        with np.errstate(invalid='ignore'):\n"
        "            want = ref.lsh_hash(x, p)\n"
        "        assert np.array_equal(got, want) and got[0, 4] == 0, (dt, bits)\n"
        "print('ok', ra.build_info()['simd'])\n")
    out = run_with_simd(code, simd)
    if simd in ("avx2", "generic"):
        assert out.split()[1] in (simd, "generic"), out


@pytest.mark.parametrize("bits, c", [(0, 3), (1, 2), (3, 5), (7, 255), (8, 257), (15, 600),
                                     (40, 1024), (63, 100), (64, 300), (64, 1025)])
def test_hamming_kmeans_code_widths_and_cluster_counts(bits, c):
    """The Lloyd assign runs on bit planes for 1-64 used bits and c <= 1024 (label planes:
    one to ten of them here; distance planes 3-7, seven at 64 bits) and word by word for
    c > 1024 or all-zero codes: the reference labels and centroids each way, over partial
    blocks."""
    g = rng(31)
    if bits == 64:
        codes = g.integers(-2**63, 2**63 - 1, 1300, dtype=np.int64)
    else:
        codes = g.integers(0, 2**bits, 1300, dtype=np.int64)
    mask = g.random(1300) > 0.1
    got = ra.hamming_kmeans(codes, c, iters=2, seed=3, mask=mask, return_centroids=True)
    want = ref.hamming_kmeans(codes, c, iters=2, seed=3, mask=mask, return_centroids=True)
    assert_same(got[0], want[0], "labels")
    assert_same(got[1], want[1], "centroids")


def test_hamming_kmeans_reseeds_empty_clusters():
    codes = np.array([0, 0, 0, 0, 1, 1, 3, 3] * 5)             # 3 distinct codes, 6 clusters
    got = ra.hamming_kmeans(codes, 6, iters=4, seed=1, return_centroids=True)
    want = ref.hamming_kmeans(codes, 6, iters=4, seed=1, return_centroids=True)
    assert_same(got[0], want[0], "labels")
    assert_same(got[1], want[1], "centroids")


def test_hamming_kmeans_recovers_separated_clusters():
    g = rng(22)
    centers = g.integers(0, 2**63, 10)
    truth = g.permutation(np.repeat(np.arange(10), 50))
    flips = np.zeros(truth.size, np.int64)
    for _ in range(2):                                         # <= 2 flipped bits of 63
        flips |= np.left_shift(1, g.integers(0, 63, truth.size))
    codes = centers[truth] ^ flips
    labels = ra.hamming_kmeans(codes, 10, iters=10, seed=0)
    assert same_partition(labels, truth)


def test_hamming_kmeans_determinism_and_batch_consistency():
    codes = rng(23).integers(0, 2**30, (3, 400))
    a = ra.hamming_kmeans(codes, 9, seed=77)
    np.testing.assert_array_equal(a, ra.hamming_kmeans(codes, 9, seed=77))
    assert not np.array_equal(a, ra.hamming_kmeans(codes, 9, seed=78))
    np.testing.assert_array_equal(a[2], ra.hamming_kmeans(codes[2], 9, seed=77))
    assert (ra.hamming_kmeans(codes, 3, mask=np.zeros(400, bool)) == -1).all()


# ------------------------------------------------------------------ threads
def test_bit_identical_for_one_and_two_threads():
    g = rng(24)
    n = 9000                                                   # > 2 reduction chunks
    x = g.standard_normal((n, 8)).astype(np.float32)
    planes = g.standard_normal((40, 9)).astype(np.float32)
    mask = g.random(n) > 0.1

    def run():
        mu = ra.spherical_kmeans(x, 16, iters=3, seed=9, mask=mask)
        labels = ra.assign_clusters(x, mu)
        codes = ra.lsh_hash(x, planes)
        return [mu, labels, ra.top_members(x @ mu.T, 300),
                ra.update_centroids(mu, x, labels, decay=0.9, mask=mask),
                ra.commitment_loss(x, mu, labels, mask=mask),
                ra.members_from_labels(labels, 16), codes,
                ra.hamming_kmeans(codes, 20, iters=3, seed=9, mask=mask),
                # several one-chunk problems: one per thread, serial loops inside
                ra.hamming_kmeans(codes[:3000].reshape(6, 500), 20, iters=3, seed=9)]

    with threads(1):
        one = run()
    with threads(2):
        two = run()
    for i, (a, b) in enumerate(zip(one, two)):
        assert a.tobytes() == b.tobytes(), f"output {i} differs between 1 and 2 threads"


# ------------------------------------------------------------------ bad input
X = np.zeros((10, 4))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ra.spherical_kmeans(X, 0), ValueError, "n_clusters"),
    (lambda: ra.spherical_kmeans(X, 11), ValueError, "n_clusters"),
    (lambda: ra.spherical_kmeans(X, 2.5), TypeError, "n_clusters"),
    (lambda: ra.spherical_kmeans(X, 2, iters=-1), ValueError, "iters"),
    (lambda: ra.spherical_kmeans(X, 2, seed=-1), ValueError, "seed"),
    (lambda: ra.spherical_kmeans(X[0], 2), ValueError, "x"),
    (lambda: ra.spherical_kmeans(X.astype(complex), 2), TypeError, "x"),
    (lambda: ra.spherical_kmeans(X, 2, mask=np.ones(10)), TypeError, "mask"),
    (lambda: ra.spherical_kmeans(X, 2, mask=np.ones(9, bool)), ValueError, "mask"),
    (lambda: ra.spherical_kmeans(X, 2, init=np.zeros((3, 4))), ValueError, "init"),
    (lambda: ra.assign_clusters(X, np.zeros((3, 5))), ValueError, "feature size"),
    (lambda: ra.assign_clusters(X, np.zeros((0, 4))), ValueError, "centroids"),
    (lambda: ra.update_centroids(np.zeros((3, 4)), X, np.full(10, 3)), ValueError, "labels"),
    (lambda: ra.update_centroids(np.zeros((3, 4)), X, np.full(10, -2)), ValueError, "labels"),
    (lambda: ra.update_centroids(np.zeros((3, 4)), X, np.zeros(10)), TypeError, "labels"),
    (lambda: ra.update_centroids(np.zeros((3, 4)), X, np.zeros(9, int)), ValueError, "labels"),
    (lambda: ra.update_centroids(np.zeros((3, 4)), X, np.zeros(10, int), decay=2),
     ValueError, "decay"),
    (lambda: ra.commitment_loss(X, np.zeros((3, 4)), np.full(10, 5)), ValueError, "labels"),
    (lambda: ra.top_members(X, 0), ValueError, "w"),
    (lambda: ra.top_members(X, 11), ValueError, "w"),
    (lambda: ra.top_members(X[0], 1), ValueError, "scores"),
    (lambda: ra.members_from_labels(np.full(5, 2), 2), ValueError, "labels"),
    (lambda: ra.members_from_labels(np.zeros(5, int), 0), ValueError, "n_clusters"),
    (lambda: ra.members_from_labels(np.zeros(5, int), 1, max_size=-1), ValueError, "max_size"),
    (lambda: ra.lsh_hash(X, np.zeros((64, 5))), ValueError, "63"),
    (lambda: ra.lsh_hash(X, np.zeros((8, 4))), ValueError, "planes"),
    (lambda: ra.lsh_hash(X, np.zeros(5)), ValueError, "planes"),
    (lambda: ra.hamming_kmeans(np.zeros(5), 2), TypeError, "codes"),
    (lambda: ra.hamming_kmeans(np.zeros(5, int), 6), ValueError, "n_clusters"),
    (lambda: ra.hamming_kmeans(np.zeros(5, int), 0), ValueError, "n_clusters"),
    (lambda: ra.hamming_kmeans(np.zeros(5, int), 2, return_centroids=1), TypeError,
     "return_centroids"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_gufunc_rejects_bad_shapes_directly():
    """The C adapters guard the private gufuncs too: no out-of-bounds access."""
    from routing_attention import _ext
    with pytest.raises(ValueError, match="planes"):
        _ext._lsh_hash(X, np.zeros((3, 9)))
    with pytest.raises(ValueError, match="w must be"):
        _ext._top_members(X, out=np.empty((4, 11), np.int64))
    with pytest.raises(ValueError, match="labels"):
        _ext._members_from_labels(np.array([0, 7]), out=np.empty((2, 2), np.int64))


def test_out_arguments_are_checked():
    """out= of the helpers: the shape the other arguments give (top_members: w columns),
    and int64 exactly where the results are labels, codes or positions."""
    rng = np.random.default_rng(3)
    x, cent = rng.standard_normal((2, 30, 4)), rng.standard_normal((5, 4))
    scores = rng.standard_normal((30, 5))
    with pytest.raises(ValueError, match=r"out must have shape \(5, 3\)"):
        ra.top_members(scores, 3, out=np.empty((5, 4), np.int64))
    with pytest.raises(TypeError, match="out has dtype float64"):
        ra.top_members(scores, 3, out=np.empty((5, 3)))
    with pytest.raises(TypeError, match="out has dtype float64"):
        ra.assign_clusters(x, cent, out=np.empty((2, 30)))
    with pytest.raises(ValueError, match="out must have shape"):
        ra.assign_clusters(x, cent, out=np.empty((30,), np.int64))
    with pytest.raises(ValueError, match="out must have shape"):
        ra.lsh_hash(x, rng.standard_normal((8, 5)), out=np.empty((2, 31), np.int64))
    with pytest.raises(ValueError, match="out must have shape"):
        ra.update_centroids(cent, x[0], np.zeros(30, np.int64), out=np.empty((4, 4)))
    labels = np.empty((2, 30), np.int64)
    assert ra.assign_clusters(x, cent, out=labels) is labels
    assert np.array_equal(labels, ra.assign_clusters(x, cent))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assign_clusters_return_scores(dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 300, 12)).astype(dtype)[..., ::-1, :]     # negative stride
    cent = rng.standard_normal((3, 7, 12)).astype(dtype)
    labels, scores, best = ra.assign_clusters(x, cent, return_scores=True)
    want = x.astype(np.float64) @ np.swapaxes(cent, -1, -2).astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    assert scores.dtype == dtype and scores.shape == (2, 3, 300, 7)
    assert np.max(np.abs(scores - want)) <= tol * np.max(np.abs(want))
    assert np.array_equal(labels, ra.assign_clusters(x, cent))
    assert np.array_equal(labels, scores.argmax(-1)), "labels are the argmax of the returned scores"
    assert np.array_equal(best, scores.max(-1))
    # out=: a (labels, scores, best) tuple, filled in place (strided views included)
    got = (np.full((2, 3, 300), -7, np.int64), np.empty((2, 3, 300, 9), dtype)[..., 1:8],
           np.empty((2, 3, 300), dtype))
    res = ra.assign_clusters(x, cent, out=got, return_scores=True)
    assert all(r is g for r, g in zip(res, got))
    for g, w in zip(got, (labels, scores, best)):
        assert np.array_equal(g, w)
    with pytest.raises(TypeError, match="tuple"):
        ra.assign_clusters(x, cent, out=np.empty((2, 3, 300), np.int64), return_scores=True)
    with pytest.raises(ValueError, match="shape"):
        ra.assign_clusters(x, cent, out=(None, np.empty((2, 3, 300, 6), dtype), None),
                           return_scores=True)


def test_hamming_kmeans_small_batches_run_problem_parallel_identically():
    """n <= one row chunk with a batch runs whole problems in parallel: the answers must
    equal one problem at a time and the 1-thread run."""
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 2**40, (5, 300), dtype=np.int64)
    mask = rng.random((5, 300)) < 0.9
    res = {}
    try:
        for t in (1, 2):
            ra.set_num_threads(t)
            res[t] = ra.hamming_kmeans(codes, 7, iters=6, seed=3, mask=mask, return_centroids=True)
    finally:
        ra.set_num_threads(0)
    for a, b in zip(res[1], res[2]):
        assert np.array_equal(a, b)
    for p in range(5):
        one = ra.hamming_kmeans(codes[p], 7, iters=6, seed=3, mask=mask[p], return_centroids=True)
        assert np.array_equal(one[0], res[2][0][p]) and np.array_equal(one[1], res[2][1][p])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_of_no_features_in_the_reference_too(dtype):
    """d = 0: the kernels give (c, 0) centroids; the reference's power-of-two row scaling
    (for huge and tiny rows) must not turn that into an error (a max over no entries)."""
    x = np.zeros((6, 0), dtype)
    got = ra.spherical_kmeans(x, 3, iters=2)
    want = ref.spherical_kmeans(x, 3, iters=2)
    assert got.shape == want.shape == (3, 0)
    labels = np.array([0, 1, 2, 0, 1, 2])
    cent = np.zeros((3, 0), dtype)
    np.testing.assert_array_equal(ra.update_centroids(cent, x, labels, decay=0.5),
                                  ref.update_centroids(cent, x, labels, decay=0.5))
