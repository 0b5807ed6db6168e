"""Routing attention (Routing Transformer) and local attention on the C tile engine."""
import numpy as np

from . import _ext
from .clustering import assign_top_members, members_from_labels, spherical_kmeans, update_centroids
from ._checks import (BackwardKeywords, LayerCalls, LayerContext, as_array, as_bool_mask,
                      as_matrix, batch_shape, broadcast_heads, check_out, core_size,
                      decay_value, dout_shape, dropout_args, flag, float_dtype, given_or_saved,
                      integer, into_out, kernel_checked_lists, kernel_out, layer_dout, mask_fits,
                      member_lists, one_of, pair_record, qkv_arrays, qkv_shapes,
                      rel_bias_array, routing_heads, same_cluster_count, same_leading_axes,
                      saved_arrays, scale_option, scale_value, some_rows, unbroadcast)
from .pairs import _checked

__all__ = ["RoutingAttention", "routing_attention", "routing_attention_backward", "local_attention",
           "local_attention_backward", "check_members", "local_members"]

MERGES = ("mean", "lse")
DEFAULTS = dict(causal=False, exclude_self=False, merge="mean", scale=None, dropout_p=0.0,
                dropout_seed=None, rel_bias=None)
LOCAL_DEFAULTS = dict(window=None, causal=False, scale=None, dropout_p=0.0, dropout_seed=None,
                      rel_bias=None)


check_members = member_lists     # the public name of the membership check (_checks.py)


def _prepare(q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale, dropout_p=0.0,
             dropout_seed=None, rel_bias=None):
    """Checked arguments; the last two are the pair-term operands of the gufuncs and the
    resolved pair terms (dropout_p, dropout_seed, rel_bias)."""
    q, k, v = qkv_arrays(q, k, v)
    dtype = q.dtype
    # the kernel validates the entries (kernel_checked_lists gives its error the message)
    q_idx = member_lists("q_idx", q_idx, q.shape[-2], deferred=True)
    k_idx = member_lists("k_idx", k_idx, k.shape[-2], deferred=True)
    same_cluster_count(q_idx, k_idx)
    one_of("merge", merge, MERGES)
    _, _, pairs, terms = _checked(
        dtype, dict(q=(q, 2), k=(k, 2), v=(v, 2), q_idx=(q_idx, 2), k_idx=(k_idx, 2)),
        q.shape[-2], k.shape[-2], dropout_p, dropout_seed, rel_bias)
    return (q, k, v, q_idx, k_idx, flag("causal", causal), flag("exclude_self", exclude_self),
            merge == "lse", scale_value(scale, q.shape[-1], dtype), pairs, terms)


def _lists(q, k, q_idx, k_idx):
    """The membership lists as kernel_checked_lists takes them."""
    return (("q_idx", q_idx, q.shape[-2]), ("k_idx", k_idx, k.shape[-2]))


def _keywords(causal, exclude_self, lse_merge, scale, terms):
    """The forward's keywords as saved["keywords"] records them."""
    return dict(causal=causal, exclude_self=exclude_self, merge="lse" if lse_merge else "mean",
                scale=float(scale), **pair_record(terms))


def routing_attention(q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False, merge="mean",
                      scale=None, dropout_p=0.0, dropout_seed=None, rel_bias=None,
                      return_lse=False, return_saved=False, out=None):
    """Attention inside clusters given by membership lists (Routing Transformer).

    Parameters
    ----------
    q (..., n, d), k (..., m, d), v (..., m, e) : array_like
    q_idx : int array (..., c, w)
        For each cluster, the positions of its queries; -1 marks an empty slot.
    k_idx : int array (..., c, u)
        For each cluster, the positions of its keys.  Cluster c lets every query in
        q_idx[c] attend to every key in k_idx[c].  Entries must lie in [-1, n) / [-1, m)
        and not repeat inside one list (ValueError otherwise).
    causal : bool
        Key j visible to query i only if j <= i (original positions).
    exclude_self : bool
        For shared-QK models: key i is hidden from query i unless it is the only key
        that query can see in that cluster.
    merge : {"mean", "lse"}
        How a token in several clusters combines its per-cluster outputs: their mean
        (as the papers' code does), or weights exp(lse_c - L) — exactly one softmax over
        the concatenated key lists.  A token in no cluster gets output 0.
    scale : float, optional (default 1/sqrt(d))
    dropout_p, dropout_seed, rel_bias
        Attention dropout and relative position bias on the (query, key) pairs of each
        cluster, by original positions, as in `routing_attention.attention` (see
        `routing_attention.pairs`); the exclude_self fallback pair gets them too.
    return_lse : bool
        Also return L = logsumexp over the token's per-cluster log-sum-exps, (..., n).
    return_saved : bool
        Also return a dict of the forward's statistics (merged output and lse, each
        (cluster, query) slot's lse, and its output row where the token is in several
        clusters — a token in one cluster has its row in the merged output, and its slot
        row is left unwritten: not read, its values unspecified) and ``keywords`` (the
        resolved causal,
        exclude_self, merge and scale); pass it as
        ``routing_attention_backward(dout, q, k, v, q_idx, k_idx, **saved)`` to skip
        recomputing the forward.
    out : ndarray (..., n, e), optional

    Returns
    -------
    out (..., n, e) [, lse (..., n)] [, saved dict]

    Raises
    ------
    TypeError, ValueError
        Bad dtypes or shapes, member lists out of range or repeating a position, an
        unknown merge, naming the argument.
    """
    o, saved = _forward(q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale, out,
                        pair_args=(dropout_p, dropout_seed, rel_bias))
    result = (o,)
    if flag("return_lse", return_lse):
        result += (saved["lse"],)
    if flag("return_saved", return_saved):
        result += (saved,)
    return result[0] if len(result) == 1 else result


SAVED_KEYS = ("output", "lse", "slot_output", "slot_lse", "slot_self")


def _forward(q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale, out, saved_into=None,
             pair_args=(0.0, None, None)):
    """The checked forward -> the saved dict (output, lse, slot_output, slot_lse,
    slot_self, keywords); with `saved_into` (a saved dict of an identical earlier call)
    its arrays but the output are overwritten (the output goes to `out`).
    pair_args: (dropout_p, dropout_seed, rel_bias)."""
    q, k, v, q_idx, k_idx, causal, exclude_self, lse_merge, scale, pairs, terms = _prepare(
        q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale, *pair_args)
    batch = batch_shape(q=(q, 2), k=(k, 2), v=(v, 2), q_idx=(q_idx, 2), k_idx=(k_idx, 2),
                        rel_bias=(pairs[2], 1))
    target = check_out(out, batch + (q.shape[-2], v.shape[-1]), q.dtype)
    outs = (kernel_out(target, q.dtype, q, k, v), None, None, None, None)
    if saved_into is not None:
        outs = outs[:1] + tuple(saved_into[key] for key in SAVED_KEYS[1:])
    stats = kernel_checked_lists(
        lambda: _ext._routing_forward(q, k, v, q_idx, k_idx, scale, causal, exclude_self,
                                      lse_merge, *pairs, out=outs),
        _lists(q, k, q_idx, k_idx))
    return into_out(target, stats[0]), dict(
        zip(SAVED_KEYS, stats), keywords=_keywords(causal, exclude_self, lse_merge, scale, terms))


def routing_attention_backward(dout, q, k, v, q_idx, k_idx, *, causal=None, exclude_self=None,
                               merge=None, scale=None, dropout_p=None, dropout_seed=None,
                               rel_bias=None, **saved):
    """Gradients (dq, dk, dv [, drel_bias]) of `routing_attention` (memberships are not
    differentiated).

    ``**saved`` is the dict `routing_attention(..., return_saved=True)` returned for the
    same inputs; without it the forward is recomputed inside.  causal, exclude_self,
    merge, scale, dropout_p, dropout_seed and rel_bias left at None are taken from it
    (saved["keywords"]), or without it are the forward's defaults (False, False, "mean",
    1/sqrt(d), no dropout, no bias).  With a bias (passed or saved) its gradient is
    returned as well.  The results have the shapes of q, k, v [and rel_bias].

    Raises
    ------
    ValueError
        A keyword that disagrees with the saved forward's, naming it; saved arrays of
        the wrong shape; and the forward's input errors.
    """
    kw = BackwardKeywords("routing_attention_backward", saved, DEFAULTS, causal=causal,
                          exclude_self=exclude_self, merge=merge, scale=scale,
                          dropout_p=dropout_p, dropout_seed=dropout_seed, rel_bias=rel_bias)
    q, k, v, q_idx, k_idx, causal, exclude_self, lse_merge, scale, pairs, terms = _prepare(
        q, k, v, q_idx, k_idx, **kw.values)
    kw.check(_keywords(causal, exclude_self, lse_merge, scale, terms))
    saved = kw.arrays
    dout = as_matrix("dout", dout, q.dtype)
    dout_shape(dout, q.shape[-2], v.shape[-1])
    batch_shape(dout=(dout, 2), q=(q, 2), k=(k, 2), v=(v, 2), q_idx=(q_idx, 2), k_idx=(k_idx, 2),
                rel_bias=(pairs[2], 1))
    # the forward's statistics have its batch axes (dout may add more: they broadcast)
    batch = batch_shape(q=(q, 2), k=(k, 2), v=(v, 2), q_idx=(q_idx, 2), k_idx=(k_idx, 2),
                        rel_bias=(pairs[2], 1))
    n, e, (c, w) = q.shape[-2], v.shape[-1], q_idx.shape[-2:]
    shapes = dict(output=(n, e), lse=(n,), slot_output=(c, w, e), slot_lse=(c, w), slot_self=(c, w))
    dtypes = {key: np.bool_ if key == "slot_self" else q.dtype for key in SAVED_KEYS}
    arrays = saved_arrays(saved, SAVED_KEYS, batch, shapes, dtypes, contiguous=True)
    dq, dk, dv, dbias = kernel_checked_lists(
        lambda: _ext._routing_backward(dout, q, k, v, q_idx, k_idx, *arrays, bool(saved), scale,
                                       causal, exclude_self, lse_merge, *pairs),
        _lists(q, k, q_idx, k_idx))
    grads = (unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape))
    return grads + (unbroadcast(dbias, pairs[2].shape),) if terms[2] is not None else grads


# ------------------------------------------------------------------ local attention
def local_members(n, m, window, causal):
    """Membership lists of local attention: cluster b holds the queries of block b and
    the keys of blocks b-1, b (and b+1 unless causal); -1 pads short lists."""
    window = integer("window", window, low=1)
    # a window covering every position is one block: the same lists, without allocating
    # `window`-long rows for a huge window
    window = min(window, max(n, m, 1))
    blocks = max(1, -(-n // window))
    starts = np.arange(blocks, dtype=np.int64)[:, None] * window
    q_idx = starts + np.arange(window, dtype=np.int64)[None, :]
    q_idx[q_idx >= n] = -1
    span = 2 if causal else 3
    k_idx = (starts - window) + np.arange(span * window, dtype=np.int64)[None, :]
    k_idx[(k_idx < 0) | (k_idx >= m)] = -1
    return q_idx, k_idx


def _local_args(q, k, v, window, causal):
    """Checked q, k, v and the block member lists; sizes are checked before the lists
    are built (a huge n must not allocate them)."""
    q, k, v = qkv_arrays(q, k, v)
    return q, k, v, local_members(q.shape[-2], k.shape[-2], window, flag("causal", causal))


def local_attention(q, k, v, window, *, causal=False, scale=None, dropout_p=0.0,
                    dropout_seed=None, rel_bias=None, return_saved=False, out=None):
    """Blocked local attention: positions are cut into blocks of `window`; a query in
    block b sees the keys in blocks b-1 and b (and b+1 when not causal); causal also
    needs j <= i.  n need not be a multiple of `window`.  Runs on the routing planner
    with one cluster per block.  Shapes, dropout_p, dropout_seed and rel_bias as in
    `attention`.

    ``return_saved=True`` also returns a dict of the forward's statistics and its
    ``keywords`` (window, causal, scale, dropout, bias) for ``local_attention_backward(dout, q, k, v,
    **saved)``.  Raises ValueError for window < 1 or a sequence longer than the kernels
    index (2**30 - 1), before any list is built."""
    q, k, v, (q_idx, k_idx) = _local_args(q, k, v, window, causal)
    pair_kw = dict(dropout_p=dropout_p, dropout_seed=dropout_seed, rel_bias=rel_bias)
    if not flag("return_saved", return_saved):
        return routing_attention(q, k, v, q_idx, k_idx, causal=causal, scale=scale, out=out,
                                 **pair_kw)
    out, saved = routing_attention(q, k, v, q_idx, k_idx, causal=causal, scale=scale,
                                   return_saved=True, out=out, **pair_kw)
    routed = saved["keywords"]
    saved["keywords"] = dict(window=integer("window", window, low=1),
                             **{key: routed[key] for key in LOCAL_DEFAULTS if key != "window"})
    return out, saved


def local_attention_backward(dout, q, k, v, window=None, *, causal=None, scale=None,
                             dropout_p=None, dropout_seed=None, rel_bias=None, **saved):
    """Gradients (dq, dk, dv [, drel_bias]) of `local_attention`.  ``**saved``: the
    forward's ``return_saved=True`` dict; window, causal, scale, dropout_p, dropout_seed
    and rel_bias left at None are taken from it (else: window is required, causal False,
    scale 1/sqrt(d), no dropout, no bias; with a bias its gradient is returned too).  A
    keyword that disagrees with the saved forward's is a ValueError naming it.

    Raises
    ------
    TypeError, ValueError
        As `local_attention`; a keyword that disagrees with the saved forward's, naming it.
    """
    kw = BackwardKeywords("local_attention_backward", saved, LOCAL_DEFAULTS, window=window,
                          causal=causal, scale=scale, dropout_p=dropout_p,
                          dropout_seed=dropout_seed, rel_bias=rel_bias)
    given_or_saved("local_attention_backward", "window", kw.values["window"])
    window, causal, scale = kw.values["window"], kw.values["causal"], kw.values["scale"]
    q, k, v, (q_idx, k_idx) = _local_args(q, k, v, window, causal)
    p, seed, _ = dropout_args(kw.values["dropout_p"], kw.values["dropout_seed"])
    bias = rel_bias_array(kw.values["rel_bias"], q.shape[-2], k.shape[-2], q.dtype)
    kw.check(dict(window=integer("window", window, low=1), causal=causal,
                  scale=float(scale_value(scale, q.shape[-1], q.dtype)), dropout_p=p,
                  dropout_seed=seed, rel_bias=bias))
    return routing_attention_backward(dout, q, k, v, q_idx, k_idx, causal=causal, scale=scale,
                                      dropout_p=p, dropout_seed=seed, rel_bias=bias,
                                      **kw.arrays)


# ------------------------------------------------------------------ the layer
def _normalize(x, out=None):
    """Rows of x scaled to unit L2 norm (zero rows stay zero; into `out` if given), their
    norms (..., n, 1) and the squared norms of the scaled rows (..., n), in one C pass."""
    xhat, norm, sq = _ext._normalize_rows(x, out=(out, None, None))
    return xhat, norm[..., None], sq


def _normalize_backward(dxhat, xhat, norm):
    """Gradient through x -> x / |x|: (dx̂ - x̂ (x̂·dx̂)) / |x|."""
    proj = np.einsum("...d,...d->...", xhat, dxhat)[..., None]
    return np.where(norm > 0, (dxhat - xhat * proj) / np.where(norm > 0, norm, 1), 0)


def _mask_members(idx, mask):
    """Replace members whose mask entry is False by -1.  idx (..., c, w), mask (..., n)."""
    if mask is None:
        return idx
    mask = np.asarray(mask, bool)
    batch = np.broadcast_shapes(idx.shape[:-2], mask.shape[:-1])
    idx = np.broadcast_to(idx, batch + idx.shape[-2:])
    flat = np.broadcast_to(mask, batch + mask.shape[-1:]).reshape(batch + (1, -1))
    keep = np.take_along_axis(np.broadcast_to(flat, batch + (idx.shape[-2], mask.shape[-1])),
                              np.maximum(idx, 0), axis=-1)
    return np.where((idx >= 0) & keep, idx, -1)


class RoutingAttention(LayerCalls):
    """Routing Transformer attention layer: online spherical k-means routing plus local heads.

    Inputs are q, k, v of shape (..., heads, n, d) / (..., heads, m, d) / (..., heads, m, e);
    leading axes and a heads axis of 1 broadcast (the routing heads need q and k with
    the same leading axes), and `backward` sums each gradient back to its input's shape.
    ``layer(q, k, v, key_mask=, query_mask=)`` takes optional boolean masks (..., m) and
    (..., n) whose leading axes broadcast to q's batch axes: a False key is padding no
    query sees, in every head; a False query is in no cluster and gets output 0.
    Each head has its own unit-norm centroids (heads, c, d), shared by its queries and
    keys, initialised by `spherical_kmeans` on the first batch (all batch rows pooled)
    and, while `training`, moved by one `update_centroids` step (EMA with `decay`) per
    call on that call's normalised queries and keys (padding excluded).  A query whose
    row is not finite joins no cluster and gets a NaN output row, as in dense attention;
    a key whose row is not finite joins no cluster either, so in the routing heads no
    query sees it (its gradient rows are 0; the local heads see it as dense attention
    does).  n_clusters and w larger than the rows the layer sees are clamped to them.

    ``layer.backward(dout)`` returns (dq, dk, dv) for the one ``layer(...)`` call made
    since the previous backward; after several calls, take each call's context:
    ``out, ctx = layer.forward(q, k, v)`` then ``layer.backward(dout, ctx)``
    (``backward(dout)`` raises RuntimeError rather than guess the call).

    Parameters
    ----------
    n_clusters : int, optional
        Clusters per head; default round(sqrt(n)) at the first call.
    local_heads : int
        The first `local_heads` heads run `local_attention` (window `window`) instead of
        routing, as in the paper's mix of local and routing heads.
    window : int, optional
        Local attention window; default n // n_clusters.
    shared_qk : bool
        Shared-QK attention: keys are the normalised queries (the `k` argument is not
        used and gets zero gradient) and a token does not attend to itself unless
        alone (`exclude_self`), in local heads too.
    causal : bool
        Causal masking by position inside clusters (and in local heads).
    membership : {"balanced", "argmax"}
        "balanced": every cluster takes its w best queries and keys (`top_members`,
        w = n // n_clusters by default); tokens may be in several clusters or none (a
        query in none gets output 0 from the routing heads: with random data and the
        default w, 10–17 % of them).  This looks at the whole sequence, so
        future tokens influence which past keys a query meets.  "argmax": each token
        joins its nearest centroid (`members_from_labels`), which depends on the token
        alone: causal for given centroids (the first call's k-means and, while
        `training`, the EMA update use the whole batch; fix the centroids and set
        `training = False` for strictly causal evaluation).
    w : int, optional
        Members per cluster for balanced membership.
    merge : {"mean", "lse"}
        How a token in several clusters combines them (see `routing_attention`).
    decay : float
        EMA decay of the centroid update (0.999 in the paper).
    kmeans_iters, seed : int
        Initial spherical k-means.
    scale : float, optional
        Logit scale (default 1/sqrt(d)).

    The initial k-means runs on at most INIT_ROWS_PER_CLUSTER · n_clusters rows per head
    (a seeded random sample of the first batch's queries and keys), so the first call
    stays fast on long sequences.

    After each call, `commitment_loss` (..., routing heads) holds mean ‖x̂ − μ_label‖²
    per batch entry and routing head over the normalised queries and keys (the paper's
    auxiliary loss, reported, not differentiated; masked rows left out) and `q_idx` /
    `k_idx` the memberships used.

    Raises
    ------
    TypeError, ValueError
        At construction, an option out of range (n_clusters, local_heads, window, w < 1,
        decay outside [0, 1], an unknown membership or merge); at a call, bad inputs
        or masks (naming them), more local heads than heads, or a head count that does
        not match the fitted centroids.  At `backward`, a dout not shaped
        exactly like that call's output (ValueError).
    RuntimeError
        `backward(dout)` without a context after two or more calls.
    """

    INIT_ROWS_PER_CLUSTER = 64

    def __init__(self, n_clusters=None, *, local_heads=0, window=None, shared_qk=False,
                 causal=False, membership="balanced", w=None, merge="mean", decay=0.999,
                 kmeans_iters=10, seed=0, scale=None):
        one_of("membership", membership, ("balanced", "argmax"))
        one_of("merge", merge, MERGES)
        self.n_clusters = None if n_clusters is None else integer("n_clusters", n_clusters, low=1)
        self.local_heads = integer("local_heads", local_heads, low=0)
        self.window = None if window is None else integer("window", window, low=1)
        self.w = None if w is None else integer("w", w, low=1)
        self.shared_qk = flag("shared_qk", shared_qk)
        self.causal = flag("causal", causal)
        self.membership, self.merge = membership, merge
        self.decay = decay_value(decay)
        self.kmeans_iters = integer("kmeans_iters", kmeans_iters, low=0)
        self.seed = integer("seed", seed, 0, 2**64 - 1)
        self.scale = scale_option(scale)
        self.training = True
        self.centroids = None
        self.commitment_loss = None
        self.q_idx = self.k_idx = None

    def __repr__(self):
        options = dict(local_heads=self.local_heads, window=self.window, shared_qk=self.shared_qk,
                       causal=self.causal, membership=self.membership, w=self.w, merge=self.merge,
                       decay=self.decay, kmeans_iters=self.kmeans_iters, seed=self.seed,
                       scale=self.scale)
        text = ", ".join(f"{key}={value!r}" for key, value in options.items())
        return f"RoutingAttention(n_clusters={self.n_clusters!r}, {text})"

    # -- routing decisions ------------------------------------------------------
    def _pool_head(self, q, k, h, qhat, qsq, pooled=None):
        """Head h's normalised queries and keys side by side, (..., n+m, d) (written into
        `pooled` if given), and their squared norms (..., n+m).  Shared-QK: the normalised
        queries, twice."""
        if qhat is not None:
            x, sq = qhat[..., h, :, :], qsq[..., h, :]
            return np.concatenate([x, x], axis=-2), np.concatenate([sq, sq], axis=-1)
        n = q.shape[-2]
        if pooled is None:
            pooled = np.empty(q.shape[:-3] + (n + k.shape[-2], q.shape[-1]), q.dtype)
        _, _, qsq_h = _normalize(q[..., h, :, :], out=pooled[..., :n, :])
        _, _, ksq_h = _normalize(k[..., h, :, :], out=pooled[..., n:, :])
        return pooled, np.concatenate([qsq_h, ksq_h], axis=-1)

    def _score_head(self, xhat, centroids, size, mask=None):
        """Labels and best scores (..., n) of the normalised rows xhat (..., n, d) against
        one head's centroids (c, d); with balanced membership also the members (..., c,
        size), else None.  One product, and the (n, c) scores are never stored
        (assign_top_members).  mask (..., n), optional: with balanced membership its
        False rows compete for no place (they are scored as non-finite rows, which rank
        after every other row and are labelled -1), so what padding holds cannot change
        which real rows a cluster takes; the caller drops them from the lists.  (Argmax
        labels are per row: there padding changes nothing anyway.)"""
        if self.membership != "balanced":
            labels, best = _ext._assign_best(xhat, centroids)
            return labels, best, None
        if mask is not None:
            xhat = np.where(np.asarray(mask, bool)[..., None], xhat, np.nan)
        return assign_top_members(xhat, centroids, min(size, xhat.shape[-2]))

    def _init_centroids(self, q, k, qhat, qsq, pool_mask):
        """Spherical k-means on the first batch: per head, all its normalised queries and
        keys (batch rows pooled), or a seeded sample of INIT_ROWS_PER_CLUSTER · c rows."""
        heads, n, d = q.shape[-3:]
        c = self.n_clusters or max(1, int(round(np.sqrt(n))))
        rows = mh = None
        xs = []
        for h in range(heads):
            x = self._pool_head(q, k, h, qhat, qsq)[0].reshape(-1, d)        # (B·(n+m), d)
            if rows is None and x.shape[0] > self.INIT_ROWS_PER_CLUSTER * c:
                rows = np.sort(np.random.default_rng(self.seed).choice(
                    x.shape[0], self.INIT_ROWS_PER_CLUSTER * c, replace=False))
            xs.append(x if rows is None else x[rows])
        x = np.stack(xs)                                                       # (heads, rows, d)
        if pool_mask is not None:
            mh = np.moveaxis(pool_mask.reshape((-1, heads, pool_mask.shape[-1])), 0, 1)
            mh = mh.reshape(heads, -1)
            mh = mh if rows is None else mh[:, rows]
        self.centroids = spherical_kmeans(x, min(c, x.shape[-2]), iters=self.kmeans_iters,
                                          seed=self.seed, mask=mh)

    def _route(self, q, k, key_mask, query_mask, qhat=None, qsq=None):
        """Member lists (q_idx, k_idx) of the routing heads q (..., heads, n, d), k (...,
        heads, m, d), one head at a time: the head's queries and keys are normalised side
        by side into one buffer, scored against its centroids (one product gives the
        balanced members, the argmax labels and the commitment loss |x̂|² − 2 x̂·μ_label +
        |μ_label|², without storing the (n, c) scores), and, in training, its centroids
        move by one update_centroids step on that buffer.  So only one head's normalised
        rows are alive at once.  Shared-QK: qhat, qsq are the normalised queries.
        Also returns `lost` (..., heads, n): the queries routed nowhere because their
        scores are NaN (a non-finite query row)."""
        heads, n, d = q.shape[-3:]
        m = n if qhat is not None else k.shape[-2]
        pool_mask = None
        if key_mask is not None or query_mask is not None:
            qm = np.ones(q.shape[:-1], bool) if query_mask is None else \
                np.broadcast_to(query_mask, q.shape[:-1])
            km = np.ones(q.shape[:-2] + (m,), bool) if key_mask is None else \
                np.broadcast_to(key_mask, q.shape[:-2] + (m,))
            pool_mask = np.concatenate([qm, km], axis=-1)                  # (..., heads, n+m)
        if self.centroids is None:
            self._init_centroids(q, k, qhat, qsq, pool_mask)
        c = self.centroids.shape[-2]
        qm = None if query_mask is None else np.asarray(query_mask, bool)[..., 0, :]
        km = None if key_mask is None else np.asarray(key_mask, bool)[..., 0, :]
        wq, wk = self.w or max(1, n // c), self.w or max(1, m // c)
        mu2 = np.einsum("...cd,...cd->...c", self.centroids, self.centroids)     # (heads, c)
        batch = q.shape[:-3]
        labels = np.empty(batch + (heads, n + m), np.int64)
        loss = np.empty(batch + (heads,), q.dtype)
        q_idx = k_idx = None
        # a float copy (centroids a user set may be of any dtype): the call's precision or more
        new_centroids = self.centroids.astype(
            np.result_type(self.centroids, q.dtype) if self.centroids.dtype.kind == "f"
            else q.dtype)
        pool_buf = None if qhat is not None else np.empty(batch + (n + m, d), q.dtype)
        for h in range(heads):      # pool_buf: one head's rows, refilled by every head
            pooled, sq = self._pool_head(q, k, h, qhat, qsq, pool_buf)
            lq, bq, mq = self._score_head(pooled[..., :n, :], self.centroids[h], wq, qm)
            if qhat is not None and qm is None and km is None:
                lk, bk, mk = lq, bq, mq     # shared-QK: the keys are the queries
            else:                           # (a mask decides which of them compete)
                lk, bk, mk = self._score_head(pooled[..., n:, :], self.centroids[h], wk, km)
            if mq is not None:
                mq, mk = _mask_members(mq, qm), _mask_members(mk, km)
                if q_idx is None:
                    q_idx = np.empty(mq.shape[:-2] + (heads,) + mq.shape[-2:], np.int64)
                    k_idx = np.empty(mk.shape[:-2] + (heads,) + mk.shape[-2:], np.int64)
                q_idx[..., h, :, :], k_idx[..., h, :, :] = mq, mk
            lab = labels[..., h, :]
            lab[..., :n], lab[..., n:] = lq, lk
            best = np.concatenate([bq, bk], axis=-1)
            sq = sq - 2 * best + mu2[h][np.maximum(lab, 0)]
            weight = (lab >= 0).astype(sq.dtype)
            if pool_mask is not None:
                weight = weight * pool_mask[..., h, :]
            sq = np.where(weight > 0, sq, 0)
            loss[..., h] = (sq * weight).sum(-1) / np.maximum(weight.sum(-1), 1)
            if self.training:
                new_centroids[h] = update_centroids(
                    self.centroids[h], pooled, lab, decay=self.decay,
                    mask=None if pool_mask is None else pool_mask[..., h, :])
        del pool_buf, pooled
        if self.membership != "balanced":   # one width for all heads: the largest cluster's size
            qmask = None if qm is None else qm[..., None, :]
            kmask = None if km is None else km[..., None, :]
            q_idx = _mask_members(members_from_labels(labels[..., :n], c), qmask)
            k_idx = _mask_members(members_from_labels(labels[..., n:], c), kmask)
        self.commitment_loss = loss
        self.centroids = new_centroids
        return q_idx, k_idx, labels[..., :n] < 0

    # -- forward / backward -----------------------------------------------------
    @staticmethod
    def _layer_mask(name, mask, length, batch):
        """A (..., length) boolean mask whose leading axes broadcast to `batch` (the
        queries' batch axes, without heads), with a heads axis added; or None."""
        if mask is None:
            return None
        mask = as_bool_mask(name, mask, length, "keys" if name == "key_mask" else "queries")
        mask_fits(name, mask, batch, per_head=False)
        return mask[..., None, :]

    def forward(self, q, k, v, *, key_mask=None, query_mask=None):
        """``(out, ctx)``: the attention output (..., heads, n, e) (see the class
        docstring) and this call's context for ``backward(dout, ctx)``.  Routing and the
        centroid update run as in ``layer(q, k, v)``."""
        out, data = self._run(q, k, v, key_mask, query_mask, None)
        return out, LayerContext(self, data)

    def __call__(self, q, k, v, *, key_mask=None, query_mask=None):
        """The attention output (..., heads, n, e) (see the class docstring); the layer
        keeps this call's context for ``backward(dout)``.  For several calls before a
        backward, use ``forward`` and pass each call's context."""
        out, data = self._run(q, k, v, key_mask, query_mask, self._reusable())
        self._keep(data)
        return out

    def _run(self, q, k, v, key_mask, query_mask, reuse):
        """Output and the backward's data of one call; `reuse`: the data of an earlier
        call whose statistics arrays may be overwritten when every shape repeats (no new
        pages to fault in, no second set alive during the call)."""
        dtype = float_dtype(q=q, k=k, v=v)
        q = as_matrix("q", q, dtype, min_rank=3)
        k = as_matrix("k", k, dtype, min_rank=3)
        v = as_matrix("v", v, dtype, min_rank=3)
        qkv_shapes(q.shape, q.shape if self.shared_qk else k.shape, v.shape)
        shapes = (q.shape, k.shape, v.shape)      # the gradients' shapes
        heads = broadcast_heads(q, k, v)
        q, k, v = (x if x.shape[-3] == heads else
                   np.broadcast_to(x, x.shape[:-3] + (heads,) + x.shape[-2:]) for x in (q, k, v))
        k = q if self.shared_qk else k
        routing_heads(heads, self.local_heads,
                      None if self.centroids is None else self.centroids.shape[0])
        n, m = q.shape[-2], k.shape[-2]
        some_rows("RoutingAttention needs at least one query and one key to route",
                  q=q.shape, k=k.shape)
        for name, x in (("q", q), ("k", k), ("v", v)):
            core_size(name, x.shape[-2:], x.shape)
        kmask = self._layer_mask("key_mask", key_mask, m, q.shape[:-3])
        qmask = self._layer_mask("query_mask", query_mask, n, q.shape[:-3])
        scale_value(self.scale, q.shape[-1], dtype)   # before the decisions move anything
        if self.shared_qk:      # the normalised queries are the keys, in the attention too
            qhat, qnorm, qsq = _normalize(q)
        else:
            qhat = qnorm = qsq = None
            if self.local_heads < heads:
                same_leading_axes(q.shape, k.shape)
        katt = qhat if self.shared_qk else k          # shared-QK attends to normalised keys
        L = self.local_heads
        batch = batch_shape(q=(q, 2), k=(katt, 2), v=(v, 2))
        out = np.empty(batch + (n, v.shape[-1]), dtype)
        # everything the backward needs is in the data, layer options included, so a
        # later change of the layer's attributes cannot change an earlier call's gradient
        kw = dict(causal=self.causal, scale=self.scale, exclude_self=self.shared_qk)
        local = None
        if L:
            c = self.n_clusters or max(1, int(round(np.sqrt(n))))
            lq, lk = local_members(n, m, self.window or max(1, n // c), self.causal)
            local = (_mask_members(lq, qmask), _mask_members(lk, kmask))   # padding: -1
            out[..., :L, :, :] = routing_attention(q[..., :L, :, :], katt[..., :L, :, :],
                                                   v[..., :L, :, :], *local, **kw)
        q_idx = k_idx = saved = lost = None
        if L < heads:
            q_idx, k_idx, lost = self._route(q[..., L:, :, :], k[..., L:, :, :], kmask, qmask,
                                             None if qhat is None else qhat[..., L:, :, :],
                                             None if qsq is None else qsq[..., L:, :])
            signature = (q.shape, k.shape, v.shape, q_idx.shape, k_idx.shape, dtype)
            previous = None if reuse is None else reuse["routed"]
            into = previous[1] if previous is not None and previous[0] == signature else None
            # the kernel writes the fresh output's pages (faulted on every thread); the
            # backward's copy goes to the earlier call's buffer, whose pages are mapped
            routed = out[..., L:, :, :]
            _, saved = _forward(q[..., L:, :, :], katt[..., L:, :, :], v[..., L:, :, :], q_idx,
                                k_idx, self.causal, self.shared_qk, self.merge, self.scale,
                                routed, into)
            if into is None:
                saved["output"] = routed.copy()
            else:
                np.copyto(into["output"], routed)
                saved["output"] = into["output"]
            # NaN locality: a non-finite query row has NaN scores and joins no cluster, but
            # its output is NaN, as in dense attention (a padded query keeps its 0)
            if qmask is not None:
                lost &= qmask
            if lost.any():
                routed[np.broadcast_to(lost, routed.shape[:-1])] = np.nan
            else:
                lost = None
        self.q_idx, self.k_idx = q_idx, k_idx
        data = dict(shapes=shapes, out_shape=out.shape, q=q, qhat=qhat, qnorm=qnorm, katt=katt,
                    v=v, local=local,
                    q_idx=q_idx, k_idx=k_idx, lost=lost, local_heads=L, kw=kw,
                    routed=None if saved is None else (signature, saved))
        return out, data

    def backward(self, dout, ctx=None):
        """Gradients (dq, dk, dv) of one call's output (routing decisions fixed), shaped
        like the q, k, v passed in (summed over the axes they were broadcast along).
        dout has exactly the shape of that call's output (else ValueError) and is cast to
        its dtype.

        ctx: the context ``forward`` returned with that call.  Without it, the gradients
        are those of the one ``layer(q, k, v)`` call made since the previous backward;
        after two or more such calls it raises RuntimeError (pass the context).  A query
        whose row was not finite gets a NaN gradient row, as in dense attention.
        """
        data = self._context(ctx)
        q, katt, v, L, kw = data["q"], data["katt"], data["v"], data["local_heads"], data["kw"]
        shapes = data["shapes"]
        dout = layer_dout(dout, data["out_shape"]).astype(q.dtype, copy=False)
        heads = q.shape[-3]
        # both backwards already sum their gradients over broadcast batch axes: the head
        # slices of arrays shaped like the (head-broadcast) inputs take them as they are
        parts = []
        if L:
            parts.append(routing_attention_backward(
                dout[..., :L, :, :], q[..., :L, :, :], katt[..., :L, :, :], v[..., :L, :, :],
                *data["local"], **kw))
        if L < heads:
            parts.append(routing_attention_backward(
                dout[..., L:, :, :], q[..., L:, :, :], katt[..., L:, :, :], v[..., L:, :, :],
                data["q_idx"], data["k_idx"], **data["routed"][1]))
        if len(parts) == 1:     # one kind of head: its gradients are the whole ones
            dq, dkatt, dv = parts[0]
        else:
            dq, dkatt, dv = (np.concatenate(g, axis=-3) for g in zip(*parts))
        if kw["exclude_self"]:        # shared-QK: keys were the normalised queries
            dq = dq + _normalize_backward(dkatt, data["qhat"], data["qnorm"])
            dk = np.zeros(shapes[1], q.dtype)
        else:
            dk = dkatt
        if data["lost"] is not None:  # the NaN rows of the forward
            routed = dq[..., L:, :, :]
            routed[np.broadcast_to(data["lost"], routed.shape[:-1])] = np.nan
        return unbroadcast(dq, shapes[0]), unbroadcast(dk, shapes[1]), unbroadcast(dv, shapes[2])
