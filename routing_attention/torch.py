"""PyTorch bridge: every routing_attention function as a ``torch.library`` custom op.

The functions here have the NumPy API's names, arguments and keywords and take CPU
tensors.  Each attention method is one custom op (namespace ``routing_attention``) whose
forward returns the statistics its C backward needs; its autograd formula is a second op
that runs the C backward on them (the forward is never recomputed).  Tensors are shared
with NumPy without copies (float32 and float64; half precision is computed in float32
and returned in its own dtype).  The NumPy functions stay the single source of truth:
the ops only convert at the edge.

Routing decisions (k-means, memberships, hashes) are non-differentiable ops: their float
inputs are detached, index and label inputs get no gradient.  A double backward raises.

Threads: the kernels use ``torch.get_num_threads()`` threads unless
`set_num_threads` (this module's) chose a number.

Layers: `RoutingAttention`, `ClusteredAttention`, `CombinerAttention` (torch.nn.Module).
"""
import hashlib
import inspect
import math
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch.library import custom_op

from . import _ext
from . import clustered as _clustered
from . import clustering as _clustering
from . import combiner as _combiner
from . import decoding as _decoding
from . import dense as _dense
from . import routing as _routing
from ._checks import (bias_sources, dropout_args, integer, mask_fits, mask_length,
                      no_bias_without_topk, one_of, pair_terms_without_lse, qkv_shapes,
                      rank_at_least, routing_heads, same_leading_axes, scale_value, unbroadcast)
from .pairs import t5_buckets

__all__ = [
    "relative_bias", "attention", "local_attention", "routing_attention", "clustered_attention",
    "improved_clustered_attention", "combiner_attention",
    "spherical_kmeans", "assign_clusters", "assign_top_members", "top_members",
    "members_from_labels", "update_centroids", "commitment_loss", "lsh_hash", "hamming_kmeans",
    "RoutingAttention", "ClusteredAttention", "CombinerAttention",
    "set_num_threads", "get_num_threads",
    "DenseCache", "LocalCache", "CombinerCache", "RoutingCache",
]

_NS = "routing_attention"
_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ threads
_threads_chosen = None      # set by set_num_threads; None = follow torch.get_num_threads()


def set_num_threads(n):
    """Threads the kernels use from this module; ``None`` (the default) follows
    ``torch.get_num_threads()`` at every call."""
    global _threads_chosen
    if n is not None:
        _ext.set_num_threads(int(n))
    _threads_chosen = None if n is None else int(n)


def get_num_threads():
    """Threads the next call will use."""
    return _threads_chosen if _threads_chosen is not None else torch.get_num_threads()


def _use_threads():
    want = get_num_threads()
    if _ext.get_num_threads() != want:
        _ext.set_num_threads(want)


# ------------------------------------------------------------------ tensor <-> ndarray
def _np(t):
    """A tensor as an ndarray sharing its memory (None stays None)."""
    return None if t is None else t.detach().numpy()


def _t(a):
    """An ndarray as a tensor sharing its memory (read-only views are copied: torch
    tensors are always writable)."""
    a = np.asarray(a)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def _batch(*pairs):
    """Broadcast batch shape of (tensor, core rank) pairs; None tensors are skipped."""
    return tuple(torch.broadcast_shapes(*(t.shape[:t.dim() - r] for t, r in pairs
                                          if t is not None)))


def _check_tensors(**tensors):
    """Every argument a CPU tensor (or None): TypeError / ValueError naming it."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor for routing_attention.torch; got "
                            f"{type(t).__name__} (for NumPy arrays, call the same function of "
                            "routing_attention itself, or wrap them with torch.from_numpy)")
        if t.device.type not in ("cpu", "meta"):
            raise ValueError(f"{name} is on device {t.device}; routing_attention's kernels run "
                             f"on the CPU only: move it with {name}.cpu()")


def _fake(op):
    """Decorator: fn becomes op's fake (shape-only) implementation, which first checks
    that the call's tensors share one device.  Under torch.compile every tensor is a
    fake one on one device, and all-meta calls infer shapes; but a CPU tensor mixed with
    meta ones also lands in the fake implementation, which would hand back uninitialised
    memory as the result: that raises instead, naming the odd argument."""
    names = None

    def name(i):
        return names[i] if i < len(names) else f"argument {i}"

    def checked(*args):
        found = [(i, a.device) for i, a in enumerate(args) if isinstance(a, Tensor)]
        for i, device in found[1:]:
            if device != found[0][1]:
                raise ValueError(f"{name(i)} is on device {device} but {name(found[0][0])} on "
                                 f"{found[0][1]}: pass every tensor on one device (the "
                                 "kernels run on the CPU)")

    def register(fn):
        nonlocal names
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind is p.POSITIONAL_OR_KEYWORD]
        op.register_fake(lambda *args, **kwargs: (checked(*args), fn(*args, **kwargs))[1])
        return fn
    return register


def _floats(**tensors):
    """The float tensors of one call in the dtype they are computed in, and the dtype the
    result is returned in.  float32/float64 promote like torch; float16 and bfloat16 are
    computed in float32 and the results cast back."""
    _check_tensors(**tensors)
    present = [t for t in tensors.values() if t is not None]
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
    result = present[0].dtype
    for t in present[1:]:
        result = torch.promote_types(result, t.dtype)
    compute = torch.float32 if result in _HALF else result
    if compute not in (torch.float32, torch.float64):
        raise TypeError(f"unsupported dtype {result}; use float32 or float64")
    return [None if t is None else t.to(compute) for t in tensors.values()], result


def _index(name, t):
    _check_tensors(**{name: t})
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor; got {t.dtype}")
    return t.to(torch.int64)


def _mask(name, t):
    if t is None:
        return None
    _check_tensors(**{name: t})
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor (False = padding); got {t.dtype}")
    return t


def _scale(scale):
    """scale as a Python float or None (a tensor scale would be data the op cannot trace)."""
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        raise TypeError("scale must be a Python number, not a tensor")
    return float(scale)


# ------------------------------------------------------------------ autograd glue
def _register_autograd(forward_op, backward_op, lse_output):
    """Autograd formula of an attention op: forward_op(q, k, v, *rest) -> (out, *stats);
    backward_op(dout, dlse, q, k, v, *rest, *stats) -> (dq, dk, dv).  `lse_output`: the
    first statistic is a log-sum-exp the user may differentiate (its gradient is passed as
    dlse); every other statistic is not differentiable."""

    def setup_context(ctx, inputs, output):
        ctx.tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
        ctx.others = [None if isinstance(x, Tensor) else x for x in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_positions), *output)
        ctx.mark_non_differentiable(*output[2 if lse_output else 1:])

    def backward(ctx, dout, *dstats):
        saved = ctx.saved_tensors
        args = list(ctx.others)
        for slot, i in enumerate(ctx.tensor_positions):
            args[i] = saved[slot]
        outputs = saved[len(ctx.tensor_positions):]
        dlse = dstats[0] if lse_output else None
        dq, dk, dv = backward_op(dout, dlse, *args, *outputs)
        return (dq, dk, dv) + (None,) * (len(args) - 3)

    forward_op.register_autograd(backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(f"{_NS}.{backward_op._name}: double backward (gradients of gradients) "
                           "is not supported by routing_attention's kernels")

    def no_context(ctx, inputs, output):
        pass

    backward_op.register_autograd(no_double_backward, setup_context=no_context)


def _lse_gradient(dlse, q, k, scale, attend, attend_backward):
    """(dq, dk) of Σ_i dlse_i · L_i where L_i = log Σ_j exp(scale·q_i·k_j) over the keys
    query i sees.  ∂L_i/∂s_ij is the attention weight P_ij, so dq_i = scale·g_i·Σ_j P_ij k_j
    — attention with the keys as values — and dk_j = scale·Σ_i P_ij g_i q_i — that
    attention's value gradient for dout_i = g_i q_i.  `attend(q, k, v)` and
    `attend_backward(dout, q, k, v)` compute that distribution's attention."""
    g = dlse[..., None]
    dq = scale * g * attend(q, k, k)
    dk = scale * attend_backward(g * q, q, k, k)[2]
    return unbroadcast(dq, q.shape), dk


def _has_gradient(dlse):
    return dlse is not None and bool(np.any(dlse != 0))


def _grads(dq, dk, dv):
    return _t(dq), _t(dk), _t(dv)


# ------------------------------------------------------------------ dense attention
@custom_op(f"{_NS}::attention", mutates_args=(),
           schema="(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, float? scale)"
                  " -> (Tensor, Tensor)")
def _attention_op(q, k, v, key_mask, causal, scale):
    _use_threads()
    out, lse = _dense.attention(_np(q), _np(k), _np(v), causal=causal, key_mask=_np(key_mask),
                                scale=scale, return_lse=True)
    return _t(out), _t(lse)


@_fake(_attention_op)
def _(q, k, v, key_mask, causal, scale):
    batch = _batch((q, 2), (k, 2), (v, 2), (key_mask, 1))
    return q.new_empty(batch + (q.shape[-2], v.shape[-1])), q.new_empty(batch + (q.shape[-2],))


@custom_op(f"{_NS}::attention_backward", mutates_args=(),
           schema="(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor? key_mask, "
                  "bool causal, float? scale, Tensor out, Tensor lse) -> (Tensor, Tensor, Tensor)")
def _attention_backward_op(dout, dlse, q, k, v, key_mask, causal, scale, out, lse):
    _use_threads()
    q, k, v, mask, dlse = _np(q), _np(k), _np(v), _np(key_mask), _np(dlse)
    kw = dict(causal=causal, key_mask=mask, scale=scale)
    dq, dk, dv = _dense.attention_backward(_np(dout), q, k, v, lse=_np(lse), output=_np(out), **kw)
    if _has_gradient(dlse):
        eq, ek = _lse_gradient(dlse, q, k, scale_value(scale, q.shape[-1], q.dtype),
                               lambda *a: _dense.attention(*a, **kw),
                               lambda *a: _dense.attention_backward(*a, **kw))
        dq, dk = dq + eq, dk + ek
    return _grads(dq, dk, dv)


def _grad_fake(dout, dlse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_fake(_attention_backward_op)(_grad_fake)
_register_autograd(_attention_op, _attention_backward_op, lse_output=True)


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, dropout_p=0.0,
              dropout_seed=None, rel_bias=None, generator=None, return_lse=False):
    """Dense softmax attention on CPU tensors; see `routing_attention.attention`.
    Differentiable in q, k, v, rel_bias (and through the returned lse).

    dropout_p > 0 drops attention weights (`routing_attention.pairs`); the mask's seed is
    `dropout_seed`, or drawn from `generator` (torch's default generator when None), so
    torch.manual_seed makes runs repeatable.  rel_bias (..., n + m - 1) is the relative
    position bias (build it with `relative_bias`).  With either, return_lse is refused."""
    pairs = _with_pairs(dropout_p, dropout_seed, rel_bias, return_lse, generator)
    if pairs is not None:
        return _pair_run("dense", q, k, v, pairs, key_mask=_mask("key_mask", key_mask),
                         causal=bool(causal), scale=_scale(scale))
    (q, k, v), dtype = _floats(q=q, k=k, v=v)
    out, lse = _attention_op(q, k, v, _mask("key_mask", key_mask), bool(causal), _scale(scale))
    out, lse = out.to(dtype), lse.to(dtype)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------ routing / local
_ROUTING_STATS = "Tensor, Tensor, Tensor, Tensor, Tensor"     # out, lse, slot out/lse/self


def _one_cluster_slots(q_idx, n):
    """(..., c, w) bool: slot (cl, r) — the r-th listed query of cluster cl — belongs to
    a token listed in no other cluster."""
    listed = np.take_along_axis(q_idx, np.argsort(q_idx < 0, axis=-1, kind="stable"), -1)
    flat = listed.reshape(-1, listed.shape[-2] * listed.shape[-1])
    one = np.zeros(flat.shape, bool)
    for b, row in enumerate(flat):
        valid = row >= 0
        one[b, valid] = np.bincount(row[valid], minlength=n)[row[valid]] == 1
    return one.reshape(listed.shape)


def _routing_forward(q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale):
    out, lse, saved = _routing.routing_attention(
        q, k, v, q_idx, k_idx, causal=causal, exclude_self=exclude_self, merge=merge,
        scale=scale, return_lse=True, return_saved=True)
    # slot r of a cluster holds its r-th listed query; the kernel leaves the slots past
    # the cluster's member count, and the output slots of tokens in one cluster only,
    # unwritten: give them fixed values, so that an op's outputs are a function of its
    # inputs
    q_idx = np.asarray(q_idx)
    count = (q_idx >= 0).sum(axis=-1, keepdims=True)
    empty = np.arange(q_idx.shape[-1]) >= count
    slot_output, slot_lse, slot_self = saved["slot_output"], saved["slot_lse"], saved["slot_self"]
    slot_output[np.broadcast_to(empty | _one_cluster_slots(q_idx, q.shape[-2]), slot_lse.shape)] = 0
    slot_lse[np.broadcast_to(empty, slot_lse.shape)] = -np.inf
    slot_self[np.broadcast_to(empty, slot_lse.shape)] = False
    return tuple(_t(a) for a in (out, lse, slot_output, slot_lse, slot_self))


def _routing_fake(q, k, v, q_idx, k_idx):
    batch = _batch((q, 2), (k, 2), (v, 2), (q_idx, 2), (k_idx, 2))
    n, e, (c, w) = q.shape[-2], v.shape[-1], q_idx.shape[-2:]
    return (q.new_empty(batch + (n, e)), q.new_empty(batch + (n,)),
            q.new_empty(batch + (c, w, e)), q.new_empty(batch + (c, w)),
            q.new_empty(batch + (c, w), dtype=torch.bool))


def _routing_backward(dout, dlse, q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale,
                      stats):
    """The NumPy routing backward on the forward's statistics, plus the lse term."""
    kw = dict(causal=causal, exclude_self=exclude_self, scale=scale)
    saved = dict(zip(_routing.SAVED_KEYS, (_np(s) for s in stats)))
    q, k, v, dlse = _np(q), _np(k), _np(v), _np(dlse)
    dq, dk, dv = _routing.routing_attention_backward(_np(dout), q, k, v, q_idx, k_idx, merge=merge,
                                                     **kw, **saved)
    if _has_gradient(dlse):
        # L is the log-sum-exp of the concatenated key lists whatever the merge: its
        # distribution is the lse-merged attention's
        kw["merge"] = "lse"
        eq, ek = _lse_gradient(
            dlse, q, k, scale_value(scale, q.shape[-1], q.dtype),
            lambda a, b, c: _routing.routing_attention(a, b, c, q_idx, k_idx, **kw),
            lambda d, a, b, c: _routing.routing_attention_backward(d, a, b, c, q_idx, k_idx, **kw))
        dq, dk = dq + eq, dk + ek
    return _grads(dq, dk, dv)


@custom_op(f"{_NS}::routing_attention", mutates_args=(),
           schema="(Tensor q, Tensor k, Tensor v, Tensor q_idx, Tensor k_idx, bool causal, "
                  f"bool exclude_self, str merge, float? scale) -> ({_ROUTING_STATS})")
def _routing_op(q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale):
    _use_threads()
    return _routing_forward(_np(q), _np(k), _np(v), _np(q_idx), _np(k_idx), causal,
                            exclude_self, merge, scale)


@_fake(_routing_op)
def _(q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale):
    return _routing_fake(q, k, v, q_idx, k_idx)


@custom_op(f"{_NS}::routing_attention_backward", mutates_args=(),
           schema="(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor q_idx, "
                  "Tensor k_idx, bool causal, bool exclude_self, str merge, float? scale, "
                  "Tensor out, Tensor lse, Tensor slot_output, Tensor slot_lse, "
                  "Tensor slot_self) -> (Tensor, Tensor, Tensor)")
def _routing_backward_op(dout, dlse, q, k, v, q_idx, k_idx, causal, exclude_self, merge, scale,
                         *stats):
    _use_threads()
    return _routing_backward(dout, dlse, q, k, v, _np(q_idx), _np(k_idx), causal, exclude_self,
                             merge, scale, stats)


_fake(_routing_backward_op)(_grad_fake)
_register_autograd(_routing_op, _routing_backward_op, lse_output=True)


def routing_attention(q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False, merge="mean",
                      scale=None, dropout_p=0.0, dropout_seed=None, rel_bias=None,
                      generator=None, return_lse=False):
    """Attention inside clusters given by membership lists, on CPU tensors; see
    `routing_attention.routing_attention`.  q_idx, k_idx are integer tensors (no
    gradient); differentiable in q, k, v, rel_bias (and through the returned lse).
    dropout_p, dropout_seed, rel_bias, generator: as in `attention`."""
    pairs = _with_pairs(dropout_p, dropout_seed, rel_bias, return_lse, generator)
    if pairs is not None:
        return _pair_run("routing", q, k, v, pairs, q_idx=_index("q_idx", q_idx),
                         k_idx=_index("k_idx", k_idx), causal=bool(causal),
                         exclude_self=bool(exclude_self), merge=str(merge), scale=_scale(scale))
    (q, k, v), dtype = _floats(q=q, k=k, v=v)
    out, lse, *_ = _routing_op(q, k, v, _index("q_idx", q_idx), _index("k_idx", k_idx),
                               bool(causal), bool(exclude_self), str(merge), _scale(scale))
    out, lse = out.to(dtype), lse.to(dtype)
    return (out, lse) if return_lse else out


def _local_members(q, k, window, causal):
    q_idx, k_idx = _routing.local_members(q.shape[-2], k.shape[-2], window, causal)
    return q_idx, k_idx


@custom_op(f"{_NS}::local_attention", mutates_args=(),
           schema="(Tensor q, Tensor k, Tensor v, int window, bool causal, float? scale)"
                  f" -> ({_ROUTING_STATS})")
def _local_op(q, k, v, window, causal, scale):
    _use_threads()
    q_idx, k_idx = _local_members(q, k, window, causal)
    return _routing_forward(_np(q), _np(k), _np(v), q_idx, k_idx, causal, False, "mean", scale)


@_fake(_local_op)
def _(q, k, v, window, causal, scale):
    n, m = q.shape[-2], k.shape[-2]
    w = min(window, max(n, m, 1))
    blocks = max(1, -(-n // w))
    span = (2 if causal else 3) * w
    return _routing_fake(q, k, v, q.new_empty((blocks, w)), q.new_empty((blocks, span)))


@custom_op(f"{_NS}::local_attention_backward", mutates_args=(),
           schema="(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, int window, "
                  "bool causal, float? scale, Tensor out, Tensor lse, Tensor slot_output, "
                  "Tensor slot_lse, Tensor slot_self) -> (Tensor, Tensor, Tensor)")
def _local_backward_op(dout, dlse, q, k, v, window, causal, scale, *stats):
    _use_threads()
    q_idx, k_idx = _local_members(q, k, window, causal)
    return _routing_backward(dout, None, q, k, v, q_idx, k_idx, causal, False, "mean", scale,
                             stats)


_fake(_local_backward_op)(_grad_fake)
_register_autograd(_local_op, _local_backward_op, lse_output=False)


def local_attention(q, k, v, window, *, causal=False, scale=None, dropout_p=0.0,
                    dropout_seed=None, rel_bias=None, generator=None):
    """Blocked local attention on CPU tensors; see `routing_attention.local_attention`.
    dropout_p, dropout_seed, rel_bias, generator: as in `attention`."""
    window = integer("window", int(window), low=1)
    pairs = _with_pairs(dropout_p, dropout_seed, rel_bias, False, generator)
    if pairs is not None:
        return _pair_run("local", q, k, v, pairs, window=window, causal=bool(causal),
                         scale=_scale(scale))
    (q, k, v), dtype = _floats(q=q, k=k, v=v)
    return _local_op(q, k, v, window, bool(causal), _scale(scale))[0].to(dtype)


# ------------------------------------------------------------------ dropout / position bias
# Calls with attention dropout or a relative position bias run through one op per
# direction that names its method (dense, routing, local, clustered, combiner): the
# backward recomputes the
# forward (the dropout mask is regenerated from the seed, never stored) and also returns
# the gradient of rel_bias.  Their lse is not returned (return_lse with these terms is
# refused), so no gradient can reach it.
_PAIR_ARGS = ("str method, Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? q_idx, "
              "Tensor? k_idx, Tensor? labels, int window, int n_clusters, int topk, str plan, "
              "int? block, bool causal, "
              "bool exclude_self, str merge, float? scale, float dropout_p, Tensor? seed, "
              "Tensor? rel_bias")


def _pair_call(method, q, k, v, key_mask, q_idx, k_idx, labels, window, n_clusters, topk,
               plan, block, causal, exclude_self, merge, scale, dropout_p, seed, rel_bias,
               dout=None):
    """The NumPy forward (dout None) or backward of `method` with the pair terms (seed: a
    0-d int64 tensor, or None without dropout)."""
    seed = None if seed is None else int(seed)
    kw = dict(causal=causal, scale=scale, dropout_p=dropout_p, dropout_seed=seed,
              rel_bias=_np(rel_bias))
    if method == "combiner":
        fwd, bwd, extra = _combiner.combiner_attention, _combiner.combiner_attention_backward, ()
        kw.update(plan=plan, block=block)
    elif method == "clustered":
        kw = dict(key_mask=_np(key_mask), scale=scale, dropout_p=dropout_p, dropout_seed=seed)
        if topk:
            fwd = _clustered.improved_clustered_attention
            bwd = _clustered.improved_clustered_attention_backward
            extra = (_np(labels), n_clusters, topk)
            kw["rel_bias"] = _np(rel_bias)
        else:
            fwd, bwd = _clustered.clustered_attention, _clustered.clustered_attention_backward
            extra = (_np(labels), n_clusters)
    elif method == "dense":
        fwd, bwd, extra = _dense.attention, _dense.attention_backward, ()
        kw["key_mask"] = _np(key_mask)
    elif method == "routing":
        fwd, bwd = _routing.routing_attention, _routing.routing_attention_backward
        extra = (_np(q_idx), _np(k_idx))
        kw.update(exclude_self=exclude_self, merge=merge)
    else:
        fwd, bwd, extra = _routing.local_attention, _routing.local_attention_backward, (window,)
    q, k, v = _np(q), _np(k), _np(v)
    if dout is None:
        return fwd(q, k, v, *extra, **kw)
    return bwd(_np(dout), q, k, v, *extra, **kw)


@custom_op(f"{_NS}::pair_attention", mutates_args=(), schema=f"({_PAIR_ARGS}) -> Tensor")
def _pair_op(*args):
    _use_threads()
    return _t(_pair_call(*args))


@_fake(_pair_op)
def _(method, q, k, v, key_mask, q_idx, k_idx, labels, *rest):
    cores = [(q, 2), (k, 2), (v, 2), (key_mask, 1), (q_idx, 2), (k_idx, 2), (labels, 1),
             (rest[-1], 1)]
    return q.new_empty(_batch(*cores) + (q.shape[-2], v.shape[-1]))


@custom_op(f"{_NS}::pair_attention_backward", mutates_args=(),
           schema=f"(Tensor dout, {_PAIR_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)")
def _pair_backward_op(dout, *args):
    _use_threads()
    grads = _pair_call(*args, dout=dout)
    rel_bias = args[-1]
    dbias = grads[3] if rel_bias is not None else np.zeros(0, _np(args[1]).dtype)
    return _t(grads[0]), _t(grads[1]), _t(grads[2]), _t(dbias)


@_fake(_pair_backward_op)
def _(dout, method, q, k, v, *rest):
    rel_bias = rest[-1]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(rel_bias) if rel_bias is not None else q.new_empty(0))


def _pair_setup(ctx, inputs, output):
    ctx.inputs = list(inputs)
    tensors = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
    ctx.positions = tensors
    ctx.save_for_backward(*(inputs[i] for i in tensors))


def _pair_backward(ctx, dout):
    args, saved = list(ctx.inputs), ctx.saved_tensors      # unpacked once (checkpoint)
    for slot, i in enumerate(ctx.positions):
        args[i] = saved[slot]
    dq, dk, dv, dbias = _pair_backward_op(dout, *args)
    grads = [None] * len(args)
    grads[1:4] = dq, dk, dv
    if args[-1] is not None:
        grads[-1] = dbias
    return tuple(grads)


_pair_op.register_autograd(_pair_backward, setup_context=_pair_setup)


def _no_double_pair_backward(ctx, *grads):
    raise RuntimeError(f"{_NS}.pair_attention_backward: double backward (gradients of "
                       "gradients) is not supported by routing_attention's kernels")


_pair_backward_op.register_autograd(_no_double_pair_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def relative_bias(n, m, *, alibi=None, table=None, max_distance=128, bidirectional=True):
    """`routing_attention.pairs.relative_bias` on tensors, differentiable in alibi and
    table (torch ops): the rel_bias (..., n + m - 1) of ALiBi slopes (...,) and/or a T5
    bucket table (..., num_buckets)."""
    offsets = torch.arange(-(n - 1), m, dtype=torch.int64)
    parts = []
    if alibi is not None:
        _check_tensors(alibi=alibi)
        parts.append(-alibi[..., None] * offsets.abs().to(alibi.dtype))
    if table is not None:
        _check_tensors(table=table)
        buckets = t5_buckets(offsets.numpy(), table.shape[-1], max_distance, bidirectional)
        parts.append(table[..., torch.from_numpy(buckets)])
    bias_sources(len(parts))
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


_PAIR_DEFAULTS = dict(key_mask=None, q_idx=None, k_idx=None, labels=None, window=0,
                      n_clusters=0, topk=0, plan="", block=None, causal=False,
                      exclude_self=False, merge="mean", scale=None)


def _pair_run(method, q, k, v, pairs, **options):
    """`method` with the pair terms `pairs` (from _with_pairs) on tensors q, k, v: the
    op's other arguments by name (the rest at their defaults), the result in the call's
    dtype."""
    (q, k, v, rel_bias), dtype = _floats(q=q, k=k, v=v, rel_bias=pairs[2])
    seed = pairs[1]
    if seed is not None and not isinstance(seed, Tensor):
        seed = torch.tensor(seed, dtype=torch.int64)
    a = dict(_PAIR_DEFAULTS, **options)
    return _pair_op(method, q, k, v, a["key_mask"], a["q_idx"], a["k_idx"], a["labels"],
                    a["window"], a["n_clusters"], a["topk"], a["plan"], a["block"], a["causal"],
                    a["exclude_self"], a["merge"], a["scale"], pairs[0],
                    None if seed is None else seed.to(q.device), rel_bias).to(dtype)


def _with_pairs(dropout_p, dropout_seed, rel_bias, return_lse, generator):
    """None when the call has no pair terms; else (dropout_p, seed, rel_bias) with a seed
    drawn from torch's generator when dropout_seed is None and dropout_p > 0 (a 0-d
    tensor, never read in Python: torch.compile traces the draw into the graph)."""
    if not dropout_p and rel_bias is None:
        return None
    pair_terms_without_lse(return_lse)
    drawn = None
    if dropout_seed is None and dropout_p:
        drawn = torch.randint(0, 2**62, (), generator=generator)
    p, seed, _ = dropout_args(dropout_p, 0 if drawn is not None else dropout_seed)
    seed = drawn if drawn is not None else seed
    if rel_bias is not None:
        _check_tensors(rel_bias=rel_bias)
    return p, seed, rel_bias


# ------------------------------------------------------------------ clustered
def _clustered_function(topk, backward):
    """The NumPy function of the plain (topk 0) or improved form, and its extra keyword."""
    if topk == 0:
        f = _clustered.clustered_attention_backward if backward else _clustered.clustered_attention
        return f, {}
    f = (_clustered.improved_clustered_attention_backward if backward
         else _clustered.improved_clustered_attention)
    return f, dict(topk=topk)


@custom_op(f"{_NS}::clustered_attention", mutates_args=(),
           schema="(Tensor q, Tensor k, Tensor v, Tensor labels, int n_clusters, int topk, "
                  "Tensor? key_mask, float? scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _clustered_op(q, k, v, labels, n_clusters, topk, key_mask, scale):
    _use_threads()
    forward, kw = _clustered_function(topk, False)
    out, saved = forward(_np(q), _np(k), _np(v), _np(labels), n_clusters, key_mask=_np(key_mask),
                         scale=scale, return_saved=True, **kw)
    return (_t(out),) + tuple(_t(saved[key]) for key in _clustered.SAVED_KEYS)


@_fake(_clustered_op)
def _(q, k, v, labels, n_clusters, topk, key_mask, scale):
    batch = _batch((q, 2), (k, 2), (v, 2), (labels, 1), (key_mask, 1))
    kmax = min(topk, k.shape[-2])
    e = v.shape[-1]
    return (q.new_empty(batch + (q.shape[-2], e)), q.new_empty(batch + (n_clusters, e)),
            q.new_empty(batch + (n_clusters,)),
            q.new_empty(batch + (n_clusters, kmax), dtype=torch.int64),
            q.new_empty(batch + (n_clusters, kmax)))


@custom_op(f"{_NS}::clustered_attention_backward", mutates_args=(),
           schema="(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor labels, "
                  "int n_clusters, int topk, Tensor? key_mask, float? scale, Tensor out, "
                  "Tensor centroid_out, Tensor centroid_lse, Tensor topk_index, "
                  "Tensor topk_weight) -> (Tensor, Tensor, Tensor)")
def _clustered_backward_op(dout, dlse, q, k, v, labels, n_clusters, topk, key_mask, scale, out,
                           *stats):
    _use_threads()
    saved = dict(zip(_clustered.SAVED_KEYS, (_np(s) for s in stats)))
    backward, kw = _clustered_function(topk, True)
    return _grads(*backward(_np(dout), _np(q), _np(k), _np(v), _np(labels), n_clusters,
                            key_mask=_np(key_mask), scale=scale, **kw, **saved))


_fake(_clustered_backward_op)(_grad_fake)
_register_autograd(_clustered_op, _clustered_backward_op, lse_output=False)


def _clustered_call(q, k, v, labels, n_clusters, topk, key_mask, scale, pair_args=None):
    if pair_args is not None:
        pairs = _with_pairs(*pair_args)
        if pairs is not None:
            return _pair_run("clustered", q, k, v, pairs, key_mask=_mask("key_mask", key_mask),
                             labels=_index("labels", labels), n_clusters=int(n_clusters),
                             topk=topk, scale=_scale(scale))
    (q, k, v), dtype = _floats(q=q, k=k, v=v)
    return _clustered_op(q, k, v, _index("labels", labels), int(n_clusters), topk,
                         _mask("key_mask", key_mask), _scale(scale))[0].to(dtype)


def clustered_attention(q, k, v, labels, n_clusters, *, key_mask=None, scale=None,
                        dropout_p=0.0, dropout_seed=None, generator=None):
    """Clustered attention on CPU tensors; see `routing_attention.clustered_attention`.
    labels (..., n) integer tensor (no gradient).  dropout_p, dropout_seed, generator: as
    in `attention` (the centroid weights are dropped, shared by a cluster's members)."""
    return _clustered_call(q, k, v, labels, n_clusters, 0, key_mask, scale,
                           (dropout_p, dropout_seed, None, False, generator))


def improved_clustered_attention(q, k, v, labels, n_clusters, topk, *, key_mask=None, scale=None,
                                 dropout_p=0.0, dropout_seed=None, rel_bias=None,
                                 generator=None):
    """Improved clustered attention on CPU tensors; see
    `routing_attention.improved_clustered_attention` (m̂_c is a constant in the backward,
    as in the paper).  dropout_p, dropout_seed, rel_bias (on the exact part's logits),
    generator: as in `attention`."""
    topk = integer("topk", int(topk), low=1)
    return _clustered_call(q, k, v, labels, n_clusters, topk, key_mask, scale,
                           (dropout_p, dropout_seed, rel_bias, False, generator))


# ------------------------------------------------------------------ Combiner
@custom_op(f"{_NS}::combiner_attention", mutates_args=(),
           schema="(Tensor q, Tensor k, Tensor v, str plan, int? block, bool causal, "
                  "float? scale) -> (Tensor, Tensor)")
def _combiner_op(q, k, v, plan, block, causal, scale):
    _use_threads()
    out, saved = _combiner.combiner_attention(_np(q), _np(k), _np(v), plan=plan, block=block,
                                              causal=causal, scale=scale, return_saved=True)
    return _t(out), _t(saved["lse"])


@_fake(_combiner_op)
def _(q, k, v, plan, block, causal, scale):
    batch = _batch((q, 2), (k, 2), (v, 2))
    return q.new_empty(batch + (q.shape[-2], v.shape[-1])), q.new_empty(batch + (q.shape[-2],))


@custom_op(f"{_NS}::combiner_attention_backward", mutates_args=(),
           schema="(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, str plan, "
                  "int? block, bool causal, float? scale, Tensor out, Tensor lse)"
                  " -> (Tensor, Tensor, Tensor)")
def _combiner_backward_op(dout, dlse, q, k, v, plan, block, causal, scale, out, lse):
    _use_threads()
    return _grads(*_combiner.combiner_attention_backward(
        _np(dout), _np(q), _np(k), _np(v), plan=plan, block=block, causal=causal, scale=scale,
        output=_np(out), lse=_np(lse)))


_fake(_combiner_backward_op)(_grad_fake)
_register_autograd(_combiner_op, _combiner_backward_op, lse_output=False)


def combiner_attention(q, k, v, *, plan="fixed", block=None, causal=False, scale=None,
                       dropout_p=0.0, dropout_seed=None, rel_bias=None, generator=None):
    """Combiner attention on CPU tensors; see `routing_attention.combiner_attention`.
    dropout_p, dropout_seed, rel_bias (direct keys), generator: as in `attention`."""
    block = None if block is None else int(block)
    pairs = _with_pairs(dropout_p, dropout_seed, rel_bias, False, generator)
    if pairs is not None:
        return _pair_run("combiner", q, k, v, pairs, plan=str(plan), block=block,
                         causal=bool(causal), scale=_scale(scale))
    (q, k, v), dtype = _floats(q=q, k=k, v=v)
    return _combiner_op(q, k, v, str(plan), block, bool(causal), _scale(scale))[0].to(dtype)


# ------------------------------------------------------------------ routing decisions
# Non-differentiable: float inputs are detached by the wrappers, outputs are labels,
# member lists, codes or centroids that no gradient flows through.
def _decision_inputs(**tensors):
    """Float inputs of a routing decision: detached, computed dtype, result dtype."""
    (*arrays,), dtype = _floats(**tensors)
    return [None if a is None else a.detach() for a in arrays], dtype


@custom_op(f"{_NS}::spherical_kmeans", mutates_args=(),
           schema="(Tensor x, int n_clusters, int iters, int seed, Tensor? mask, Tensor? init)"
                  " -> Tensor")
def _spherical_kmeans_op(x, n_clusters, iters, seed, mask, init):
    _use_threads()
    return _t(_clustering.spherical_kmeans(_np(x), n_clusters, iters=iters, seed=seed,
                                           mask=_np(mask), init=_np(init)))


@_fake(_spherical_kmeans_op)
def _(x, n_clusters, iters, seed, mask, init):
    batch = _batch((x, 2), (mask, 1), (init, 2))
    return x.new_empty(batch + (n_clusters, x.shape[-1]))


def spherical_kmeans(x, n_clusters, *, iters=10, seed=0, mask=None, init=None):
    """Unit-norm centroids (..., c, d); see `routing_attention.spherical_kmeans`."""
    (x, init), dtype = _decision_inputs(x=x, init=init)
    return _spherical_kmeans_op(x, int(n_clusters), int(iters), int(seed), _mask("mask", mask),
                                init).to(dtype)


@custom_op(f"{_NS}::assign_clusters", mutates_args=(),
           schema="(Tensor x, Tensor centroids) -> Tensor")
def _assign_clusters_op(x, centroids):
    _use_threads()
    return _t(_clustering.assign_clusters(_np(x), _np(centroids)))


@_fake(_assign_clusters_op)
def _(x, centroids):
    return x.new_empty(_batch((x, 2), (centroids, 2)) + (x.shape[-2],), dtype=torch.int64)


@custom_op(f"{_NS}::assign_scores", mutates_args=(),
           schema="(Tensor x, Tensor centroids) -> (Tensor, Tensor, Tensor)")
def _assign_scores_op(x, centroids):
    _use_threads()
    return tuple(_t(a) for a in _clustering.assign_clusters(_np(x), _np(centroids),
                                                            return_scores=True))


@_fake(_assign_scores_op)
def _(x, centroids):
    batch, n = _batch((x, 2), (centroids, 2)), x.shape[-2]
    return (x.new_empty(batch + (n,), dtype=torch.int64),
            x.new_empty(batch + (n, centroids.shape[-2])), x.new_empty(batch + (n,)))


def assign_clusters(x, centroids, *, return_scores=False):
    """labels (..., n) int64 [, scores (..., n, c), best (..., n)]; see
    `routing_attention.assign_clusters`."""
    (x, centroids), dtype = _decision_inputs(x=x, centroids=centroids)
    if not return_scores:
        return _assign_clusters_op(x, centroids)
    labels, scores, best = _assign_scores_op(x, centroids)
    return labels, scores.to(dtype), best.to(dtype)


@custom_op(f"{_NS}::assign_top_members", mutates_args=(),
           schema="(Tensor x, Tensor centroids, int w) -> (Tensor, Tensor, Tensor)")
def _assign_top_members_op(x, centroids, w):
    _use_threads()
    return tuple(_t(a) for a in _clustering.assign_top_members(_np(x), _np(centroids), w))


@_fake(_assign_top_members_op)
def _(x, centroids, w):
    batch, n = _batch((x, 2), (centroids, 2)), x.shape[-2]
    return (x.new_empty(batch + (n,), dtype=torch.int64), x.new_empty(batch + (n,)),
            x.new_empty(batch + (centroids.shape[-2], w), dtype=torch.int64))


def assign_top_members(x, centroids, w):
    """(labels (..., n), best (..., n), members (..., c, w)); see
    `routing_attention.assign_top_members`."""
    (x, centroids), dtype = _decision_inputs(x=x, centroids=centroids)
    labels, best, members = _assign_top_members_op(x, centroids, int(w))
    return labels, best.to(dtype), members


@custom_op(f"{_NS}::top_members", mutates_args=(), schema="(Tensor scores, int w) -> Tensor")
def _top_members_op(scores, w):
    _use_threads()
    return _t(_clustering.top_members(_np(scores), w))


@_fake(_top_members_op)
def _(scores, w):
    return scores.new_empty(scores.shape[:-2] + (scores.shape[-1], w), dtype=torch.int64)


def top_members(scores, w):
    """Balanced membership (..., c, w) int64; see `routing_attention.top_members`."""
    (scores,), _ = _decision_inputs(scores=scores)
    return _top_members_op(scores, int(w))


@custom_op(f"{_NS}::members_from_labels", mutates_args=(),
           schema="(Tensor labels, int n_clusters, int? max_size) -> Tensor")
def _members_from_labels_op(labels, n_clusters, max_size):
    _use_threads()
    return _t(_clustering.members_from_labels(_np(labels), n_clusters, max_size=max_size))


@_fake(_members_from_labels_op)
def _(labels, n_clusters, max_size):
    size = max_size if max_size is not None else torch.library.get_ctx().new_dynamic_size()
    return labels.new_empty(labels.shape[:-1] + (n_clusters, size), dtype=torch.int64)


def members_from_labels(labels, n_clusters, *, max_size=None):
    """Argmax membership lists (..., c, s) int64; see `routing_attention.members_from_labels`
    (without `max_size` the width depends on the data: under torch.compile it is a
    dynamic size)."""
    return _members_from_labels_op(_index("labels", labels), int(n_clusters),
                                   None if max_size is None else int(max_size))


@custom_op(f"{_NS}::update_centroids", mutates_args=(),
           schema="(Tensor centroids, Tensor x, Tensor labels, float decay, Tensor? mask)"
                  " -> Tensor")
def _update_centroids_op(centroids, x, labels, decay, mask):
    _use_threads()
    return _t(_clustering.update_centroids(_np(centroids), _np(x), _np(labels), decay=decay,
                                           mask=_np(mask)))


@_fake(_update_centroids_op)
def _(centroids, x, labels, decay, mask):
    rows = _batch((x, 2), (labels, 1), (mask, 1))
    extra = len(rows) - (centroids.dim() - 2)      # leftmost axes pooled into the mean
    rest = rows[extra:] if extra > 0 else rows
    return centroids.new_empty(tuple(torch.broadcast_shapes(centroids.shape[:-2], rest))
                               + tuple(centroids.shape[-2:]))


def update_centroids(centroids, x, labels, *, decay=0.999, mask=None):
    """One online EMA step of spherical k-means; see `routing_attention.update_centroids`."""
    (centroids, x), dtype = _decision_inputs(centroids=centroids, x=x)
    return _update_centroids_op(centroids, x, _index("labels", labels), float(decay),
                                _mask("mask", mask)).to(dtype)


@custom_op(f"{_NS}::lsh_hash", mutates_args=(), schema="(Tensor x, Tensor planes) -> Tensor")
def _lsh_hash_op(x, planes):
    _use_threads()
    return _t(_clustering.lsh_hash(_np(x), _np(planes)))


@_fake(_lsh_hash_op)
def _(x, planes):
    return x.new_empty(_batch((x, 2), (planes, 2)) + (x.shape[-2],), dtype=torch.int64)


def lsh_hash(x, planes):
    """Random-hyperplane codes (..., n) int64; see `routing_attention.lsh_hash`."""
    (x, planes), _ = _decision_inputs(x=x, planes=planes)
    return _lsh_hash_op(x, planes)


@custom_op(f"{_NS}::hamming_kmeans", mutates_args=(),
           schema="(Tensor codes, int n_clusters, int iters, int seed, Tensor? mask)"
                  " -> (Tensor, Tensor)")
def _hamming_kmeans_op(codes, n_clusters, iters, seed, mask):
    _use_threads()
    labels, centroids = _clustering.hamming_kmeans(_np(codes), n_clusters, iters=iters,
                                                   seed=seed, mask=_np(mask),
                                                   return_centroids=True)
    return _t(labels), _t(centroids)


@_fake(_hamming_kmeans_op)
def _(codes, n_clusters, iters, seed, mask):
    batch = _batch((codes, 1), (mask, 1))
    return (codes.new_empty(batch + (codes.shape[-1],), dtype=torch.int64),
            codes.new_empty(batch + (n_clusters,), dtype=torch.int64))


def hamming_kmeans(codes, n_clusters, *, iters=10, seed=0, mask=None, return_centroids=False):
    """Hamming k-means labels (..., n) int64 [, centroid codes (..., c)]; see
    `routing_attention.hamming_kmeans`."""
    labels, centroids = _hamming_kmeans_op(_index("codes", codes), int(n_clusters), int(iters),
                                           int(seed), _mask("mask", mask))
    return (labels, centroids) if return_centroids else labels


def commitment_loss(x, centroids, labels, *, mask=None):
    """The Routing Transformer's commitment loss per problem, mean over counted rows of
    ‖x_i − μ_label(i)‖², as a differentiable torch expression (gradient to x; the
    centroids are constants).  Rows labelled -1 or masked out are left out; a problem
    with no counted row gives 0.  x (..., n, d), centroids (..., c, d), labels (..., n)."""
    _check_tensors(x=x, centroids=centroids, labels=labels, mask=mask)
    labels = _index("labels", labels)
    batch = _batch((x, 2), (centroids, 2), (labels, 1), (mask, 1))
    cent = centroids.detach().to(x.dtype).expand(batch + tuple(centroids.shape[-2:]))
    lab = labels.expand(batch + (x.shape[-2],))
    mu = torch.gather(cent, -2, lab.clamp(min=0)[..., None].expand(lab.shape + (x.shape[-1],)))
    weight = (lab >= 0).to(x.dtype)
    if mask is not None:
        weight = weight * _mask("mask", mask).to(x.dtype)
    sq = ((x - mu) ** 2).sum(-1)
    sq = torch.where(weight > 0, sq, torch.zeros((), dtype=x.dtype))
    return (sq * weight).sum(-1) / weight.sum(-1).clamp(min=1)


# ------------------------------------------------------------------ layers
def _in_backward():
    """True while autograd runs a backward pass: a forward called now is a recomputation
    (torch.utils.checkpoint), which must repeat the original call's routing decisions
    and must not move the centroids again."""
    return torch._C._current_graph_task_id() != -1


def _may_be_recomputed():
    """True when a forward runs the way torch.utils.checkpoint runs it the first time:
    under saved-tensor hooks (non-reentrant) or with gradients off (reentrant)."""
    return (not torch.is_grad_enabled()
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)


def _fingerprint(*tensors):
    """A checksum of the tensors' values and shapes: a recomputed forward sees bit-identical
    inputs, so it finds its original call's decisions under this key."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(repr((tuple(t.shape), t.dtype)).encode())
        h.update(np.ascontiguousarray(_np(t)).view(np.uint8).data)
    return h.digest()


def _resize_before_load(module, name, state_dict, prefix):
    """Give a buffer whose shape is only known after the first call (centroids, planes)
    the shape of the state_dict's entry, so that load_state_dict fills it."""
    key = prefix + name
    if key in state_dict and state_dict[key].shape != getattr(module, name).shape:
        old = getattr(module, name)
        setattr(module, name, torch.empty_like(state_dict[key], device=old.device))


def _unit_rows(x):
    """Rows scaled to unit L2 norm, zero rows kept zero (differentiable).  Each row is first
    multiplied by the power of two that brings its largest |x| into [0.5, 1), held
    constant for the gradient: exact, so an ordinary row gets the same bits as without it,
    and a huge or tiny finite row's squares neither overflow nor underflow (as the C
    kernels' row normalisation).  A row with an inf or NaN is scaled by 1."""
    if x.shape[-1] == 0:
        return x
    with torch.no_grad():
        exponent = torch.frexp(x.abs().amax(dim=-1, keepdim=True)).exponent
        half = torch.div(-exponent, 2, rounding_mode="floor")      # two factors: 2**-e alone
        ones = torch.ones(exponent.shape, dtype=x.dtype)           # can overflow (subnormals)
        first, second = torch.ldexp(ones, half), torch.ldexp(ones, -exponent - half)
    y = x * first * second
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    return y / torch.where(norm > 0, norm, torch.ones((), dtype=x.dtype))


class RoutingAttention(torch.nn.Module):
    """Routing Transformer attention as a torch.nn.Module: online spherical k-means routing
    plus local heads.  Options and semantics are those of the NumPy
    `routing_attention.RoutingAttention` (see its docstring), on CPU tensors:

    ``layer(q, k, v, key_mask=None, query_mask=None)`` with q (..., heads, n, d), k (...,
    heads, m, d), v (..., heads, m, e) returns (..., heads, n, e).  The first
    `local_heads` heads run local attention, the others routing attention.

    - ``centroids`` is a buffer (routing heads, c, d): in ``state_dict``, moved by ``.to()``,
      fitted by spherical k-means on the first batch the layer sees in training mode.
      While ``self.training``, each forward moves it by one EMA step (`decay`) on that
      call's normalised queries and keys — never in ``eval()``, and never again when
      ``torch.utils.checkpoint`` recomputes the forward (the recomputation reuses the
      original call's memberships, so its gradients are exact).
    - ``commitment_loss``: after each call, a differentiable scalar tensor, mean over batch
      and routing heads of mean ‖x̂ − μ_label‖² over the normalised queries and keys (0
      without routing heads); add ``weight * layer.commitment_loss`` to the training loss.
    - ``q_idx``, ``k_idx``: the last call's member lists (integer tensors).
    - Every call is its own autograd node: a layer used several times in one graph gets
      exact gradients for each use.  Memberships are not differentiated.

    - ``dropout``: attention dropout probability, applied while ``self.training`` (each
      call draws its seed from torch's generator); ``rel_bias`` (..., heads, n + m - 1)
      passed to a call adds a relative position bias per head (see `relative_bias`).

    In eval mode a layer that was never trained fits its centroids on the first batch
    too, and leaves them fixed afterwards.  The routing decisions run eagerly: under
    ``torch.compile`` this layer causes graph breaks (the attention ops themselves do not).
    """

    _RECOMPUTE_CACHE = 32       # decisions kept for checkpoint recomputation, per layer

    def __init__(self, n_clusters=None, *, local_heads=0, window=None, shared_qk=False,
                 causal=False, membership="balanced", w=None, merge="mean", decay=0.999,
                 kmeans_iters=10, seed=0, scale=None, dropout=0.0):
        super().__init__()
        self.dropout = dropout_args(dropout, 0)[0]
        # the NumPy layer checks the options and makes the routing decisions
        self._router = _routing.RoutingAttention(
            n_clusters, local_heads=local_heads, window=window, shared_qk=shared_qk,
            causal=causal, membership=membership, w=w, merge=merge, decay=decay,
            kmeans_iters=kmeans_iters, seed=seed, scale=scale)
        self.register_buffer("centroids", torch.empty(0))
        self.commitment_loss = None
        self.q_idx = self.k_idx = None
        self._decisions = OrderedDict()

    def __getstate__(self):
        # copy.deepcopy and pickle: the last call's commitment_loss without its graph
        state = dict(self.__dict__)
        if isinstance(state.get("commitment_loss"), Tensor):
            state["commitment_loss"] = state["commitment_loss"].detach()
        return state

    def __getattr__(self, name):
        # options (local_heads, causal, merge, ...) are read from the NumPy router
        if name in ("n_clusters", "local_heads", "window", "shared_qk", "causal", "membership",
                    "w", "merge", "decay", "kmeans_iters", "seed", "scale"):
            return getattr(self._modules.get("_router") or self.__dict__["_router"], name)
        return super().__getattr__(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _resize_before_load(self, "centroids", state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        r = self._router
        return (f"n_clusters={r.n_clusters}, local_heads={r.local_heads}, window={r.window}, "
                f"shared_qk={r.shared_qk}, causal={r.causal}, membership={r.membership!r}, "
                f"merge={r.merge!r}, decay={r.decay}, dropout={self.dropout}")

    # -- routing decisions (no gradient) ------------------------------------------
    @torch.compiler.disable     # NumPy work: a graph break under torch.compile
    def _route(self, q, k, kmask, qmask):
        """Member lists, the centroids they were made with and the queries routed nowhere
        because their scores are NaN (a non-finite query row), for the routing heads q
        (..., h, n, d), k (..., h, m, d) (k is None for shared-QK).  Moves the centroid
        buffer when training; a recomputation finds its original call's result."""
        recompute = _in_backward()
        key = None
        if self.training and (recompute or _may_be_recomputed()):
            key = _fingerprint(*(t for t in (q, k, kmask, qmask) if t is not None))
        if recompute and key in self._decisions:
            # the calls with these inputs not recomputed yet (else the recomputed ones: a
            # second backward through a retained graph); more than one is ambiguous
            found = self._decisions[key]
            fresh = [entry for entry in found if not entry[1]] or found
            if len(fresh) > 1:
                raise RuntimeError(
                    "RoutingAttention: a forward recomputed during backward (e.g. "
                    f"torch.utils.checkpoint) has the inputs of {len(fresh)} training calls "
                    "that routed differently (the centroids moved between them); which one "
                    "it repeats cannot be told, so its gradients could be wrong. Give the "
                    "calls different inputs, or do not checkpoint a layer called twice on "
                    "the same inputs")
            fresh[0][1] = True
            return fresh[0][0]
        if recompute and self.training:
            raise RuntimeError("RoutingAttention: a forward recomputed during backward (e.g. "
                               "torch.utils.checkpoint) does not match any of the layer's last "
                               f"{self._RECOMPUTE_CACHE} training calls; its routing decisions "
                               "cannot be reproduced, so its gradients would be wrong")
        r = self._router
        qn = _np(q)
        if r.shared_qk:
            qhat, _, qsq = _routing._normalize(qn)
            args = (qn, qn, _np(kmask), _np(qmask), qhat, qsq)
        else:
            args = (qn, _np(k), _np(kmask), _np(qmask))
        r.centroids = (_np(self.centroids).astype(qn.dtype) if self.centroids.numel()
                       else None)
        if r.centroids is None:         # first call: k-means on this batch, no update yet
            r.training = False
            r._route(*args)
        used = torch.from_numpy(r.centroids.copy())
        r.training = self.training
        q_idx, k_idx, lost = r._route(*args)
        if self.training or not self.centroids.numel():
            moved = torch.from_numpy(np.ascontiguousarray(r.centroids))
            if (moved.shape == self.centroids.shape     # in place, as BatchNorm's statistics
                    and not self.centroids.is_inference()):
                self.centroids.copy_(moved)             # (functional_call's tensor moves too)
            else:           # the first fit, or centroids made under torch.inference_mode
                self.centroids = moved.to(self.centroids.device)
        decision = (_t(q_idx), _t(k_idx), used, _t(lost))
        if key is not None:     # [decision, recomputed] of every pending call with these inputs
            found = [entry for entry in self._decisions.get(key, []) if not entry[1]]
            if not any(all(torch.equal(a, b) for a, b in zip(decision, old)) for old, _ in found):
                found.append([decision, False])
            self._decisions[key] = found
            self._decisions.move_to_end(key)
            while len(self._decisions) > self._RECOMPUTE_CACHE:
                self._decisions.popitem(last=False)
        return decision

    # -- forward ----------------------------------------------------------------
    def forward(self, q, k, v, key_mask=None, query_mask=None, rel_bias=None):
        """Attention output (..., heads, n, e); see the class docstring."""
        (q, k, v), dtype = _floats(q=q, k=k, v=v)
        for name, t in (("q", q), ("k", k), ("v", v)):
            rank_at_least(name, t.shape, ("heads", "sequence", "feature"))
        r = self._router
        qkv_shapes(q.shape, q.shape if r.shared_qk else k.shape, v.shape)
        heads = torch.broadcast_shapes(*((t.shape[-3],) for t in (q, k, v)))[0]
        if rel_bias is not None:
            _check_tensors(rel_bias=rel_bias)
            rank_at_least("rel_bias", rel_bias.shape, ("heads", "offset"))
            rel_bias = rel_bias.expand(rel_bias.shape[:-2] + (heads, rel_bias.shape[-1]))
        q, k, v = (t.expand(t.shape[:-3] + (heads,) + t.shape[-2:]) for t in (q, k, v))
        L = r.local_heads
        routing_heads(heads, L, self.centroids.shape[0] if self.centroids.numel() else None)
        n, m = q.shape[-2], (q if r.shared_qk else k).shape[-2]
        kmask = _mask("key_mask", key_mask)
        qmask = _mask("query_mask", query_mask)
        batch = tuple(q.shape[:-3])
        kmask_h = None if kmask is None else torch.from_numpy(
            r._layer_mask("key_mask", _np(kmask), m, batch))
        qmask_h = None if qmask is None else torch.from_numpy(
            r._layer_mask("query_mask", _np(qmask), n, batch))
        katt = _unit_rows(q) if r.shared_qk else k        # shared-QK attends to unit keys
        kw = dict(causal=r.causal, scale=r.scale, exclude_self=r.shared_qk,
                  dropout_p=self.dropout if self.training else 0.0)

        def heads_of(lo, hi):
            return {} if rel_bias is None else dict(rel_bias=rel_bias[..., lo:hi, :])
        parts = []
        if L:
            c = r.n_clusters or max(1, int(round(math.sqrt(n))))
            lq, lk = _routing.local_members(n, m, r.window or max(1, n // c), r.causal)
            lq = _routing._mask_members(lq, _np(qmask_h))
            lk = _routing._mask_members(lk, _np(kmask_h))
            parts.append(routing_attention(q[..., :L, :, :], katt[..., :L, :, :],
                                           v[..., :L, :, :], _t(lq), _t(lk), **kw,
                                           **heads_of(0, L)))
        self.commitment_loss = q.new_zeros(())
        if L < heads:
            if not r.shared_qk:
                same_leading_axes(q.shape, k.shape)
            qr, kr = q[..., L:, :, :], (None if r.shared_qk else k[..., L:, :, :])
            q_idx, k_idx, used, lost = self._route(qr, kr, kmask_h, qmask_h)  # no gradient
            self.q_idx, self.k_idx = q_idx, k_idx
            routed = routing_attention(qr, katt[..., L:, :, :], v[..., L:, :, :], q_idx, k_idx,
                                       merge=r.merge, **kw, **heads_of(L, heads))
            if qmask_h is not None:         # a padded query keeps its 0
                lost = lost & qmask_h
            # NaN locality, as in the NumPy layer: a non-finite query row joins no cluster,
            # and its output row is NaN as in dense attention
            parts.append(torch.where(lost[..., None], torch.nan, routed))
            self.commitment_loss = self._commitment(qr, kr, used, kmask_h, qmask_h)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-3)
        return out.to(dtype)

    def _commitment(self, q, k, centroids, kmask, qmask):
        """Mean over batch and heads of mean ‖x̂ − μ_label‖² over the normalised queries and
        keys (padding left out), differentiable in q and k."""
        rows = [(q, qmask)] if k is None else [(q, qmask), (k, kmask)]
        xs = torch.cat([_unit_rows(x) for x, _ in rows], dim=-2)
        masks = None
        if kmask is not None or qmask is not None:
            masks = torch.cat([torch.ones(x.shape[:-1], dtype=torch.bool) if mk is None else
                               mk.expand(x.shape[:-1]) for x, mk in rows], dim=-1)
        cent = centroids.to(xs.dtype)
        labels = assign_clusters(xs, cent)
        return commitment_loss(xs, cent, labels, mask=masks).mean()


class ClusteredAttention(torch.nn.Module):
    """Clustered (or, with `topk`, improved clustered) attention with its own query
    clustering, as a torch.nn.Module; options as in the NumPy
    `routing_attention.ClusteredAttention`.  ``layer(q, k, v, key_mask=None,
    query_mask=None)``: queries are hashed with random hyperplanes (the ``planes`` buffer,
    (bits, d + 1), drawn from `seed` on the first call exactly as the NumPy layer draws
    them), grouped by Hamming k-means into min(n_clusters, n) clusters, and attend once
    per cluster.  The clustering is not differentiated; ``labels`` holds the last call's.
    ``torch.compile(layer, fullgraph=True)`` needs the planes to exist: make one eager
    call first (or load a state_dict), since drawing them is NumPy work Dynamo cannot
    trace.
    """

    def __init__(self, n_clusters=100, *, bits=32, iterations=10, topk=None, seed=0, scale=None,
                 dropout=0.0):
        super().__init__()
        self.dropout = dropout_args(dropout, 0)[0]     # applied while training
        self._options = _clustered.ClusteredAttention(n_clusters, bits=bits, iterations=iterations,
                                                      topk=topk, seed=seed, scale=scale)
        self.register_buffer("planes", torch.empty(0))
        self.labels = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _resize_before_load(self, "planes", state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        o = self._options
        return (f"n_clusters={o.n_clusters}, bits={o.bits}, iterations={o.iterations}, "
                f"topk={o.topk}, seed={o.seed}, dropout={self.dropout}")

    @torch.compiler.disable     # NumPy work: a graph break under torch.compile
    def _draw_planes(self, d):
        self.planes = torch.from_numpy(self._options._planes(d).copy()).to(self.planes.device)

    def forward(self, q, k, v, key_mask=None, query_mask=None, rel_bias=None):
        """Attention output (..., n, e); rel_bias (improved form only): see
        `improved_clustered_attention`."""
        o = self._options
        (q, k, v), dtype = _floats(q=q, k=k, v=v)
        d = q.shape[-1]
        if self.planes.shape != (o.bits, d + 1):
            self._draw_planes(d)
        codes = lsh_hash(q, self.planes.to(q.dtype))
        C = min(o.n_clusters, q.shape[-2])
        if query_mask is not None:      # as the NumPy layer: (..., n), not enlarging q's batch
            query_mask = _mask("query_mask", query_mask)
            mask_length("query_mask", query_mask.shape, q.shape[-2], "queries")
            mask_fits("query_mask", query_mask, q.shape[:-2])
        labels = hamming_kmeans(codes, C, iters=o.iterations, seed=o.seed, mask=query_mask)
        self.labels = labels
        kw = dict(key_mask=key_mask, scale=o.scale,
                  dropout_p=self.dropout if self.training else 0.0)
        if o.topk is None:
            no_bias_without_topk(rel_bias)
            return clustered_attention(q, k, v, labels, C, **kw).to(dtype)
        return improved_clustered_attention(q, k, v, labels, C, o.topk, rel_bias=rel_bias,
                                            **kw).to(dtype)


class CombinerAttention(torch.nn.Module):
    """Combiner attention as a torch.nn.Module: ``layer(q, k, v, rel_bias=None)`` is
    `combiner_attention` with the layer's plan, block, causal and scale, and attention
    dropout `dropout` while ``training``.  Unlike the other two layers it takes no
    key_mask or query_mask (neither does `combiner_attention`: its region summaries pool
    whole regions); with ``causal=True``, padding at the end of a sequence is never seen
    by the real queries before it."""

    def __init__(self, plan="fixed", *, block=None, causal=False, scale=None, dropout=0.0):
        super().__init__()
        one_of("plan", plan, _combiner.PLANS)
        self.plan, self.block, self.causal, self.scale = plan, block, bool(causal), scale
        self.dropout = dropout_args(dropout, 0)[0]

    def extra_repr(self):
        return (f"plan={self.plan!r}, block={self.block}, causal={self.causal}, "
                f"scale={self.scale}, dropout={self.dropout}")

    def forward(self, q, k, v, rel_bias=None):
        """Attention output (..., n, e)."""
        return combiner_attention(q, k, v, plan=self.plan, block=self.block, causal=self.causal,
                                  scale=self.scale, rel_bias=rel_bias,
                                  dropout_p=self.dropout if self.training else 0.0)


# ------------------------------------------------------------------ decoding
class DecodingCache:
    """A `routing_attention.decoding` cache for tensors (generation: no autograd).

    Build one with `DenseCache`, `LocalCache`, `CombinerCache` or `RoutingCache`;
    ``cache.step(q, k, v, active=None)`` appends one token per sequence ((..., 1, d)
    tensors) and returns its output rows (..., 1, e); ``prefill(q, k, v)`` feeds a prompt.
    """

    def __init__(self, cache):
        self.cache = cache

    def _call(self, method, q, k, v, **kw):
        (q, k, v), dtype = _floats(q=q, k=k, v=v)
        return torch.from_numpy(method(_np(q), _np(k), _np(v), **kw)).to(dtype)

    def step(self, q, k, v, *, active=None):
        if active is not None:
            _check_tensors(active=active)
            active = _np(active)
        return self._call(self.cache.step, q, k, v, active=active)

    def prefill(self, q, k, v):
        return self._call(self.cache.prefill, q, k, v)

    @property
    def lengths(self):
        return torch.from_numpy(self.cache.lengths.copy())


def DenseCache(*, scale=None):
    """Causal dense attention, one token at a time (see routing_attention.decoding)."""
    return DecodingCache(_decoding.DenseCache(scale=scale))


def LocalCache(window, *, scale=None):
    """Causal local attention, one token at a time."""
    return DecodingCache(_decoding.LocalCache(window, scale=scale))


def CombinerCache(plan, *, block=None, scale=None):
    """Causal Combiner attention, one token at a time (block required but for logsparse)."""
    return DecodingCache(_decoding.CombinerCache(plan, block=block, scale=scale))


def RoutingCache(layer):
    """Causal decoding of a torch `RoutingAttention` layer (membership="argmax",
    causal=True) with its current centroids, which the cache does not move."""
    router = layer._router
    router.centroids = _np(layer.centroids).copy() if layer.centroids.numel() else None
    return DecodingCache(_decoding.RoutingCache(router))
