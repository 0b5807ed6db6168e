"""JAX bridge: the attention methods as `jax.custom_vjp` functions over the C kernels.

Install with ``pip install "routing_attention[jax]"`` (CPU JAX); ``import routing_attention``
never imports JAX, only ``import routing_attention.jax`` does.

Every attention method (`attention`, `local_attention`, `routing_attention`,
`clustered_attention`, `improved_clustered_attention`, `combiner_attention`) takes JAX
arrays and works under `jax.jit`, `jax.grad` and `jax.vmap`.  Its forward runs the NumPy
function (the single source of truth) in a host callback and keeps the statistics it
returns with ``return_saved=True``; its backward hands them to the NumPy ``X_backward``
with the same keywords.  Leading axes broadcast as in NumPy, also across a `vmap` axis.
Array arguments are q, k, v (differentiable), and index, label and mask arrays (not
differentiable: their cotangent is a float0 zero).  Every other keyword (``causal``,
``scale``, ``plan``, ``window``, ``n_clusters``, ...) is static: a Python value fixed when
the function is traced, never a traced array.  Shapes and keywords are checked when
tracing, by the NumPy function itself on an empty batch; index and label values are
checked when the callback runs (JAX then raises a JaxRuntimeError carrying the NumPy
API's message, which names the argument).

The routing decisions (`spherical_kmeans`, `assign_clusters`, `assign_top_members`,
`top_members`, `members_from_labels`, `update_centroids`, `lsh_hash`, `hamming_kmeans`)
are host callbacks too, and not differentiated: their float inputs pass through
`jax.lax.stop_gradient`, so a gradient never flows through a routing decision.
`members_from_labels` needs ``max_size``: a JAX output shape must be known when tracing.

Dtypes: float32 and float64 are computed in their own precision; bfloat16 and float16 are
computed in float32 and returned in their own dtype; integers compute in JAX's default
float.  Without ``jax_enable_x64`` JAX has no 64-bit integers: labels, member lists and
codes come back as int32 (positions fit; `lsh_hash` then refuses more than 31 bits).

The callbacks are `jax.experimental.buffer_callback`s: the NumPy code reads XLA's input
buffers in place and its results are copied into XLA's output buffers.  That costs
0.04-0.05 ms per call at n=64, where `jax.pure_callback` (which copies every input and
output through new JAX arrays) costs 0.2-0.3 ms, and it needs no compiled glue, unlike XLA
FFI handlers, which would also have to repeat the NumPy wrappers' validation and
broadcasting in C++ (figures: benchmarks/RESULTS_jax.md).
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback as _buffer_callback

from . import clustered as _clustered
from . import clustering as _clustering
from . import combiner as _combiner
from . import dense as _dense
from . import routing as _routing
from ._checks import batch_shape, check_by_empty_call, integer, min_dims

__all__ = ["attention", "local_attention", "routing_attention", "clustered_attention",
           "improved_clustered_attention", "combiner_attention",
           "spherical_kmeans", "assign_clusters", "assign_top_members", "top_members",
           "members_from_labels", "update_centroids", "lsh_hash", "hamming_kmeans"]


# ------------------------------------------------------------------ dtypes and shapes
def _float_dtypes(*arrays):
    """(compute dtype, result dtype) of float inputs: float32/float64 compute as themselves;
    bfloat16/float16 compute in float32 and are returned as their own dtype; integers
    and bools compute and return in JAX's default float."""
    result = jnp.result_type(*arrays)
    if not jnp.issubdtype(result, jnp.floating):
        result = jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
    compute = jnp.dtype(jnp.float32) if result.itemsize <= 4 else jnp.dtype(jnp.float64)
    return compute, result


def _int_dtype():
    """int64 with ``jax_enable_x64``, else int32 (the widest JAX then holds)."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(np.int64))


def _floats(arrays, compute):
    return [None if a is None else jnp.asarray(a).astype(compute) for a in arrays]


def _aligned(arrays, cores):
    """Arrays (None skipped) reshaped to one number of batch axes by prepending 1s, so that
    the axis `vmap` puts in front lines up across them, and the broadcast batch shape."""
    arrays = {name: jnp.asarray(a) for name, a in arrays.items() if a is not None}
    for name, a in arrays.items():
        min_dims(name, a.shape, cores[name])
    batch = batch_shape(**{name: (a, cores[name]) for name, a in arrays.items()})
    return {name: a.reshape((1,) * (len(batch) + cores[name] - a.ndim) + a.shape)
            for name, a in arrays.items()}, batch


def _callback(fn, specs, arrays, vmap_method="expand_dims", out_first=False):
    """``fn(**arrays)`` on the host, its results (a tuple) written into XLA's output
    buffers of `specs` (cast to their dtypes).  A `buffer_callback` hands the callback
    XLA's own buffers: the inputs are read in place, not copied as `pure_callback` would.
    With `out_first`, fn also gets ``out=`` the first output buffer to write into."""
    names = tuple(arrays)

    def host(_, outs, *values):
        outs = [np.asarray(out) for out in outs]
        kwargs = {name: np.asarray(x) for name, x in zip(names, values)}
        results = fn(**kwargs, out=outs[0]) if out_first else fn(**kwargs)
        for out, result in zip(outs, results):
            if result is not out:
                np.copyto(out, result, casting="same_kind")

    return _buffer_callback(host, tuple(specs), vmap_method=vmap_method)(*arrays.values())


# ------------------------------------------------------------------ attention methods
# Each method: the NumPy forward returning (out, saved), the NumPy backward given saved,
# the array arguments that are not differentiated (with their core ranks), and the core
# shapes and dtypes of the saved statistics kept between forward and backward ("output"
# is the forward's result itself and is not stored twice).

def _saved_without_keywords(result):
    out, saved = result
    return out, {key: val for key, val in saved.items() if key != "keywords"}


def _attention_forward(q, k, v, key_mask=None, **kw):
    return _saved_without_keywords(_dense.attention(q, k, v, key_mask=key_mask,
                                                    return_saved=True, **kw))


def _routing_forward(q, k, v, q_idx, k_idx, **kw):
    return _saved_without_keywords(_routing.routing_attention(q, k, v, q_idx, k_idx,
                                                              return_saved=True, **kw))


def _routing_saved(q, k, v, aux, kw):
    (n, e), (c, w) = (q.shape[-2], v.shape[-1]), aux["q_idx"].shape[-2:]
    f = q.dtype
    return dict(output=((n, e), f), lse=((n,), f), slot_output=((c, w, e), f),
                slot_lse=((c, w), f), slot_self=((c, w), np.bool_))


def _clustered_forward(q, k, v, labels, key_mask=None, **kw):
    fn = _clustered.clustered_attention if "topk" not in kw else \
        _clustered.improved_clustered_attention
    return _saved_without_keywords(fn(q, k, v, labels, key_mask=key_mask, return_saved=True, **kw))


def _clustered_backward(dout, q, k, v, labels, key_mask=None, **kw):
    fn = _clustered.clustered_attention_backward if "topk" not in kw else \
        _clustered.improved_clustered_attention_backward
    return fn(dout, q, k, v, labels, key_mask=key_mask, **kw)


def _clustered_saved(q, k, v, aux, kw):
    kmax = min(kw.get("topk", 0), k.shape[-2])
    shapes = _clustered._saved_shapes(kw["n_clusters"], kmax, v.shape[-1])
    return {key: (core, np.int64 if key == "topk_index" else q.dtype)
            for key, core in shapes.items()}


def _combiner_forward(q, k, v, **kw):
    return _saved_without_keywords(_combiner.combiner_attention(q, k, v, return_saved=True, **kw))


def _output_and_lse(q, k, v, aux, kw):
    n, e = q.shape[-2], v.shape[-1]
    return dict(output=((n, e), q.dtype), lse=((n,), q.dtype))


class _Method(NamedTuple):
    forward: Callable       # (q, k, v, **aux, **keywords, out=) -> (out, saved without keywords)
    backward: Callable      # (dout, q, k, v, **aux, **keywords, **saved) -> dq, dk, dv
    aux_cores: dict         # non-differentiated array arguments: name -> core rank
    saved: Callable         # (q, k, v, aux, keywords) -> {key: (core shape, NumPy dtype)}


_METHODS = {
    "attention": _Method(_attention_forward, _dense.attention_backward, dict(key_mask=1),
                         _output_and_lse),
    "routing": _Method(_routing_forward, _routing.routing_attention_backward,
                       dict(q_idx=2, k_idx=2), _routing_saved),
    "clustered": _Method(_clustered_forward, _clustered_backward, dict(labels=1, key_mask=1),
                         _clustered_saved),
    "combiner": _Method(_combiner_forward, _combiner.combiner_attention_backward, {},
                        _output_and_lse),
}
_QKV_CORES = dict(q=2, k=2, v=2)


def _jax_dtype(dtype):
    return _int_dtype() if np.dtype(dtype).kind in "iu" else np.dtype(dtype)


def _saved_specs(name, qkv, aux, kw, batch):
    """{key: ShapeDtypeStruct} of the statistics the forward keeps (without "output")."""
    saved = _METHODS[name].saved(*qkv, aux, kw)
    return {key: jax.ShapeDtypeStruct(batch + core, _jax_dtype(dtype))
            for key, (core, dtype) in saved.items() if key != "output"}


def _forward_call(name, kw_items, qkv, aux, with_saved):
    """(out, saved) of the NumPy forward in a host callback; saved is empty unless
    `with_saved` (statistics nobody differentiates are not copied into XLA buffers)."""
    method, kw = _METHODS[name], dict(kw_items)
    q, k, v = qkv
    arrays = dict(zip("qkv", qkv), **aux)
    cores = dict(_QKV_CORES, **method.aux_cores)
    batch = batch_shape(**{key: (a, cores[key]) for key, a in arrays.items()})
    saved = _saved_specs(name, qkv, aux, kw, batch) if with_saved else {}
    out_spec = jax.ShapeDtypeStruct(batch + (q.shape[-2], v.shape[-1]), q.dtype)

    def host(q, out=None, **values):
        if "key_mask" in values:
            # the NumPy API refuses a key_mask that adds batch axes to q, k and v (checked
            # when tracing); under vmap a mapped mask does: q gets them, as a view
            full = batch_shape(q=(q, 2), **{key: (a, cores[key]) for key, a in values.items()})
            q = np.broadcast_to(q, full + q.shape[-2:])
        out, stats = method.forward(q=q, out=out, **values, **kw)
        unknown = set(stats) - set(saved) - {"output"}
        if saved and unknown:
            raise RuntimeError(f"routing_attention.jax does not keep the saved statistics "
                               f"{sorted(unknown)} of {name}: update its saved shapes")
        return (out,) + tuple(stats[key] for key in saved)

    results = _callback(host, (out_spec,) + tuple(saved.values()), arrays, out_first=True)
    return results[0], dict(zip(saved, results[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(name, kw_items, qkv, aux):
    """The custom-vjp core: method `name` with static keywords `kw_items` (sorted items),
    differentiable (q, k, v) and non-differentiable `aux` arrays (dict), all with one
    number of batch axes."""
    return _forward_call(name, kw_items, qkv, aux, with_saved=False)[0]


def _attend_fwd(name, kw_items, qkv, aux):
    out, saved = _forward_call(name, kw_items, qkv, aux, with_saved=True)
    return out, (qkv, aux, out, saved)


def _attend_bwd(name, kw_items, residuals, dout):
    qkv, aux, out, saved = residuals
    method, kw = _METHODS[name], dict(kw_items)
    np_dtypes = {key: dtype for key, (_, dtype) in method.saved(*qkv, aux, kw).items()}
    keys = tuple(saved) + (("output",) if "output" in np_dtypes else ())
    stats = dict(saved, output=out)
    arrays = dict(dict(zip("qkv", qkv), **aux), dout=dout,
                  **{f"saved_{key}": stats[key] for key in keys})

    def host(dout, q, k, v, **rest):
        given = {key: np.asarray(rest.pop(f"saved_{key}"), np_dtypes[key]) for key in keys}
        return method.backward(dout, q, k, v, **rest, **kw, **given)

    # broadcast_all under vmap: each gradient then has the vmapped axis, as JAX expects
    grads = _callback(host, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in qkv),
                      arrays, vmap_method="broadcast_all")
    zeros = {key: np.zeros(a.shape, jax.dtypes.float0) for key, a in aux.items()}
    return grads, zeros


_attend.defvjp(_attend_fwd, _attend_bwd)


def _attention_call(name, q, k, v, aux, **kw):
    """Cast, align the batch axes, check, run the custom-vjp core, cast the result back."""
    method = _METHODS[name]
    compute, result = _float_dtypes(q, k, v)
    aux = {key: a for key, a in aux.items() if a is not None}
    cores = dict(_QKV_CORES, **method.aux_cores)
    arrays, _ = _aligned(dict(zip("qkv", _floats((q, k, v), compute)), **aux), cores)
    # the NumPy forward on empty arrays of the shapes given checks the shapes, batch axes
    # and every keyword now, when tracing, with the NumPy API's own messages
    # (microseconds: no work is done)
    given = dict(zip("qkv", (q, k, v)), **aux)
    check_by_empty_call(method.forward, {key: jax.ShapeDtypeStruct(jnp.shape(a), arrays[key].dtype)
                                         for key, a in given.items()}, cores, **kw)
    qkv = tuple(arrays.pop(key) for key in "qkv")
    out = _attend(name, tuple(sorted(kw.items())), qkv, arrays)
    return out.astype(result)


def attention(q, k, v, *, causal=False, key_mask=None, scale=None):
    """Dense softmax attention (see `routing_attention.attention`); key_mask (..., m) bool
    is an array argument, causal and scale are static."""
    return _attention_call("attention", q, k, v, dict(key_mask=key_mask), causal=causal,
                           scale=scale)


def routing_attention(q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False, merge="mean",
                      scale=None):
    """Attention inside clusters given by membership lists q_idx (..., c, w) and k_idx
    (..., c, u) (see `routing_attention.routing_attention`); the lists are array
    arguments, the keywords static."""
    return _attention_call("routing", q, k, v, dict(q_idx=q_idx, k_idx=k_idx), causal=causal,
                           exclude_self=exclude_self, merge=merge, scale=scale)


def local_attention(q, k, v, window, *, causal=False, scale=None):
    """Blocked local attention (see `routing_attention.local_attention`): routing attention
    over the local membership lists, as the NumPy function runs it; window is static."""
    q_idx, k_idx = _routing.local_members(jnp.shape(q)[-2], jnp.shape(k)[-2], window, causal)
    return routing_attention(q, k, v, q_idx, k_idx, causal=causal, scale=scale)


def clustered_attention(q, k, v, labels, n_clusters, *, key_mask=None, scale=None):
    """Clustered attention (see `routing_attention.clustered_attention`); labels (..., n)
    and key_mask are array arguments, n_clusters and scale static."""
    return _attention_call("clustered", q, k, v, dict(labels=labels, key_mask=key_mask),
                           n_clusters=integer("n_clusters", n_clusters, 1), scale=scale)


def improved_clustered_attention(q, k, v, labels, n_clusters, topk, *, key_mask=None,
                                 scale=None):
    """Improved clustered attention (see `routing_attention.improved_clustered_attention`):
    its gradient holds m̂_c (and the choice of top-k keys) constant, as the paper does."""
    return _attention_call("clustered", q, k, v, dict(labels=labels, key_mask=key_mask),
                           n_clusters=integer("n_clusters", n_clusters, 1),
                           topk=integer("topk", topk, 1), scale=scale)


def combiner_attention(q, k, v, *, plan="fixed", block=None, causal=False, scale=None):
    """Combiner attention (see `routing_attention.combiner_attention`); every keyword is
    static."""
    return _attention_call("combiner", q, k, v, {}, plan=plan, block=block, causal=causal,
                           scale=scale)


# ------------------------------------------------------------------ routing decisions
def _decision(fn, specs, arrays, cores, vmap_method="expand_dims"):
    """A routing decision on the host: float inputs pass through stop_gradient (no gradient
    flows through a decision), batch axes are aligned for vmap."""
    arrays = {key: None if a is None else jax.lax.stop_gradient(jnp.asarray(a))
              for key, a in arrays.items()}
    if vmap_method != "sequential":
        arrays, _ = _aligned(arrays, cores)
    else:
        arrays = {key: a for key, a in arrays.items() if a is not None}

    def host(**values):
        result = fn(**values)
        return result if isinstance(result, tuple) else (result,)

    results = _callback(host, specs, arrays, vmap_method=vmap_method)
    return results if len(results) > 1 else results[0]


def _batch(**arrays_and_cores):
    return batch_shape(**{key: (jnp.asarray(a), core)
                          for key, (a, core) in arrays_and_cores.items() if a is not None})


def spherical_kmeans(x, n_clusters, *, iters=10, seed=0, mask=None, init=None):
    """Unit-norm centroids (..., c, d) by spherical k-means (see
    `routing_attention.spherical_kmeans`); x, mask and init are arrays, the rest static."""
    compute, result = _float_dtypes(x) if init is None else _float_dtypes(x, init)
    x, init = _floats((x, init), compute)
    c = integer("n_clusters", n_clusters, 1, x.shape[-2])
    batch = _batch(x=(x, 2), mask=(mask, 1), init=(init, 2))
    spec = jax.ShapeDtypeStruct(batch + (c, x.shape[-1]), compute)
    fn = functools.partial(_clustering.spherical_kmeans, n_clusters=c, iters=iters, seed=seed)
    return _decision(fn, (spec,), dict(x=x, mask=mask, init=init),
                     dict(x=2, mask=1, init=2)).astype(result)


def assign_clusters(x, centroids, *, return_scores=False):
    """labels (..., n): the most similar centroid of each row (see
    `routing_attention.assign_clusters`); with return_scores also the scores (..., n, c)
    and each row's best score (..., n)."""
    compute, result = _float_dtypes(x, centroids)
    x, centroids = _floats((x, centroids), compute)
    batch = _batch(x=(x, 2), centroids=(centroids, 2))
    n, c = x.shape[-2], centroids.shape[-2]
    specs = (jax.ShapeDtypeStruct(batch + (n,), _int_dtype()),)
    if return_scores:
        specs += (jax.ShapeDtypeStruct(batch + (n, c), compute),
                  jax.ShapeDtypeStruct(batch + (n,), compute))
    fn = functools.partial(_clustering.assign_clusters, return_scores=bool(return_scores))
    results = _decision(fn, specs, dict(x=x, centroids=centroids), dict(x=2, centroids=2))
    if not return_scores:
        return results
    return results[0], results[1].astype(result), results[2].astype(result)


def assign_top_members(x, centroids, w):
    """(labels (..., n), best (..., n), members (..., c, w)) from one product (see
    `routing_attention.assign_top_members`); w is static."""
    compute, result = _float_dtypes(x, centroids)
    x, centroids = _floats((x, centroids), compute)
    batch = _batch(x=(x, 2), centroids=(centroids, 2))
    n, c = x.shape[-2], centroids.shape[-2]
    w = integer("w", w, 1, n)
    specs = (jax.ShapeDtypeStruct(batch + (n,), _int_dtype()),
             jax.ShapeDtypeStruct(batch + (n,), compute),
             jax.ShapeDtypeStruct(batch + (c, w), _int_dtype()))
    fn = functools.partial(_clustering.assign_top_members, w=w)
    labels, best, members = _decision(fn, specs, dict(x=x, centroids=centroids),
                                      dict(x=2, centroids=2))
    return labels, best.astype(result), members


def top_members(scores, w):
    """Balanced membership (..., c, w): each cluster's w best rows of scores (..., n, c)
    (see `routing_attention.top_members`); w is static."""
    compute, _ = _float_dtypes(scores)
    (scores,) = _floats((scores,), compute)
    n, c = scores.shape[-2:]
    spec = jax.ShapeDtypeStruct(scores.shape[:-2] + (c, integer("w", w, 1, n)), _int_dtype())
    return _decision(functools.partial(_clustering.top_members, w=w), (spec,),
                     dict(scores=scores), dict(scores=2))


def members_from_labels(labels, n_clusters, *, max_size):
    """Argmax membership lists (..., c, max_size) padded with -1 (see
    `routing_attention.members_from_labels`).  `max_size` is required here: the NumPy
    default (the largest cluster) depends on the values, and a JAX shape may not."""
    if max_size is None:
        raise TypeError("members_from_labels needs max_size in routing_attention.jax: the "
                        "shape of a JAX result must be known when tracing")
    labels = jnp.asarray(labels)
    c = integer("n_clusters", n_clusters, 1)
    spec = jax.ShapeDtypeStruct(labels.shape[:-1] + (c, integer("max_size", max_size, 0)),
                                _int_dtype())
    fn = functools.partial(_clustering.members_from_labels, n_clusters=c, max_size=max_size)
    return _decision(fn, (spec,), dict(labels=labels), dict(labels=1))


def update_centroids(centroids, x, labels, *, decay=0.999, mask=None):
    """One online EMA step of spherical k-means (see `routing_attention.update_centroids`);
    extra leading axes of x/labels/mask are pooled into the mean, as in NumPy (so under
    `vmap` the callback runs once per mapped element)."""
    compute, result = _float_dtypes(centroids, x)
    centroids, x = _floats((centroids, x), compute)
    xb = _batch(x=(x, 2), labels=(labels, 1), mask=(mask, 1))
    rest = xb[max(0, len(xb) - (centroids.ndim - 2)):]
    batch = batch_shape(centroids=(centroids, 2), x=(jax.ShapeDtypeStruct(rest + x.shape[-2:],
                                                                           compute), 2))
    spec = jax.ShapeDtypeStruct(batch + centroids.shape[-2:], compute)
    fn = functools.partial(_clustering.update_centroids, decay=decay)
    return _decision(fn, (spec,), dict(centroids=centroids, x=x, labels=labels, mask=mask),
                     None, vmap_method="sequential").astype(result)


def lsh_hash(x, planes):
    """Random-hyperplane codes (..., n) (see `routing_attention.lsh_hash`).  Without
    ``jax_enable_x64`` codes are int32, so planes may have at most 31 rows."""
    compute, _ = _float_dtypes(x, planes)
    x, planes = _floats((x, planes), compute)
    bits = planes.shape[-2] if planes.ndim >= 2 else 0
    if _int_dtype().itemsize < 8 and bits > 31:
        raise ValueError(f"planes has {bits} rows (bits), but without jax_enable_x64 codes "
                         "are int32 and hold at most 31 bits; enable x64 or use fewer bits")
    batch = _batch(x=(x, 2), planes=(planes, 2))
    spec = jax.ShapeDtypeStruct(batch + x.shape[-2:-1], _int_dtype())
    return _decision(_clustering.lsh_hash, (spec,), dict(x=x, planes=planes),
                     dict(x=2, planes=2))


def hamming_kmeans(codes, n_clusters, *, iters=10, seed=0, mask=None, return_centroids=False):
    """Labels (..., n) by k-means in Hamming space (see `routing_attention.hamming_kmeans`);
    with return_centroids also the centroid codes (..., c)."""
    codes = jnp.asarray(codes)
    n = codes.shape[-1]
    c = integer("n_clusters", n_clusters, 1, n)
    batch = _batch(codes=(codes, 1), mask=(mask, 1))
    specs = (jax.ShapeDtypeStruct(batch + (n,), _int_dtype()),
             jax.ShapeDtypeStruct(batch + (c,), _int_dtype()))
    fn = functools.partial(_clustering.hamming_kmeans, n_clusters=c, iters=iters, seed=seed,
                           return_centroids=True)
    labels, centroids = _decision(fn, specs, dict(codes=codes, mask=mask), dict(codes=1, mask=1))
    return (labels, centroids) if return_centroids else labels
