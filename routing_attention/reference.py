"""Dense NumPy reference of every operation: the oracle the C kernels are tested against.

Plain and obviously correct rather than fast: each function builds the explicit n×m
softmax matrix.  Everything is computed in float64 whatever the input dtype, and the
results are float64.  Shapes and keywords follow the public functions exactly.
"""
import numpy as np

from ._checks import unbroadcast

__all__ = ["attention", "attention_backward", "masked_softmax"]


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
