"""Dense softmax attention: the public wrappers over the C tile engine."""
import numpy as np

from . import _ext
from ._checks import (BackwardKeywords, all_keys, as_bool_mask, as_matrix, batch_shape,
                      check_out, dout_shape, flag, forward_statistic, into_out, kernel_out,
                      mask_fits, mask_record, pair_record, plain_qkv, plain_scale, qkv_arrays,
                      scale_value, unbroadcast)
from .pairs import NO_PAIRS, _checked

__all__ = ["attention", "attention_backward"]

DEFAULTS = dict(causal=False, key_mask=None, scale=None, dropout_p=0.0, dropout_seed=None,
                rel_bias=None)


def _prepare(q, k, v, causal, key_mask, scale, dropout_p, dropout_seed, rel_bias):
    q, k, v = qkv_arrays(q, k, v)
    dtype = q.dtype
    causal = flag("causal", causal)
    n, m = q.shape[-2], k.shape[-2]
    cores, batch, pairs, terms = _checked(dtype, dict(q=(q, 2), k=(k, 2), v=(v, 2)), n, m,
                                            dropout_p, dropout_seed, rel_bias)
    if key_mask is None:
        mask, use_mask = np.broadcast_to(np.True_, (m,)), False
    else:
        mask, use_mask = as_bool_mask("key_mask", key_mask, m), True
        batch_shape(**cores, key_mask=(mask, 1))
        mask_fits("key_mask", mask, batch)
    return (q, k, v, mask, use_mask, causal, scale_value(scale, q.shape[-1], dtype), batch,
            pairs, terms)


def _keywords(causal, mask, use_mask, scale, terms):
    """The forward's keywords as saved["keywords"] records them."""
    return dict(causal=causal, key_mask=mask_record(mask, use_mask), scale=float(scale),
                **pair_record(terms))


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, dropout_p=0.0,
              dropout_seed=None, rel_bias=None, return_lse=False, return_saved=False, out=None):
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
    dropout_p : float in [0, 1), dropout_seed : int
        Attention dropout after the softmax, deterministic in the seed (required when
        dropout_p > 0); see `routing_attention.pairs`.
    rel_bias : array_like, shape (..., n + m - 1), optional
        Relative position bias: rel_bias[..., j - i + n - 1] is added to the logit of
        query i and key j (`routing_attention.pairs.relative_bias` builds it from ALiBi
        slopes or a T5 bucket table).
    return_lse : bool
        Also return the log-sum-exp of each query's logits, shape (..., n), which
        `attention_backward` can reuse.
    return_saved : bool
        Also return a dict ``saved`` of what the backward needs (``output``, ``lse`` and
        ``keywords``, the resolved causal, key_mask and scale of this call): pass it as
        ``attention_backward(dout, q, k, v, **saved)``, with the output unmodified.
    out : ndarray, shape (..., n, e), optional
        Where to write the output.

    Returns
    -------
    out : ndarray (..., n, e) [, lse (..., n) when `return_lse`] [, saved dict].  A query
    that sees no key gets output 0 and lse -inf.

    Raises
    ------
    TypeError
        A non-numeric or complex dtype, or an array of another library (torch, dask,
        ...), naming the argument.
    ValueError
        Mismatched shapes, a key_mask whose batch axes would enlarge the result, a
        non-finite scale.
    """
    if (key_mask is None and out is None and return_saved is False and type(return_lse) is bool
            and type(causal) is bool and dropout_p == 0.0 and rel_bias is None
            and plain_qkv(q, k, v)):
        # fast path: arrays that need no conversion (see plain_qkv), the common keywords
        native_scale = plain_scale(scale, q.shape[-1], q.dtype)
        if native_scale is not None:
            o, lse = _ext._attention_forward(q, k, v, all_keys(k.shape[-2]), False, native_scale,
                                             causal, *NO_PAIRS[q.dtype.char])
            return (o, lse) if return_lse else o
    q, k, v, mask, use_mask, causal, scale, batch, pairs, terms = _prepare(
        q, k, v, causal, key_mask, scale, dropout_p, dropout_seed, rel_bias)
    return_lse = flag("return_lse", return_lse)
    return_saved = flag("return_saved", return_saved)
    target = check_out(out, batch + (q.shape[-2], v.shape[-1]), q.dtype)
    o, lse = _ext._attention_forward(q, k, v, mask, use_mask, scale, causal, *pairs,
                                     out=(kernel_out(target, q.dtype, q, k, v), None))
    result = (into_out(target, o), lse) if return_lse else (into_out(target, o),)
    if return_saved:
        result += (dict(output=o, lse=lse,
                        keywords=_keywords(causal, mask, use_mask, scale, terms)),)
    return result[0] if len(result) == 1 else result


def attention_backward(dout, q, k, v, *, causal=None, key_mask=None, scale=None,
                       dropout_p=None, dropout_seed=None, rel_bias=None, lse=None, output=None,
                       keywords=None):
    """Gradients of `attention` with respect to q, k and v.

    Parameters
    ----------
    dout : array_like, shape (..., n, e)
        Gradient of the loss with respect to the attention output.
    q, k, v
        Exactly as passed to `attention`.
    causal, key_mask, scale, dropout_p, dropout_seed, rel_bias
        As passed to `attention`.  None (the default) takes the forward's value from
        `keywords` when given (``**saved``), else the forward's default (False, no
        mask, 1/sqrt(d), no dropout, no bias).  With a bias (passed or saved) its
        gradient is returned too.
    lse, output, keywords : optional
        The forward's ``saved`` dict (``attention(..., return_saved=True)``), passed as
        ``**saved``.  With lse and output the forward is not recomputed (with either
        missing it is).

    Returns
    -------
    dq, dk, dv [, drel_bias] : ndarrays with the shapes of q, k, v [and rel_bias, when
    given] (gradients summed over any broadcast batch axes).

    Raises
    ------
    ValueError
        A keyword that disagrees with ``keywords`` (the forward's), naming it; saved
        arrays of the wrong shape; and the forward's input errors.
    """
    kw = BackwardKeywords("attention_backward", dict(keywords=keywords), DEFAULTS,
                          causal=causal, key_mask=key_mask, scale=scale, dropout_p=dropout_p,
                          dropout_seed=dropout_seed, rel_bias=rel_bias)
    q, k, v, mask, use_mask, causal, scale, batch, pairs, terms = _prepare(q, k, v, **kw.values)
    kw.check(_keywords(causal, mask, use_mask, scale, terms))
    dout = as_matrix("dout", dout, q.dtype)
    expected = batch + (q.shape[-2], v.shape[-1])
    dout_shape(dout, *expected[-2:])
    batch_shape(dout=(dout, 2), q=(q, 2), k=(k, 2), v=(v, 2), key_mask=(mask, 1),
                rel_bias=(pairs[2], 1))
    if lse is None or output is None:
        output, lse = _ext._attention_forward(q, k, v, mask, use_mask, scale, causal, *pairs)
    else:
        output = as_matrix("output", output, q.dtype)
        lse = as_matrix("lse", lse, q.dtype, min_rank=1)
        forward_statistic("output", output.shape, expected)
        forward_statistic("lse", lse.shape, expected[:-1], core=f"(..., {q.shape[-2]})")
    dq, dk, dv, dbias = _ext._attention_backward(dout, q, k, v, mask, use_mask, output, lse,
                                                 scale, causal, *pairs)
    grads = (unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape))
    return grads + (unbroadcast(dbias, pairs[2].shape),) if terms[2] is not None else grads
