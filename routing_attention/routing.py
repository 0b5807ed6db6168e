"""Routing attention (Routing Transformer) and local attention on the C tile engine."""
import numpy as np

from . import _ext
from ._checks import (as_matrix, batch_shape, check_out, flag, float_dtype, integer, scale_value,
                      unbroadcast)

__all__ = ["routing_attention", "routing_attention_backward", "local_attention",
           "local_attention_backward", "check_members", "local_members"]

MERGES = ("mean", "lse")


def check_members(name, idx, length):
    """Validate a (..., c, w) membership array: int64 entries in [-1, length), no index
    repeated inside one cluster's list.  Returns it as an int64 array."""
    arr = np.asarray(idx)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of positions (-1 = empty slot); "
                        f"got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{name} must have shape (..., n_clusters, size); got {arr.shape}")
    bad = (arr < -1) | (arr >= length)        # before the cast: uint64 must not wrap to -1
    if bad.any():
        raise ValueError(f"{name} has entries outside [-1, {length}): first offender "
                         f"{int(arr[bad][0])} at {tuple(int(i) for i in np.argwhere(bad)[0])}")
    arr = arr.astype(np.int64, copy=False)
    if arr.shape[-1] > 1:
        s = np.sort(arr, axis=-1)
        dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
        if dup.any():
            where = tuple(int(i) for i in np.argwhere(dup)[0][:-1])
            raise ValueError(f"{name} repeats a position inside the list of cluster {where}")
    return arr


def _prepare(q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale):
    dtype = float_dtype(q=q, k=k, v=v)
    q = as_matrix("q", q, dtype)
    k = as_matrix("k", k, dtype)
    v = as_matrix("v", v, dtype)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must have the same feature size d: q has {q.shape[-1]}, "
                         f"k has {k.shape[-1]}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"k and v must have the same sequence length m: k has {k.shape[-2]}, "
                         f"v has {v.shape[-2]}")
    q_idx = check_members("q_idx", q_idx, q.shape[-2])
    k_idx = check_members("k_idx", k_idx, k.shape[-2])
    if q_idx.shape[-2] != k_idx.shape[-2]:
        raise ValueError(f"q_idx and k_idx must list the same number of clusters: "
                         f"{q_idx.shape[-2]} vs {k_idx.shape[-2]}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}; got {merge!r}")
    batch_shape(q=(q, 2), k=(k, 2), v=(v, 2), q_idx=(q_idx, 2), k_idx=(k_idx, 2))
    return (q, k, v, q_idx, k_idx, flag("causal", causal), flag("exclude_self", exclude_self),
            merge == "lse", scale_value(scale, q.shape[-1], dtype))


def routing_attention(q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False, merge="mean",
                      scale=None, return_lse=False, out=None):
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
    return_lse : bool
        Also return L = logsumexp over the token's per-cluster log-sum-exps, (..., n).
    out : ndarray (..., n, e), optional

    Returns
    -------
    out (..., n, e) [, lse (..., n)]
    """
    q, k, v, q_idx, k_idx, causal, exclude_self, lse_merge, scale = _prepare(
        q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale)
    return_lse = flag("return_lse", return_lse)
    batch = batch_shape(q=(q, 2), k=(k, 2), v=(v, 2), q_idx=(q_idx, 2), k_idx=(k_idx, 2))
    out = check_out(out, batch + (q.shape[-2], v.shape[-1]), q.dtype)
    o, lse = _ext._routing_forward(q, k, v, q_idx, k_idx, scale, causal, exclude_self, lse_merge,
                                   out=(out, None))
    return (o, lse) if return_lse else o


def routing_attention_backward(dout, q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False,
                               merge="mean", scale=None):
    """Gradients (dq, dk, dv) of `routing_attention` (memberships are not differentiated).

    The forward is recomputed inside; the result has the shapes of q, k and v.
    """
    q, k, v, q_idx, k_idx, causal, exclude_self, lse_merge, scale = _prepare(
        q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale)
    dout = as_matrix("dout", dout, q.dtype)
    if dout.shape[-2:] != (q.shape[-2], v.shape[-1]):
        raise ValueError(f"dout must have shape (..., n, e) = (..., {q.shape[-2]}, {v.shape[-1]}) "
                         f"like the output; got {dout.shape}")
    batch_shape(dout=(dout, 2), q=(q, 2), k=(k, 2), v=(v, 2), q_idx=(q_idx, 2), k_idx=(k_idx, 2))
    dq, dk, dv = _ext._routing_backward(dout, q, k, v, q_idx, k_idx, scale, causal, exclude_self,
                                        lse_merge)
    return unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)


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


def _local_args(q, k, window, causal):
    n = np.shape(q)[-2] if np.ndim(q) >= 2 else 0
    m = np.shape(k)[-2] if np.ndim(k) >= 2 else 0
    return local_members(n, m, window, flag("causal", causal))


def local_attention(q, k, v, window, *, causal=False, scale=None, out=None):
    """Blocked local attention: positions are cut into blocks of `window`; a query in
    block b sees the keys in blocks b-1 and b (and b+1 when not causal); causal also
    needs j <= i.  n need not be a multiple of `window`.  Runs on the routing planner
    with one cluster per block.  Shapes as in `attention`."""
    q_idx, k_idx = _local_args(q, k, window, causal)
    return routing_attention(q, k, v, q_idx, k_idx, causal=causal, scale=scale, out=out)


def local_attention_backward(dout, q, k, v, window, *, causal=False, scale=None):
    """Gradients (dq, dk, dv) of `local_attention`."""
    q_idx, k_idx = _local_args(q, k, window, causal)
    return routing_attention_backward(dout, q, k, v, q_idx, k_idx, causal=causal, scale=scale)
