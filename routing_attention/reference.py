"""Dense NumPy reference of every operation: the oracle the C kernels are tested against.

Plain and obviously correct rather than fast: each function builds the explicit n×m
softmax matrix.  Everything is computed in float64 whatever the input dtype, and the
results are float64.  Shapes and keywords follow the public functions exactly.
"""
import numpy as np

from ._checks import unbroadcast

__all__ = ["attention", "attention_backward", "masked_softmax", "routing_attention",
           "routing_attention_backward", "local_attention", "local_attention_backward"]


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


# ------------------------------------------------------------------ routing attention
def _batched(arrays_and_core):
    """Broadcast the batch axes of (array, core_rank) pairs; yields per-index views."""
    shape = np.broadcast_shapes(*(a.shape[: a.ndim - r] for a, r in arrays_and_core))
    full = [np.broadcast_to(a, shape + a.shape[a.ndim - r:]) for a, r in arrays_and_core]
    return shape, full


def _cluster_problems(q, k, q_idx, k_idx, causal, exclude_self, sc):
    """For one problem: per cluster (queries, keys, probabilities p, lse) with the
    explicit visibility matrix (exclude_self falls back to self when alone)."""
    out = []
    for qs_, ks_ in zip(q_idx, k_idx):
        qs, ks = qs_[qs_ >= 0], ks_[ks_ >= 0]
        vis = np.ones((len(qs), len(ks)), dtype=bool)
        if causal:
            vis &= ks[None, :] <= qs[:, None]
        if exclude_self:
            is_self = ks[None, :] == qs[:, None]
            alone = ~(vis & ~is_self).any(axis=1, keepdims=True)
            vis &= ~is_self | alone
        p, lse = masked_softmax(sc * (q[qs] @ k[ks].T), vis)
        out.append((qs, ks, p, lse))
    return out


def routing_attention(q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False, merge="mean",
                      scale=None, return_lse=False):
    """Per cluster a dense masked softmax; per token a mean or log-sum-exp merge."""
    q, k, v = _f64(q, k, v)
    q_idx, k_idx = np.asarray(q_idx, np.int64), np.asarray(k_idx, np.int64)
    sc = _scale(scale, q.shape[-1])
    shape, (qb, kb, vb, qib, kib) = _batched([(q, 2), (k, 2), (v, 2), (q_idx, 2), (k_idx, 2)])
    n, e = q.shape[-2], v.shape[-1]
    out = np.zeros(shape + (n, e))
    lse_out = np.full(shape + (n,), -np.inf)
    for b in np.ndindex(*shape):
        rows = [[] for _ in range(n)]            # (o, lse) per cluster containing the token
        for qs, ks, p, lse in _cluster_problems(qb[b], kb[b], qib[b], kib[b], causal,
                                                exclude_self, sc):
            o = p @ vb[b][ks]
            for r, i in enumerate(qs):
                rows[i].append((o[r], lse[r]))
        for i, items in enumerate(rows):
            if not items:
                continue
            ls = np.array([l for _, l in items])
            big = ls.max()
            L = -np.inf if np.isneginf(big) else big + np.log(np.exp(ls - big).sum())
            lse_out[b + (i,)] = L
            if merge == "mean":
                out[b + (i,)] = np.mean([o for o, _ in items], axis=0)
            elif not np.isneginf(L):
                out[b + (i,)] = sum(np.exp(l - L) * o for o, l in items)
    return (out, lse_out) if return_lse else out


def routing_attention_backward(dout, q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False,
                               merge="mean", scale=None):
    """Per cluster the softmax Jacobian, with the gradient each cluster receives from the
    merge: dout/count (mean) or dout with the global normaliser (lse)."""
    dout, q, k, v = _f64(dout, q, k, v)
    q_idx, k_idx = np.asarray(q_idx, np.int64), np.asarray(k_idx, np.int64)
    sc = _scale(scale, q.shape[-1])
    out, L = routing_attention(q, k, v, q_idx, k_idx, causal=causal, exclude_self=exclude_self,
                               merge=merge, scale=scale, return_lse=True)
    shape, (qb, kb, vb, qib, kib, gb) = _batched([(q, 2), (k, 2), (v, 2), (q_idx, 2), (k_idx, 2),
                                                  (dout, 2)])
    ob, Lb = np.broadcast_to(out, shape + out.shape[-2:]), np.broadcast_to(L, shape + L.shape[-1:])
    dq, dk, dv = (np.zeros(shape + a.shape[-2:]) for a in (q, k, v))
    for b in np.ndindex(*shape):
        count = np.zeros(q.shape[-2])
        for qs_ in qib[b]:
            count[qs_[qs_ >= 0]] += 1
        for qs, ks, p, lse in _cluster_problems(qb[b], kb[b], qib[b], kib[b], causal,
                                                exclude_self, sc):
            if merge == "mean":
                g = gb[b][qs] / count[qs][:, None]
                o = p @ vb[b][ks]
            else:
                finite = np.isfinite(Lb[b][qs])
                with np.errstate(invalid="ignore"):
                    shift = np.where(finite, lse - Lb[b][qs], 0)
                p = p * np.where(finite, np.exp(shift), 0)[:, None]
                g, o = gb[b][qs], ob[b][qs]
            dv[b][ks] += p.T @ g
            dp = g @ vb[b][ks].T
            ds = p * (dp - (g * o).sum(axis=1, keepdims=True))
            dq[b][qs] += sc * ds @ kb[b][ks]
            dk[b][ks] += sc * ds.T @ qb[b][qs]
    return unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)


def local_attention(q, k, v, window, *, causal=False, scale=None):
    """Dense attention with the local block mask |block(i) - block(j)| <= 1
    (causal: block(j) in {block(i) - 1, block(i)} and j <= i)."""
    n, m = np.shape(q)[-2], np.shape(k)[-2]
    bi, bj = np.arange(n)[:, None] // window, np.arange(m)[None, :] // window
    vis = (bj >= bi - 1) & (bj <= bi + (0 if causal else 1))
    if causal:
        vis &= np.arange(m)[None, :] <= np.arange(n)[:, None]
    q, k, v = _f64(q, k, v)
    p, _ = masked_softmax(_scale(scale, q.shape[-1]) * (q @ np.swapaxes(k, -1, -2)), vis)
    return p @ v


def local_attention_backward(dout, q, k, v, window, *, causal=False, scale=None):
    """(dq, dk, dv) of `local_attention` by the softmax Jacobian."""
    n, m = np.shape(q)[-2], np.shape(k)[-2]
    bi, bj = np.arange(n)[:, None] // window, np.arange(m)[None, :] // window
    vis = (bj >= bi - 1) & (bj <= bi + (0 if causal else 1))
    if causal:
        vis &= np.arange(m)[None, :] <= np.arange(n)[:, None]
    dout, q, k, v = _f64(dout, q, k, v)
    sc = _scale(scale, q.shape[-1])
    p, _ = masked_softmax(sc * (q @ np.swapaxes(k, -1, -2)), vis)
    dv = np.swapaxes(p, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return (unbroadcast(sc * (ds @ k), q.shape), unbroadcast(sc * (np.swapaxes(ds, -1, -2) @ q), k.shape),
            unbroadcast(dv, v.shape))
