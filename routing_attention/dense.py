"""Dense softmax attention: the public wrappers over the C tile engine."""
import numpy as np

from . import _ext
from ._checks import (as_bool_mask, as_matrix, batch_shape, check_out, flag, qkv_arrays,
                      scale_value, unbroadcast)

__all__ = ["attention", "attention_backward"]


def _prepare(q, k, v, causal, key_mask, scale):
    q, k, v = qkv_arrays(q, k, v)
    dtype = q.dtype
    causal = flag("causal", causal)
    m = k.shape[-2]
    if key_mask is None:
        mask, use_mask = np.broadcast_to(np.True_, (m,)), False
    else:
        mask, use_mask = as_bool_mask("key_mask", key_mask, m), True
    batch_shape(q=(q, 2), k=(k, 2), v=(v, 2), key_mask=(mask, 1))
    return q, k, v, mask, use_mask, causal, scale_value(scale, q.shape[-1], dtype)


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_lse=False, out=None):
    """Softmax attention ``softmax(scale · q kᵀ) v``, exact, in O((n + m)·d) memory.

    Parameters
    ----------
    q : array_like, shape (..., n, d)
    k : array_like, shape (..., m, d)
    v : array_like, shape (..., m, e)
        Leading axes broadcast like a NumPy gufunc.  float32 and float64 are computed
        in their own precision; other real dtypes are promoted (ints to float64).
    causal : bool
        Key j is visible to query i only if j <= i (positions as given; n may differ
        from m).
    key_mask : array_like of bool, shape (..., m), optional
        False marks a padding key that no query sees.
    scale : float, optional
        Multiplies q·k; defaults to 1/sqrt(d).
    return_lse : bool
        Also return the log-sum-exp of each query's logits, shape (..., n), which
        `attention_backward` can reuse.
    out : ndarray, shape (..., n, e), optional
        Where to write the output.

    Returns
    -------
    out : ndarray (..., n, e), and lse (..., n) when `return_lse`.  A query that sees no
    key gets output 0 and lse -inf.
    """
    q, k, v, mask, use_mask, causal, scale = _prepare(q, k, v, causal, key_mask, scale)
    return_lse = flag("return_lse", return_lse)
    batch = batch_shape(q=(q, 2), k=(k, 2), v=(v, 2), key_mask=(mask, 1))
    out = check_out(out, batch + (q.shape[-2], v.shape[-1]), q.dtype)
    o, lse = _ext._attention_forward(q, k, v, mask, use_mask, scale, causal, out=(out, None))
    return (o, lse) if return_lse else o


def attention_backward(dout, q, k, v, *, causal=False, key_mask=None, scale=None, lse=None,
                       output=None):
    """Gradients of `attention` with respect to q, k and v.

    Parameters
    ----------
    dout : array_like, shape (..., n, e)
        Gradient of the loss with respect to the attention output.
    q, k, v, causal, key_mask, scale
        Exactly as passed to `attention`.
    lse, output : ndarray, optional
        The forward's log-sum-exp (``return_lse=True``) and output.  Passing both skips
        recomputing the forward; with either missing it is recomputed.

    Returns
    -------
    dq, dk, dv : ndarrays with the shapes of q, k and v (gradients summed over any
    broadcast batch axes).
    """
    q, k, v, mask, use_mask, causal, scale = _prepare(q, k, v, causal, key_mask, scale)
    dout = as_matrix("dout", dout, q.dtype)
    expected = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], mask.shape[:-1])
    expected = expected + (q.shape[-2], v.shape[-1])
    if dout.shape[-2:] != expected[-2:]:
        raise ValueError(f"dout must have shape (..., n, e) = (..., {expected[-2]}, {expected[-1]}) "
                         f"like the attention output; got {dout.shape}")
    batch_shape(dout=(dout, 2), q=(q, 2), k=(k, 2), v=(v, 2), key_mask=(mask, 1))
    if lse is None or output is None:
        output, lse = _ext._attention_forward(q, k, v, mask, use_mask, scale, causal)
    else:
        output = as_matrix("output", output, q.dtype)
        lse = as_matrix("lse", lse, q.dtype, min_rank=1)
        if output.shape[-2:] != expected[-2:]:
            raise ValueError(f"output must have shape (..., {expected[-2]}, {expected[-1]}); "
                             f"got {output.shape}")
        if lse.ndim < 1 or lse.shape[-1] != q.shape[-2]:
            raise ValueError(f"lse must have shape (..., {q.shape[-2]}); got {lse.shape}")
    dq, dk, dv = _ext._attention_backward(dout, q, k, v, mask, use_mask, output, lse, scale,
                                          causal)
    return unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)
