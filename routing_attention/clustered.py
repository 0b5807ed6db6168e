"""Clustered and improved clustered attention (Fast Transformers): wrappers and layer.

Queries are grouped into clusters; attention is computed once per cluster centroid (the
mean of its queries) and broadcast to the members.  The improved form recomputes exact
weights on each cluster's top-k keys.  See docs/design.md (Clustered).
"""
import numpy as np

from . import _ext
from .clustering import hamming_kmeans, lsh_hash
from ._checks import (BackwardKeywords, LayerCalls, LayerContext, as_array, as_bool_mask,
                      as_matrix, batch_shape, check_out, cluster_count, dout_shape, flag,
                      float_dtype, given_or_saved, integer, into_out, kernel_out, labels_array,
                      layer_dout, mask_fits, mask_record, pair_record, qkv_arrays, saved_arrays,
                      saved_from, scale_option, scale_value, some_rows, unbroadcast)
from .pairs import _checked

__all__ = ["clustered_attention", "clustered_attention_backward",
           "improved_clustered_attention", "improved_clustered_attention_backward",
           "ClusteredAttention"]


def _prepare(q, k, v, labels, n_clusters, topk, key_mask, scale, dropout_p=0.0,
             dropout_seed=None, rel_bias=None):
    """Validated operands for the gufuncs; topk None means the plain form (passed as 0).
    The last two results: the pair-term operands and the resolved pair terms
    (dropout_p, dropout_seed, rel_bias)."""
    q, k, v = qkv_arrays(q, k, v)
    dtype = q.dtype
    n, m = q.shape[-2], k.shape[-2]
    n_clusters = cluster_count(n_clusters, n, "q", rows="queries")
    topk = 0 if topk is None else integer("topk", topk, low=1)
    labels = labels_array(labels, n, n_clusters, rows="queries")
    cores, _, pairs, terms = _checked(dtype, dict(q=(q, 2), k=(k, 2), v=(v, 2),
                                                    labels=(labels, 1)),
                                        n, m, dropout_p, dropout_seed, rel_bias)
    if key_mask is None:
        mask, use_mask = np.broadcast_to(np.True_, (m,)), False
    else:
        mask, use_mask = as_bool_mask("key_mask", key_mask, m), True
    batch = batch_shape(**cores, key_mask=(mask, 1))
    if use_mask:
        mask_fits("key_mask", mask, batch_shape(**cores))
    return (q, k, v, labels, mask, use_mask, n_clusters, topk,
            scale_value(scale, q.shape[-1], dtype), batch, pairs, terms)


def _keywords(n_clusters, topk, mask, use_mask, scale, terms):
    """The forward's keywords as saved["keywords"] records them (topk None: the plain
    form)."""
    return dict(n_clusters=n_clusters, topk=topk or None, key_mask=mask_record(mask, use_mask),
                scale=float(scale), **pair_record(terms))


# The forward's statistics that spare the backward its recomputation (return_saved=True).
SAVED_KEYS = ("centroid_out", "centroid_lse", "topk_index", "topk_weight")


def _saved_shapes(C, kmax, e):
    """Core shapes of the saved statistics (K = min(topk, m), 0 for the plain form)."""
    return dict(centroid_out=(C, e), centroid_lse=(C,), topk_index=(C, kmax),
                topk_weight=(C, kmax))


def _forward(q, k, v, labels, n_clusters, topk, key_mask, scale, out, return_saved,
             pair_args=(0.0, None, None)):
    q, k, v, labels, mask, use_mask, C, topk, scale, batch, pairs, terms = _prepare(
        q, k, v, labels, n_clusters, topk, key_mask, scale, *pair_args)
    shapes = _saved_shapes(C, min(topk, k.shape[-2]), v.shape[-1])
    saved = {key: np.empty(batch + shape, np.int64 if key == "topk_index" else q.dtype)
             for key, shape in shapes.items()}
    target = check_out(out, batch + (q.shape[-2], v.shape[-1]), q.dtype)
    o = _ext._clustered_forward(q, k, v, labels, mask, use_mask, C, topk, scale, *pairs,
                                out=(kernel_out(target, q.dtype, q, k, v),)
                                + tuple(saved[key] for key in SAVED_KEYS))[0]
    if not flag("return_saved", return_saved):
        return into_out(target, o)
    return into_out(target, o), dict(saved, keywords=_keywords(C, topk, mask, use_mask, scale,
                                                                terms))


def _backward(func, dout, q, k, v, labels, n_clusters, topk, key_mask, scale, saved,
              pair_args=(None, None, None)):
    """The backward of either form (func names it: topk is None for the plain form and
    then must not come from an improved forward's saved statistics, and conversely).
    pair_args: (dropout_p, dropout_seed, rel_bias) as passed."""
    improved = func.startswith("improved")
    kw = BackwardKeywords(func, saved, dict(n_clusters=None, topk=None, key_mask=None,
                                            scale=None, dropout_p=0.0, dropout_seed=None,
                                            rel_bias=None),
                          n_clusters=n_clusters, topk=topk, key_mask=key_mask, scale=scale,
                          dropout_p=pair_args[0], dropout_seed=pair_args[1],
                          rel_bias=pair_args[2])
    if kw.forward is not None:
        saved_from(func, improved, kw.forward["topk"])
    for name in ("n_clusters", "topk") if improved else ("n_clusters",):
        given_or_saved(func, name, kw.values[name])
    q, k, v, labels, mask, use_mask, C, topk, scale, batch, pairs, terms = _prepare(
        q, k, v, labels, kw.values["n_clusters"], kw.values["topk"], kw.values["key_mask"],
        kw.values["scale"], kw.values["dropout_p"], kw.values["dropout_seed"],
        kw.values["rel_bias"])
    kw.check(_keywords(C, topk, mask, use_mask, scale, terms))
    saved = kw.arrays
    dout = as_matrix("dout", dout, q.dtype)
    n, e = q.shape[-2], v.shape[-1]
    dout_shape(dout, n, e)
    dtypes = {key: np.int64 if key == "topk_index" else q.dtype for key in SAVED_KEYS}
    arrays = saved_arrays(saved, SAVED_KEYS, batch, _saved_shapes(C, min(topk, k.shape[-2]), e),
                          dtypes)
    dq, dk, dv, dbias = _ext._clustered_backward(dout, q, k, v, labels, mask, *arrays, use_mask,
                                                 bool(saved), C, topk, scale, *pairs)
    grads = (unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape))
    return grads + (unbroadcast(dbias, pairs[2].shape),) if terms[2] is not None else grads


def clustered_attention(q, k, v, labels, n_clusters, *, key_mask=None, scale=None,
                        dropout_p=0.0, dropout_seed=None, out=None, return_saved=False):
    """Clustered attention: each cluster's centroid query attends, its members share the row.

    Parameters
    ----------
    q : array_like, shape (..., n, d)
    k : array_like, shape (..., m, d)
    v : array_like, shape (..., m, e)
    labels : array_like of int, shape (..., n)
        Cluster of each query in [0, n_clusters), or -1 for a padded query (output 0).
        Typically ``hamming_kmeans(lsh_hash(q, planes), n_clusters)``.
    n_clusters : int
        Number of clusters C, 1 <= C <= n.
    key_mask : array_like of bool, shape (..., m), optional
        False marks a padding key that no query sees.
    scale : float, optional
        Multiplies q·k; defaults to 1/sqrt(d).
    dropout_p, dropout_seed
        Attention dropout (`routing_attention.pairs`) of the centroid weights a_c[j]:
        a cluster's members share its centroid's weights, so they share its dropout mask
        too (decisions of row -1 - c).  There is no position bias: a centroid has no
        position (`improved_clustered_attention` takes rel_bias for its exact part).
    out : ndarray, shape (..., n, e), optional
    return_saved : bool
        Also return a dict of the statistics the backward would otherwise recompute
        (the centroid attention) and ``keywords`` (the resolved n_clusters, topk,
        key_mask and scale): pass it on as ``clustered_attention_backward(dout, q, k,
        v, labels, **saved)``.

    Returns
    -------
    out : ndarray (..., n, e).  For query i in cluster c, with q̄_c the mean of the queries
    labelled c: ``softmax(scale · q̄_c kᵀ) v`` over the unmasked keys.  O(n·C·d) time.
    [, saved : dict]

    Raises
    ------
    TypeError, ValueError
        Bad dtypes or shapes, n_clusters outside [1, n], labels outside
        [-1, n_clusters), a key_mask of the wrong shape, naming the argument.
    """
    return _forward(q, k, v, labels, n_clusters, None, key_mask, scale, out, return_saved,
                    (dropout_p, dropout_seed, None))


def clustered_attention_backward(dout, q, k, v, labels, n_clusters=None, *, key_mask=None,
                                 scale=None, dropout_p=None, dropout_seed=None, **saved):
    """Gradients (dq, dk, dv) of `clustered_attention`; arguments as in the forward.

    A centroid's gradient is shared equally by its members (÷ cluster size); queries
    labelled -1 get none.  Gradients are summed over broadcast batch axes.  ``**saved``:
    the dict the forward returned with ``return_saved=True`` for the same inputs (the
    centroid attention is then not recomputed; the result is the same).  n_clusters,
    key_mask and scale left at None are taken from it; without it n_clusters is
    required.  A value that disagrees with the saved forward's is a ValueError naming it.
    dropout_p and dropout_seed as in the forward (or from ``**saved``).

    Raises
    ------
    TypeError, ValueError
        As the forward; a keyword that disagrees with the saved forward's, naming it.
    """
    return _backward("clustered_attention_backward", dout, q, k, v, labels, n_clusters, None,
                     key_mask, scale, saved, (dropout_p, dropout_seed, None))


def improved_clustered_attention(q, k, v, labels, n_clusters, topk, *, key_mask=None,
                                 scale=None, dropout_p=0.0, dropout_seed=None, rel_bias=None,
                                 out=None, return_saved=False):
    """Improved clustered attention: exact weights on each cluster's top-k keys.

    Arguments as in `clustered_attention`, plus ``topk >= 1``.  For cluster c, T_c is the
    min(topk, unmasked keys) keys with the largest centroid weight a_c (ties to the lower
    key; never a masked key) and m̂_c = Σ_{j∈T_c} a_c[j].  Query i of cluster c gives keys
    in T_c the weights ``m̂_c · softmax_{j∈T_c}(scale · q_i·k_j)`` and every other key a_c[j].
    With topk >= m this is dense attention.  ``return_saved=True`` also returns the dict
    of statistics for the backward (centroid attention, T_c and a_c[T_c], and
    ``keywords``).

    dropout_p, dropout_seed: attention dropout (`routing_attention.pairs`) of every weight
    — the exact weights of (query i, key j ∈ T_c) as pair (i, j), the centroid weights
    a_c[j] outside T_c as row -1 - c, shared by the cluster's members.  rel_bias (...,
    n + m - 1): a relative position bias on the exact part's logits (scale·q_i·k_j +
    rel_bias[j - i + n - 1]); the centroid logits, T_c's choice and m̂_c take none.

    Raises
    ------
    TypeError, ValueError
        As `clustered_attention`, and topk < 1.
    """
    return _forward(q, k, v, labels, n_clusters, topk, key_mask, scale, out, return_saved,
                    (dropout_p, dropout_seed, rel_bias))


def improved_clustered_attention_backward(dout, q, k, v, labels, n_clusters=None, topk=None, *,
                                          key_mask=None, scale=None, dropout_p=None,
                                          dropout_seed=None, rel_bias=None, **saved):
    """Gradients (dq, dk, dv [, drel_bias]) of `improved_clustered_attention`, with m̂_c
    (and the choice of T_c) treated as constants, as in the paper.  ``**saved``: the forward's
    ``return_saved=True`` dict for the same inputs (then nothing is recomputed);
    n_clusters, topk, key_mask, scale, dropout_p, dropout_seed and rel_bias left at None
    are taken from it (without it n_clusters and topk are required; with a bias, passed or
    saved, its gradient is returned too).  A value that disagrees with the saved forward's
    is a ValueError naming it.

    Raises
    ------
    TypeError, ValueError
        As the forward; a keyword that disagrees with the saved forward's, naming it.
    """
    return _backward("improved_clustered_attention_backward", dout, q, k, v, labels,
                     n_clusters, topk, key_mask, scale, saved, (dropout_p, dropout_seed, rel_bias))


# ------------------------------------------------------------------ layer
class ClusteredAttention(LayerCalls):
    """Clustered attention with its own query clustering, as in Fast Transformers.

    ``layer(q, k, v)`` hashes the queries with random hyperplanes (`lsh_hash`, planes drawn
    once from `seed`), groups the codes by Hamming k-means (`hamming_kmeans`) and runs
    clustered attention — or improved clustered attention when `topk` is given.
    ``layer.backward(dout)`` returns (dq, dk, dv) for that call, the clustering held
    fixed (routing decisions are not differentiated).  After several calls, take each
    call's context instead: ``out, ctx = layer.forward(q, k, v)`` and
    ``layer.backward(dout, ctx)`` (``backward(dout)`` then raises RuntimeError rather
    than guess the call).

    Parameters
    ----------
    n_clusters : int
        Clusters per sequence (clamped to the sequence length).
    bits : int
        Hash bits, 1..63.
    iterations : int
        Hamming k-means (Lloyd) iterations.
    topk : int, optional
        Keys recomputed exactly per cluster (improved form); None for the plain form.
    seed : int
        Seeds the hyperplanes and the k-means initialisation.
    scale : float, optional
        Multiplies q·k; defaults to 1/sqrt(d).

    Raises
    ------
    TypeError, ValueError
        At construction, n_clusters < 1, bits outside [1, 63], iterations < 0, topk < 1,
        a seed outside [0, 2**64); at a call, the errors of `clustered_attention`.  At
        `backward`, a dout not shaped exactly like that call's output (ValueError).
    RuntimeError
        `backward(dout)` without a context after two or more calls.
    """

    def __init__(self, n_clusters=100, *, bits=32, iterations=10, topk=None, seed=0, scale=None):
        self.n_clusters = integer("n_clusters", n_clusters, low=1)
        self.bits = integer("bits", bits, low=1, high=63)
        self.iterations = integer("iterations", iterations, low=0)
        self.topk = None if topk is None else integer("topk", topk, low=1)
        self.seed = integer("seed", seed, 0, 2**64 - 1)
        self.scale = scale_option(scale)
        self.planes = None      # (bits, d + 1), drawn on the first call
        self.labels = None      # the last call's clustering, (..., n)

    def __repr__(self):
        return (f"ClusteredAttention(n_clusters={self.n_clusters!r}, bits={self.bits!r}, "
                f"iterations={self.iterations!r}, topk={self.topk!r}, seed={self.seed!r}, "
                f"scale={self.scale!r})")

    def _planes(self, d):
        if self.planes is None or self.planes.shape[1] != d + 1:
            rng = np.random.default_rng(self.seed)
            self.planes = rng.standard_normal((self.bits, d + 1))
        return self.planes

    def cluster(self, q, query_mask=None):
        """Labels (..., n) of the queries: lsh_hash → hamming_kmeans (-1 where masked)."""
        dtype = float_dtype(q=q)        # integer queries hash as float64, like every call
        q = as_matrix("q", q, dtype)
        some_rows("ClusteredAttention needs at least one query to cluster", q=q.shape)
        codes = lsh_hash(q, self._planes(q.shape[-1]).astype(dtype, copy=False))
        C = min(self.n_clusters, q.shape[-2])
        if query_mask is not None:
            query_mask = as_bool_mask("query_mask", query_mask, q.shape[-2], "queries")
            mask_fits("query_mask", query_mask, q.shape[:-2])
        return hamming_kmeans(codes, C, iters=self.iterations, seed=self.seed, mask=query_mask)

    def forward(self, q, k, v, *, key_mask=None, query_mask=None):
        """``(out, ctx)``: the attention output (..., n, e) (query_mask False rows are
        padding, output 0) and this call's context for ``backward(dout, ctx)``."""
        out, data = self._run(q, k, v, key_mask, query_mask)
        return out, LayerContext(self, data)

    def __call__(self, q, k, v, *, key_mask=None, query_mask=None):
        """The attention output (..., n, e); query_mask False rows are padding (output
        0).  The layer keeps this call's context for ``backward(dout)``."""
        self._reusable()                # a failing call leaves no context to backward
        out, data = self._run(q, k, v, key_mask, query_mask)
        self._keep(data)
        return out

    def _run(self, q, k, v, key_mask, query_mask):
        """Output and the backward's data: (q, k, v, labels, saved, output shape)."""
        labels = self.cluster(q, query_mask)
        C = min(self.n_clusters, labels.shape[-1])
        if self.topk is None:
            out, saved = clustered_attention(q, k, v, labels, C, key_mask=key_mask,
                                             scale=self.scale, return_saved=True)
        else:
            out, saved = improved_clustered_attention(q, k, v, labels, C, self.topk,
                                                      key_mask=key_mask, scale=self.scale,
                                                      return_saved=True)
        self.labels = labels            # once the call has succeeded
        return out, (q, k, v, labels, saved, out.shape)

    def backward(self, dout, ctx=None):
        """Gradients (dq, dk, dv) of the call `ctx` (from `forward`), or without ctx of
        the one ``layer(q, k, v)`` call since the previous backward (RuntimeError after
        two or more); the clustering is held fixed.  dout has exactly the shape of that
        call's output (else ValueError) and is cast to its dtype."""
        q, k, v, labels, saved, shape = self._context(ctx)
        dout = layer_dout(dout, shape)
        if saved["keywords"]["topk"] is None:
            return clustered_attention_backward(dout, q, k, v, labels, **saved)
        return improved_clustered_attention_backward(dout, q, k, v, labels, **saved)
