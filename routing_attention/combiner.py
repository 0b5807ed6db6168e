"""Combiner attention (Ren et al. 2021): full attention at sparse cost, on the C engine.

Every query reaches every key it may see: directly for a local set, and through region
summaries (a max-pooled key and the region's own softmax expectation of its values) for
the rest, all inside one softmax.  See docs/design.md (Combiner) and `reference.combiner_plan`.
"""
import math

import numpy as np

from . import _ext
from ._checks import (BackwardKeywords, LayerCalls, LayerContext, as_matrix, batch_shape,
                      check_out, combiner_block, dout_shape, flag, integer, into_out,
                      kernel_out, layer_dout, one_of, pair_record, plain_qkv, plain_scale,
                      qkv_arrays, saved_arrays, scale_option, scale_value,
                      self_attention_layout, unbroadcast)
from .pairs import NO_PAIRS, _checked

__all__ = ["combiner_attention", "combiner_attention_backward", "CombinerAttention", "PLANS"]

PLANS = ("fixed", "axial", "logsparse", "mixture")
_PLAN_CODE = {"fixed": 0, "axial": 1, "logsparse": 2, "mixture": 3}
DEFAULTS = dict(plan="fixed", block=None, causal=False, scale=None, dropout_p=0.0,
                dropout_seed=None, rel_bias=None)


def _default_block(n):
    """ceil(sqrt(n)), in integers (n >= 1)."""
    return math.isqrt(n - 1) + 1


def _prepare(q, k, v, plan, block, causal, scale, dropout_p=0.0, dropout_seed=None,
             rel_bias=None):
    """Checked arguments; the last two are the pair-term operands of the gufuncs and the
    resolved pair terms (dropout_p, dropout_seed, rel_bias)."""
    one_of("plan", plan, PLANS)
    q, k, v = qkv_arrays(q, k, v)
    dtype = q.dtype
    self_attention_layout(q, k)
    n = q.shape[-2]
    causal = flag("causal", causal)
    block = combiner_block(plan, block)
    if plan == "logsparse":
        block = 1                    # unused by the plan
    elif block is None:
        block = _default_block(n)
    else:
        block = integer("block", block, 1, n)
    _, _, pairs, terms = _checked(dtype, dict(q=(q, 2), k=(k, 2), v=(v, 2)), n, n, dropout_p,
                                    dropout_seed, rel_bias)
    return (q, k, v, _PLAN_CODE[plan], block, causal, scale_value(scale, q.shape[-1], dtype),
            pairs, terms)


def _keywords(plan, block, causal, scale, terms):
    """The forward's keywords as saved["keywords"] records them (block None for
    logsparse, which has none)."""
    return dict(plan=PLANS[plan], block=None if PLANS[plan] == "logsparse" else block,
                causal=causal, scale=float(scale), **pair_record(terms))


def combiner_attention(q, k, v, *, plan="fixed", block=None, causal=False, scale=None,
                       dropout_p=0.0, dropout_seed=None, rel_bias=None, return_saved=False,
                       out=None):
    """Combiner attention: one softmax per query over direct keys and region summaries.

    Parameters
    ----------
    q, k : array_like, shape (..., n, d)
    v : array_like, shape (..., n, e)
        Self-attention layout: as many keys as queries.  Leading axes broadcast.
    plan : {"fixed", "axial", "logsparse", "mixture"}
        fixed: direct = own block of `block` positions, regions = the other blocks.
        axial: grid of rows of `block` columns; direct = own row, regions = the other
        rows, summarised under the query's column.  logsparse: direct = self, regions =
        the dyadic spans before (and after) the query.  mixture: own row and column
        direct; other columns' and rows' partial cells as regions.
    block : int, optional
        Block size (fixed) or grid width (axial, mixture), 1 <= block <= n; defaults to
        ceil(sqrt(n)).  Not used by logsparse (must be None).
    causal : bool
        True: query i sees only keys j <= i, directly or through regions of the past.
        False (the default, as everywhere in this package) lets every query reach every
        key.
    scale : float, optional
        Multiplies every logit (direct, summary and inside regions); 1/sqrt(d) default.
    dropout_p, dropout_seed
        Attention dropout (`routing_attention.pairs`) of the query's softmax weights:
        a direct key's weight as pair (i, j), a summary's as pair (i, -1 - vid) with vid
        the region's id (`reference.combiner_plan`).  A region's own distribution over its
        members (shared by every query that reads the summary) is not dropped.
    rel_bias : array_like, shape (..., 2n - 1), optional
        Relative position bias on the direct keys' logits (rel_bias[..., j - i + n - 1]);
        a summary has no position and gets none.
    return_saved : bool
        Also return a dict of the statistics that spare the backward the query
        softmaxes (``output``: the returned array itself, ``lse``) and ``keywords``
        (the resolved plan, block, causal and scale): pass it on as
        ``combiner_attention_backward(dout, q, k, v, **saved)``, with the output
        unmodified.
    out : ndarray, shape (..., n, e), optional
        Where to write the output (any strides).

    Returns
    -------
    out : ndarray (..., n, e).  Summary keys and region queries are element-wise
    max-pools over their region; gradients (see `combiner_attention_backward`) flow to
    the arg-max element, ties going to the lowest position.  [, saved : dict]

    Raises
    ------
    TypeError, ValueError
        Bad dtypes or shapes (n != m, n = 0), an unknown plan, block out of [1, n] (or
        given for logsparse), naming the argument.
    """
    if (out is None and return_saved is False and type(causal) is bool and block is None
            and dropout_p == 0.0 and rel_bias is None and plan in _PLAN_CODE
            and plain_qkv(q, k, v) and 1 <= q.shape[-2] == k.shape[-2]):
        # fast path: arrays that need no conversion (see plain_qkv), the default block
        native_scale = plain_scale(scale, q.shape[-1], q.dtype)
        if native_scale is not None:
            n = q.shape[-2]
            block = 1 if plan == "logsparse" else _default_block(n)
            return _ext._combiner_forward(q, k, v, _PLAN_CODE[plan], block, causal,
                                          native_scale, *NO_PAIRS[q.dtype.char])[0]
    q, k, v, plan, block, causal, scale, pairs, terms = _prepare(
        q, k, v, plan, block, causal, scale, dropout_p, dropout_seed, rel_bias)
    return_saved = flag("return_saved", return_saved)
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], pairs[2].shape[:-1])
    target = check_out(out, batch + (q.shape[-2], v.shape[-1]), q.dtype)
    o, lse = _ext._combiner_forward(q, k, v, plan, block, causal, scale, *pairs,
                                    out=(kernel_out(target, q.dtype, q, k, v), None))
    if return_saved:
        return into_out(target, o), dict(output=o, lse=lse,
                                         keywords=_keywords(plan, block, causal, scale, terms))
    return into_out(target, o)


SAVED_KEYS = ("output", "lse")


def combiner_attention_backward(dout, q, k, v, *, plan=None, block=None, causal=None,
                                scale=None, dropout_p=None, dropout_seed=None, rel_bias=None,
                                **saved):
    """Gradients (dq, dk, dv [, drel_bias]) of `combiner_attention` for the loss gradient
    `dout` (..., n, e); gradients are summed over broadcast axes.  dropout_p,
    dropout_seed and rel_bias as in the forward (or from ``**saved``); with a bias its
    gradient is returned too.

    ``**saved``: the dict the forward returned with ``return_saved=True`` for the same
    inputs (else the forward's query softmaxes are recomputed; the result is the same).
    Keywords left at None are taken from it (saved["keywords"]),
    or without it are the forward's defaults (fixed, ceil(sqrt(n)), False, 1/sqrt(d)).

    Raises
    ------
    ValueError
        A keyword that disagrees with the saved forward's, naming it; saved arrays of
        the wrong shape; and the forward's input errors.
    """
    kw = BackwardKeywords("combiner_attention_backward", saved, DEFAULTS, plan=plan,
                          block=block, causal=causal, scale=scale, dropout_p=dropout_p,
                          dropout_seed=dropout_seed, rel_bias=rel_bias)
    q, k, v, plan, block, causal, scale, pairs, terms = _prepare(q, k, v, **kw.values)
    kw.check(_keywords(plan, block, causal, scale, terms))
    saved = kw.arrays
    dout = as_matrix("dout", dout, q.dtype)
    expected = (q.shape[-2], v.shape[-1])
    dout_shape(dout, *expected)
    batch_shape(dout=(dout, 2), q=(q, 2), k=(k, 2), v=(v, 2), rel_bias=(pairs[2], 1))
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], pairs[2].shape[:-1])
    arrays = saved_arrays(saved, SAVED_KEYS, batch, dict(output=expected, lse=expected[:1]),
                          dict(output=q.dtype, lse=q.dtype))
    dq, dk, dv, dbias = _ext._combiner_backward(dout, q, k, v, *arrays, bool(saved), plan,
                                                block, causal, scale, *pairs)
    grads = (unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape))
    return grads + (unbroadcast(dbias, pairs[2].shape),) if terms[2] is not None else grads


class CombinerAttention(LayerCalls):
    """A Combiner attention layer.

    ``out = layer(q, k, v)`` runs `combiner_attention`; ``layer.backward(dout)`` returns
    (dq, dk, dv) for that call.  After several calls, take each call's context instead:
    ``out, ctx = layer.forward(q, k, v)`` and ``layer.backward(dout, ctx)``
    (``backward(dout)`` then raises RuntimeError rather than guess the call).

    Parameters are those of `combiner_attention` (causal defaults to False); `block=None`
    picks ceil(sqrt(n)) per call (fixed, axial, mixture).

    Raises
    ------
    TypeError, ValueError
        An unknown plan; at a call, the errors of `combiner_attention`.  At `backward`, a
        dout not shaped exactly like that call's output (ValueError).
    RuntimeError
        `backward(dout)` without a context after two or more calls.
    """

    def __init__(self, plan="fixed", *, block=None, causal=False, scale=None):
        one_of("plan", plan, PLANS)
        self.plan, self.block, self.causal = plan, block, flag("causal", causal)
        self.scale = scale_option(scale)

    def _run(self, q, k, v, reuse):
        """Output and the backward's data (q, k, v, saved); the saved output is a copy
        (the caller may modify the returned array), written into `reuse`'s when the
        shapes repeat (no new pages to fault in)."""
        out, saved = combiner_attention(q, k, v, plan=self.plan, block=self.block,
                                        causal=self.causal, scale=self.scale, return_saved=True)
        kept = None if reuse is None else reuse[3]["output"]
        if kept is not None and kept.shape == out.shape and kept.dtype == out.dtype:
            np.copyto(kept, out)
        else:
            kept = out.copy()
        return out, (q, k, v, dict(saved, output=kept))

    def forward(self, q, k, v):
        """``(out, ctx)``: the output (..., n, e) and this call's context for
        ``backward(dout, ctx)``."""
        out, data = self._run(q, k, v, None)
        return out, LayerContext(self, data)

    def __call__(self, q, k, v):
        """The attention output (..., n, e); the layer keeps this call's context for
        ``backward(dout)``."""
        out, data = self._run(q, k, v, self._reusable())
        self._keep(data)
        return out

    def backward(self, dout, ctx=None):
        """Gradients (dq, dk, dv) of the call `ctx` (from `forward`), or without ctx of
        the one ``layer(q, k, v)`` call since the previous backward (RuntimeError after
        two or more).  Shaped like q, k, v (summed over the axes they were broadcast
        along).  dout has exactly the shape of that call's output (else ValueError) and
        is cast to its dtype."""
        q, k, v, saved = self._context(ctx)
        dout = layer_dout(dout, saved["output"].shape)
        return combiner_attention_backward(dout, q, k, v, **saved)

    def __repr__(self):
        return (f"CombinerAttention(plan={self.plan!r}, block={self.block!r}, "
                f"causal={self.causal!r}, scale={self.scale!r})")
