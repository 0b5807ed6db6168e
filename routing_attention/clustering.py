"""Routing decisions: who attends to whom.

Spherical k-means (Routing Transformer), online centroid updates and the commitment
loss, balanced (top-w) and argmax membership lists, random-hyperplane LSH codes and
Hamming k-means (Fast Transformers' clustered attention).  Every function is a thin
keyword wrapper over a C gufunc; results are deterministic for a given seed and
bit-identical for any thread count.  Labels, member lists and codes are int64; a label
of -1 means "in no cluster" (padding).
"""
import numpy as np

from . import _ext
from ._checks import (as_array, as_bool_mask, as_matrix, batch_shape, check_out, cluster_count,
                      core_shape, decay_value, disjoint_outputs, flag, float_dtype, int_array,
                      integer, labels_array, lsh_planes, out_tuple, same_features,
                      some_clusters)

__all__ = ["spherical_kmeans", "assign_clusters", "update_centroids", "commitment_loss",
           "top_members", "assign_top_members", "members_from_labels", "lsh_hash",
           "hamming_kmeans"]

MAX_BITS = 63


# ------------------------------------------------------------------ argument helpers
def _mask(mask, n):
    """(…, n) bool mask; None means every row takes part."""
    if mask is None:
        return np.broadcast_to(np.True_, (n,))
    return as_bool_mask("mask", mask, n, "rows")


def _seed(seed):
    s = integer("seed", seed, 0, 2**64 - 1)
    return np.uint64(s)


# ------------------------------------------------------------------ spherical k-means
def spherical_kmeans(x, n_clusters, *, iters=10, seed=0, mask=None, init=None):
    """Unit-norm centroids by spherical k-means (Lloyd iterations on L2-normalised rows).

    Parameters
    ----------
    x : array_like, shape (..., n, d)
        Rows to cluster; they are L2-normalised first (a zero row stays zero; a finite
        row of any size, its squares scaled out of overflow and underflow).  A row
        holding a NaN or an infinity takes no part, as if masked.
    n_clusters : int
        c, in [1, n].
    iters : int
        Lloyd iterations (assign every row to its most similar centroid, then set each
        centroid to the normalised sum of its rows).  Stops early at a fixed point;
        0 returns the initial centroids.
    seed : int
        Seeds the (greedy) k-means++ initialisation: the first centroid is a uniformly
        drawn row; each next one is, of 2 + ⌊ln c⌋ rows drawn with probability ∝ D²,
        D = 1 − (largest cosine to the centroids so far), the one leaving the least
        total D² (as scikit-learn does).  Same seed, same result (any thread count).
    mask : array_like of bool, shape (..., n), optional
        False rows take no part.  With no row left, the centroids are 0.
    init : array_like, shape (..., c, d), optional
        Initial centroids instead of k-means++ (used as given, not normalised).

    Returns
    -------
    centroids : ndarray (..., c, d).  A cluster that loses every row keeps its centroid.

    Raises
    ------
    TypeError, ValueError
        Non-float x, n_clusters outside [1, n], iters < 0, a seed outside [0, 2**64),
        mask or init of the wrong shape, naming the argument.
    """
    dtype = float_dtype(x=x) if init is None else float_dtype(x=x, init=init)
    x = as_matrix("x", x, dtype)
    n, d = x.shape[-2:]
    c = cluster_count(n_clusters, n, "x", x.shape)
    iters = integer("iters", iters, 0)
    seed = _seed(seed)
    m = _mask(mask, n)
    if init is None:
        init_arr, use_init = np.broadcast_to(np.zeros((), dtype), (c, d)), False
    else:
        init_arr, use_init = as_matrix("init", init, dtype), True
        core_shape("init", init_arr.shape, (c, d), "n_clusters, d")
    batch = batch_shape(x=(x, 2), mask=(m, 1), init=(init_arr, 2))
    out = np.empty(batch + (c, d), dtype)
    _ext._spherical_kmeans(x, m, init_arr, use_init, np.int64(iters), seed, out=out)
    return out


def _rows_and_centroids(x, centroids):
    """Checked x (..., n, d), centroids (..., c >= 1, d) of one float dtype, and the
    broadcast batch shape."""
    dtype = float_dtype(x=x, centroids=centroids)
    x = as_matrix("x", x, dtype)
    cent = as_matrix("centroids", centroids, dtype)
    same_features("x", x, "centroids", cent)
    some_clusters(cent)
    return x, cent, dtype, batch_shape(x=(x, 2), centroids=(cent, 2))


def assign_clusters(x, centroids, *, out=None, return_scores=False):
    """labels (..., n) int64: argmax over clusters of x·μ_c, ties to the lowest c.

    x (..., n, d) and centroids (..., c, d) broadcast over leading axes.  Rows need not
    be normalised (the argmax of the cosine is the same).  A row whose scores are all
    NaN gets label -1.  With ``return_scores=True`` also returns the scores x·μᵀ
    (..., n, c) and each row's best score (..., n) (NaN where the label is -1), from
    the same product: what balanced membership (`top_members`) and the commitment
    loss need, without a second pass; `out` is then a (labels, scores, best) tuple.

    Raises
    ------
    TypeError, ValueError
        Bad dtypes, x and centroids of different d, no centroid, a bad `out`.
    """
    x, cent, dtype, batch = _rows_and_centroids(x, centroids)
    n, c = x.shape[-2], cent.shape[-2]
    if return_scores:
        if out is None:
            return _ext._assign_scores(x, cent)
        out = out_tuple(out, 3, "(labels, scores, best)")
        out = disjoint_outputs((check_out(out[0], batch + (n,), np.int64, exact=True),
                         check_out(out[1], batch + (n, c), dtype),
                         check_out(out[2], batch + (n,), dtype)))
        return _ext._assign_scores(x, cent, out=out)
    return _ext._assign_clusters(x, cent, out=check_out(out, batch + (n,), np.int64, exact=True))


def update_centroids(centroids, x, labels, *, decay=0.999, mask=None, out=None):
    """One online (mini-batch EMA) step of spherical k-means.

    μ_c ← normalise(decay·μ_c + (1 − decay)·mean of the rows of x labelled c), with rows
    where mask is False (or label −1) left out; a cluster with no such row is unchanged.
    The rows are used as given (normalise them first for spherical k-means).

    Parameters
    ----------
    centroids : array_like (..., c, d)
    x : array_like (..., n, d);  labels : int array (..., n) in [-1, c)
        x, labels and mask may have more leading axes than centroids: those extra
        (leftmost) axes are pooled into the mean, e.g. centroids (heads, c, d) with
        x (batch, heads, n, d).
    decay : float in [0, 1]
    mask : array_like of bool (..., n), optional
    out : ndarray (..., c, d), optional; may be `centroids` itself (in-place update).

    Returns
    -------
    The updated centroids (..., c, d).

    Raises
    ------
    TypeError, ValueError
        Bad dtypes, different d, labels outside [-1, c), decay outside [0, 1], a mask
        or out of the wrong shape.
    """
    dtype = float_dtype(centroids=centroids, x=x)
    cent = as_matrix("centroids", centroids, dtype)
    x = as_matrix("x", x, dtype)
    same_features("centroids", cent, "x", x)
    c, (n, d) = cent.shape[-2], x.shape[-2:]
    lab = labels_array(labels, n, c)
    m = _mask(mask, n)
    dec = dtype.type(decay_value(decay))
    xb = batch_shape(x=(x, 2), labels=(lab, 1), mask=(m, 1))
    extra = len(xb) - (cent.ndim - 2)
    if extra > 0:
        # pool the extra leading axes into the row axis: (P..., R..., n) -> (R..., P·n)
        rest = xb[extra:]
        pooled = int(np.prod(xb[:extra]))
        src, dst = list(range(extra)), list(range(len(rest), len(rest) + extra))
        x = np.moveaxis(np.broadcast_to(x, xb + (n, d)), src, dst).reshape(rest + (pooled * n, d))
        lab = np.moveaxis(np.broadcast_to(lab, xb + (n,)), src, dst).reshape(rest + (pooled * n,))
        m = np.moveaxis(np.broadcast_to(m, xb + (n,)), src, dst).reshape(rest + (pooled * n,))
    batch = batch_shape(centroids=(cent, 2), x=(x, 2))
    return _ext._update_centroids(cent, x, lab, m, dec,
                                  out=check_out(out, batch + cent.shape[-2:], dtype))


def commitment_loss(x, centroids, labels, *, mask=None):
    """The Routing Transformer's commitment loss: mean over rows of ‖x_i − μ_label(i)‖².

    x (..., n, d) (normally the L2-normalised queries/keys), centroids (..., c, d),
    labels (..., n) in [-1, c); rows labelled -1 or with mask False are left out.
    Returns one loss per problem, shape (...) (broadcast batch), 0 where no row counts;
    average it over the batch for a scalar.  It is a value, not differentiated here:
    its gradient with respect to x_i is 2 (x_i − μ_label(i)) / count.

    Raises
    ------
    TypeError, ValueError
        Bad dtypes, different d, labels outside [-1, c), a mask of the wrong shape.
    """
    dtype = float_dtype(x=x, centroids=centroids)
    x = as_matrix("x", x, dtype)
    cent = as_matrix("centroids", centroids, dtype)
    same_features("x", x, "centroids", cent)
    lab = labels_array(labels, x.shape[-2], cent.shape[-2])
    m = _mask(mask, x.shape[-2])
    batch_shape(x=(x, 2), centroids=(cent, 2), labels=(lab, 1), mask=(m, 1))
    return _ext._commitment_loss(x, cent, lab, m)


# ------------------------------------------------------------------ membership lists
def top_members(scores, w, *, out=None):
    """Balanced membership: the w best rows of every cluster.

    Parameters
    ----------
    scores : array_like (..., n, c)
        Score of every row for every cluster (e.g. x·μᵀ from `assign_clusters`).
    w : int, 1 <= w <= n
        Members per cluster.
    out : ndarray (..., c, w) of int64, optional

    Returns
    -------
    idx : ndarray (..., c, w) int64: for each cluster the w rows with the largest score
    (NaN ranks as −inf; ties to the lower position), listed by increasing position.  A row
    may be in several clusters or in none.  Exact, in O(n·c) (a selection, not a sort).

    Raises
    ------
    TypeError, ValueError
        A non-float scores array, w outside [1, n], a bad `out`.
    """
    dtype = float_dtype(scores=scores)
    s = as_matrix("scores", scores, dtype)
    n, c = s.shape[-2:]
    w = integer("w", w, 1, n)
    shape = s.shape[:-2] + (c, w)
    out = np.empty(shape, np.int64) if out is None else check_out(out, shape, np.int64, exact=True)
    return _ext._top_members(s, out=out)


def assign_top_members(x, centroids, w, *, out=None):
    """Both routing decisions of one product: (labels, best, members).

    Parameters
    ----------
    x : array_like (..., n, d);  centroids : array_like (..., c, d)
        Leading axes broadcast.
    w : int, 1 <= w <= n
        Members per cluster (balanced membership).
    out : tuple of three ndarrays, optional
        (labels, best, members), not overlapping one another.

    Returns
    -------
    labels (..., n) int64, best (..., n), members (..., c, w) int64: bit for bit
    ``assign_clusters(x, centroids, return_scores=True)``'s labels and best scores and
    ``top_members(scores, w)``'s members, without ever storing the (..., n, c) scores (so
    it needs less memory and less memory traffic on long sequences).

    Raises
    ------
    TypeError, ValueError
        Bad dtypes, mismatched d, w outside [1, n], a bad or overlapping `out`.
    """
    x, cent, dtype, batch = _rows_and_centroids(x, centroids)
    n, c = x.shape[-2], cent.shape[-2]
    w = integer("w", w, 1, n)
    shapes = ((batch + (n,), np.int64), (batch + (n,), dtype), (batch + (c, w), np.int64))
    if out is None:
        out = tuple(np.empty(shape, t) for shape, t in shapes)
    else:
        out = disjoint_outputs(tuple(check_out(o, shape, t, exact=t is np.int64)
                              for o, (shape, t) in zip(out_tuple(out, 3, "(labels, best, members)"),
                                                       shapes)))
    return _ext._assign_top(x, cent, out=out)


def members_from_labels(labels, n_clusters, *, max_size=None):
    """Argmax membership as lists: labels (..., n) -> members (..., c, s) int64.

    Row i is listed under cluster labels[i] (rows labelled -1 nowhere), in increasing
    position, padded with -1.  s = max_size, or by default the largest cluster size in
    the whole batch; a cluster with more than max_size rows keeps its first max_size.

    Raises
    ------
    TypeError, ValueError
        Non-integer labels, labels outside [-1, n_clusters), n_clusters < 1,
        max_size < 0.
    """
    c = integer("n_clusters", n_clusters, 1)
    lab = int_array("labels", labels)
    lab = labels_array(lab, lab.shape[-1], c)
    n = lab.shape[-1]
    if max_size is None and lab.size == 0:      # no rows (or no problems): empty lists
        s = 0
    elif max_size is None:
        flat = lab.reshape(-1, n)
        keys = flat + c * np.arange(flat.shape[0])[:, None]
        sizes = np.bincount(keys[flat >= 0], minlength=flat.shape[0] * c)
        s = int(sizes.max()) if sizes.size else 0
    else:
        s = integer("max_size", max_size, 0)
    out = np.empty(lab.shape[:-1] + (c, s), np.int64)
    return _ext._members_from_labels(lab, out=out)


# ------------------------------------------------------------------ LSH + Hamming k-means
def lsh_hash(x, planes, *, out=None):
    """Random-hyperplane codes: x (..., n, d), planes (..., bits, d + 1) -> (..., n) int64.

    Bit b of a row's code is 1 iff x·planes[b, :d] > planes[b, d] (the last column is a
    threshold); bits are packed lowest first, bits <= 63, so codes are non-negative.

    Raises
    ------
    TypeError, ValueError
        Bad dtypes, planes without 1..63 rows or without d + 1 columns, a bad `out`.
    """
    dtype = float_dtype(x=x, planes=planes)
    x = as_matrix("x", x, dtype)
    p = as_matrix("planes", planes, dtype)
    lsh_planes(p, x.shape[-1], MAX_BITS)
    batch = batch_shape(x=(x, 2), planes=(p, 2))
    return _ext._lsh_hash(x, p, out=check_out(out, batch + x.shape[-2:-1], np.int64, exact=True))


def hamming_kmeans(codes, n_clusters, *, iters=10, seed=0, mask=None, return_centroids=False):
    """k-means in Hamming space: codes (..., n) int64 -> labels (..., n) int64.

    Distance popcount(a xor b), ties to the lowest cluster; a centroid is the per-bit
    majority of its rows (a tied bit is 0); seeded greedy k-means++ initialisation (D² on
    the Hamming distance, best of 2 + ⌊ln c⌋ draws per centroid); a cluster left empty is re-seeded with a random row drawn from
    the same seeded stream.  Rows where mask is False get label -1.  Stops early at a
    fixed point.  With return_centroids, also returns the centroid codes (..., c).

    Raises
    ------
    TypeError, ValueError
        Non-integer codes, n_clusters outside [1, n], iters < 0, a seed outside
        [0, 2**64), a mask of the wrong shape.
    """
    cd = int_array("codes", codes)
    n = cd.shape[-1]
    c = cluster_count(n_clusters, n, "codes", cd.shape)
    iters = integer("iters", iters, 0)
    seed = _seed(seed)
    m = _mask(mask, n)
    batch = batch_shape(codes=(cd, 1), mask=(m, 1))
    labels = np.empty(batch + (n,), np.int64)
    cent = np.empty(batch + (c,), np.int64)
    _ext._hamming_kmeans(cd, m, np.int64(iters), seed, out=(labels, cent))
    return (labels, cent) if flag("return_centroids", return_centroids) else labels
