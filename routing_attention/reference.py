"""Dense NumPy reference of every operation: the oracle the C kernels are tested against.

Plain and obviously correct rather than fast: each function builds the explicit n×m
softmax matrix.  Everything is computed in float64 whatever the input dtype, and the
results are float64.  Shapes and keywords follow the public functions exactly.
"""
import numpy as np

from ._checks import unbroadcast

__all__ = ["attention", "attention_backward", "masked_softmax",
           "clustered_attention", "clustered_attention_backward",
           "improved_clustered_attention", "improved_clustered_attention_backward",
           "improved_clustered_selection"]


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def masked_softmax(logits, visible):
    """Row softmax of `logits` over the entries where `visible` is True.

    Returns (p, lse); a row with nothing visible gets p = 0 and lse = -inf.
    """
    s = np.where(visible, logits, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    mx = np.where(np.isneginf(mx), 0.0, mx)
    e = np.where(visible, np.exp(s - mx), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    seen = total > 0
    p = np.where(seen, e / np.where(seen, total, 1.0), 0.0)
    lse = np.where(seen, mx + np.log(np.where(seen, total, 1.0)), -np.inf)[..., 0]
    return p, lse


def _dense_visible(n, m, causal, key_mask):
    vis = np.ones((n, m), dtype=bool)
    if causal:
        vis &= np.arange(m)[None, :] <= np.arange(n)[:, None]
    if key_mask is not None:
        vis = vis & np.asarray(key_mask, dtype=bool)[..., None, :]
    return vis


def _scale(scale, d):
    return 1.0 / np.sqrt(d) if scale is None else float(scale)


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_lse=False):
    """softmax(scale · q kᵀ + mask) v with the explicit (…, n, m) probability matrix."""
    q, k, v = _f64(q, k, v)
    s = _scale(scale, q.shape[-1]) * (q @ np.swapaxes(k, -1, -2))
    p, lse = masked_softmax(s, _dense_visible(q.shape[-2], k.shape[-2], causal, key_mask))
    out = p @ v
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, *, causal=False, key_mask=None, scale=None, lse=None,
                       output=None):
    """(dq, dk, dv) of `attention` by the textbook softmax Jacobian."""
    dout, q, k, v = _f64(dout, q, k, v)
    sc = _scale(scale, q.shape[-1])
    s = sc * (q @ np.swapaxes(k, -1, -2))
    p, _ = masked_softmax(s, _dense_visible(q.shape[-2], k.shape[-2], causal, key_mask))
    dv = np.swapaxes(p, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = sc * (ds @ k)
    dk = sc * (np.swapaxes(ds, -1, -2) @ q)
    return unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)


# ------------------------------------------------------------------ clustered attention
def _cluster_parts(q, k, v, labels, n_clusters, topk, key_mask, scale, hold=None):
    """Every matrix of (improved) clustered attention, explicitly, in float64.

    Returns a dict: onehot (…, n, C) member matrix, cent (…, C, d), a (…, C, m) centroid
    attention, top (…, C, m) bool T_c (all False for the plain form, topk None), mhat
    (…, C), p2 (…, n, m) each query's softmax over its cluster's T_c, and w (…, n, m) the
    effective attention weights.  hold=(top, mhat) fixes T_c and m̂_c (finite differences
    of the improved form with m̂ held constant).
    """
    q, k, v = _f64(q, k, v)
    labels = np.asarray(labels)
    sc = _scale(scale, q.shape[-1])
    onehot = (labels[..., :, None] == np.arange(n_clusters)).astype(np.float64)
    counts = onehot.sum(axis=-2)
    cent = (np.swapaxes(onehot, -1, -2) @ q) / np.maximum(counts, 1)[..., None]
    m = k.shape[-2]
    visible = np.ones((1, m), dtype=bool) if key_mask is None else \
        np.asarray(key_mask, dtype=bool)[..., None, :]
    a, _ = masked_softmax(sc * (cent @ np.swapaxes(k, -1, -2)), visible)
    visible = np.broadcast_to(visible, a.shape)
    if hold is not None:
        top, mhat = hold
    elif topk is None:
        top, mhat = np.zeros(a.shape, dtype=bool), np.zeros(a.shape[:-1])
    else:
        # rank keys by a (largest first, ties to the lower key; masked keys last)
        order = np.argsort(np.where(visible, -a, np.inf), axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(m), order.shape), axis=-1)
        kc = np.minimum(topk, visible.sum(axis=-1, keepdims=True))
        top = (rank < kc) & visible
        mhat = np.where(top, a, 0.0).sum(axis=-1)
    qtop = (onehot @ top.astype(np.float64)) > 0                      # (…, n, m)
    p2, _ = masked_softmax(sc * (q @ np.swapaxes(k, -1, -2)), qtop)
    w = onehot @ np.where(top, 0.0, a) + (onehot @ mhat[..., None]) * p2
    return dict(onehot=onehot, counts=counts, cent=cent, a=a, top=top, mhat=mhat, p2=p2, w=w,
                sc=sc)


def clustered_attention(q, k, v, labels, n_clusters, *, key_mask=None, scale=None):
    """Clustered attention: out_i = softmax(scale·q̄_c·kᵀ) v for query i in cluster c,
    q̄_c the mean of the queries labelled c; label -1 gives 0."""
    parts = _cluster_parts(q, k, v, labels, n_clusters, None, key_mask, scale)
    return parts["w"] @ np.asarray(v, dtype=np.float64)


def improved_clustered_attention(q, k, v, labels, n_clusters, topk, *, key_mask=None,
                                 scale=None, _hold=None):
    """Improved clustered attention: exact softmax over each cluster's top-k keys (of the
    centroid attention), rescaled by their centroid mass m̂_c; centroid weights elsewhere."""
    parts = _cluster_parts(q, k, v, labels, n_clusters, topk, key_mask, scale, _hold)
    return parts["w"] @ np.asarray(v, dtype=np.float64)


def improved_clustered_selection(q, k, labels, n_clusters, topk, *, key_mask=None,
                                 scale=None):
    """(top, mhat): T_c as a (…, C, m) bool matrix and m̂_c (…, C), for finite
    differences with the selection and m̂ held constant."""
    v = np.zeros(np.shape(k)[:-1] + (1,))
    parts = _cluster_parts(q, k, v, labels, n_clusters, topk, key_mask, scale)
    return parts["top"], parts["mhat"]


def _clustered_backward(dout, q, k, v, labels, n_clusters, topk, key_mask, scale):
    dout, q, k, v = _f64(dout, q, k, v)
    P = _cluster_parts(q, k, v, labels, n_clusters, topk, key_mask, scale)
    sc, onehot, a, top, p2 = P["sc"], P["onehot"], P["a"], P["top"], P["p2"]
    dv = np.swapaxes(P["w"], -1, -2) @ dout
    dw = dout @ np.swapaxes(v, -1, -2)                                # (…, n, m)
    # exact part: w += m̂_c · p2 with m̂ constant; p2 = softmax(sc·q kᵀ) over T_c
    dp2 = (onehot @ P["mhat"][..., None]) * dw
    ds2 = p2 * (dp2 - (dp2 * p2).sum(axis=-1, keepdims=True))
    dq = sc * (ds2 @ k)
    dk = sc * (np.swapaxes(ds2, -1, -2) @ q)
    # centroid part: w += onehot · (a outside T_c), a = softmax(sc·cent kᵀ)
    da = np.where(top, 0.0, np.swapaxes(onehot, -1, -2) @ dw)          # (…, C, m)
    ds = a * (da - (da * a).sum(axis=-1, keepdims=True))
    dcent = sc * (ds @ k)
    dk = dk + sc * (np.swapaxes(ds, -1, -2) @ P["cent"])
    # cent = mean of members
    dq = dq + onehot @ (dcent / np.maximum(P["counts"], 1)[..., None])
    return unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)


def clustered_attention_backward(dout, q, k, v, labels, n_clusters, *, key_mask=None,
                                 scale=None):
    """(dq, dk, dv) of `clustered_attention`; a centroid's gradient is shared equally
    by its members."""
    return _clustered_backward(dout, q, k, v, labels, n_clusters, None, key_mask, scale)


def improved_clustered_attention_backward(dout, q, k, v, labels, n_clusters, topk, *,
                                          key_mask=None, scale=None):
    """(dq, dk, dv) of `improved_clustered_attention` with T_c and m̂_c held constant."""
    return _clustered_backward(dout, q, k, v, labels, n_clusters, topk, key_mask, scale)
