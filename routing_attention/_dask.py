"""Dask arrays in, lazy Dask arrays out.

Every public function is wrapped by `dask_aware`: called with NumPy arrays it is the
plain function (the wrapper costs one scan of the arguments' types); called with a Dask
array anywhere among its array arguments it returns lazy Dask arrays computed block by
block over the batch (leading) axes with ``dask.array.apply_gufunc``.  The core axes
(sequence, feature, clusters) are merged into one chunk first (``allow_rechunk``), so a
sequence split across chunks gives the same result as a whole one, never a wrong one.

A relative position bias (``rel_bias``) is one more operand, blocked with the batch; a
backward given one also returns its gradient, summed over the axes the bias broadcast
along.  Attention dropout is refused: its mask is keyed on a problem's index over all
the call's batch axes, which a block does not know.

Each wrapped function carries its gufunc signature as ``.signature`` (positional array
arguments, default outputs), so ``da.apply_gufunc(ra.attention, ra.attention.signature,
q, k, v, causal=True)`` works as well.  A backward's signature holds only for arguments
with the same batch axes: the backward sums each gradient over the axes its input
broadcast along, which a gufunc's signature cannot say (with Dask arrays, call the
backward itself).  Dask is imported only when a Dask array arrives.
"""
import functools
import inspect

import numpy as np

from ._checks import check_by_empty_call, float_dtype

__all__ = ["dask_aware"]

# name -> (positional array arguments and their core dims, output core dims,
#          keyword array arguments and their core dims)
# Outputs: "f" (the call's float dtype) or "i" (int64) before the core dims.
SPECS = {
    "attention": ("q:(n,d) k:(m,d) v:(m,e)", "f(n,e)", "key_mask:(m) rel_bias:(r)"),
    "attention_backward": ("dout:(n,e) q:(n,d) k:(m,d) v:(m,e)", "f(n,d) f(m,d) f(m,e)",
                           "key_mask:(m) lse:(n) output:(n,e) rel_bias:(r)"),
    "routing_attention": ("q:(n,d) k:(m,d) v:(m,e) q_idx:(c,w) k_idx:(c,u)", "f(n,e)",
                          "rel_bias:(r)"),
    "routing_attention_backward": ("dout:(n,e) q:(n,d) k:(m,d) v:(m,e) q_idx:(c,w) k_idx:(c,u)",
                                   "f(n,d) f(m,d) f(m,e)", "rel_bias:(r)"),
    "local_attention": ("q:(n,d) k:(m,d) v:(m,e)", "f(n,e)", "rel_bias:(r)"),
    "local_attention_backward": ("dout:(n,e) q:(n,d) k:(m,d) v:(m,e)", "f(n,d) f(m,d) f(m,e)",
                                 "rel_bias:(r)"),
    "clustered_attention": ("q:(n,d) k:(m,d) v:(m,e) labels:(n)", "f(n,e)", "key_mask:(m)"),
    "clustered_attention_backward": ("dout:(n,e) q:(n,d) k:(m,d) v:(m,e) labels:(n)",
                                     "f(n,d) f(m,d) f(m,e)", "key_mask:(m)"),
    "improved_clustered_attention": ("q:(n,d) k:(m,d) v:(m,e) labels:(n)", "f(n,e)",
                                     "key_mask:(m) rel_bias:(r)"),
    "improved_clustered_attention_backward": ("dout:(n,e) q:(n,d) k:(m,d) v:(m,e) labels:(n)",
                                              "f(n,d) f(m,d) f(m,e)", "key_mask:(m) rel_bias:(r)"),
    "combiner_attention": ("q:(n,d) k:(n,d) v:(n,e)", "f(n,e)", "rel_bias:(r)"),
    "combiner_attention_backward": ("dout:(n,e) q:(n,d) k:(n,d) v:(n,e)",
                                    "f(n,d) f(n,d) f(n,e)", "rel_bias:(r)"),
    "spherical_kmeans": ("x:(n,d)", "f(c,d)", "mask:(n) init:(c,d)"),
    "assign_clusters": ("x:(n,d) centroids:(c,d)", "i(n)", ""),
    "update_centroids": ("centroids:(c,d) x:(n,d) labels:(n)", "f(c,d)", "mask:(n)"),
    "commitment_loss": ("x:(n,d) centroids:(c,d) labels:(n)", "f()", "mask:(n)"),
    "top_members": ("scores:(n,c)", "i(c,w)", ""),
    "assign_top_members": ("x:(n,d) centroids:(c,d)", "i(n) f(n) i(c,w)", ""),
    "members_from_labels": ("labels:(n)", "i(c,s)", ""),
    "lsh_hash": ("x:(n,d) planes:(b,p)", "i(n)", ""),
    "hamming_kmeans": ("codes:(n)", "i(n)", "mask:(n)"),
}
# a flag that adds outputs: name -> (keyword, extra outputs)
EXTRA_OUTPUTS = {
    "attention": ("return_lse", "f(n)"),
    "routing_attention": ("return_lse", "f(n)"),
    "assign_clusters": ("return_scores", "f(n,c) f(n)"),
    "hamming_kmeans": ("return_centroids", "i(c)"),
}
# a backward's outputs in order: the argument each is the gradient of
GRADIENTS = ("q", "k", "v", "rel_bias")
# operands cast to the dtype the other floating-point operands decide (or int/bool ones)
NOT_DECIDING_DTYPE = {"dout", "lse", "output", "rel_bias", "labels", "q_idx", "k_idx",
                      "key_mask", "mask", "codes"}


def _pairs(text):
    return [tuple(item.split(":")) for item in text.split()]


def _outputs(text):
    return [(item[0], item[1:]) for item in text.split()]


def _signature(name):
    inputs, outputs, _ = SPECS[name]
    return (",".join(dims for _, dims in _pairs(inputs)) + "->"
            + ",".join(dims for _, dims in _outputs(outputs)))


def _is_dask(a):
    return type(a).__module__.startswith("dask")


def dask_aware(fn):
    """Wrap a public function: Dask arguments give a lazy result (see the module)."""
    name = fn.__name__
    params = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in args:
            if type(a) is not np.ndarray and _is_dask(a):
                return _lazy(name, fn, params, args, kwargs)
        for a in kwargs.values():
            if type(a) is not np.ndarray and _is_dask(a):
                return _lazy(name, fn, params, args, kwargs)
        return fn(*args, **kwargs)

    wrapper.signature = _signature(name)
    return wrapper


# ------------------------------------------------------------------ the lazy call
def _core_sizes(arrays_and_dims):
    sizes = {}
    for a, dims in arrays_and_dims:
        names = dims.strip("()").split(",") if dims != "()" else []
        for size, dim in zip(a.shape[a.ndim - len(names):], names):
            sizes.setdefault(dim, size)
    return sizes


def _lazy(name, fn, params, args, kwargs):
    import dask.array as da     # here: dask is optional, and only Dask inputs reach this

    bound = params.bind(*args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    extra = call.pop("kwargs", None) or call.pop("saved", None) or {}
    if extra or call.get("return_saved") or call.get("out") is not None:
        raise ValueError(f"{name}: saved statistics (return_saved, **saved) and out= are not "
                         "supported with Dask arrays; the backward recomputes what it needs")
    if call.get("dropout_p"):
        raise ValueError(f"{name}: dropout_p > 0 is not supported with Dask arrays: the dropout "
                         "mask is keyed on each problem's index over all the batch axes, which "
                         "a block does not know (it would give other masks than NumPy's)")
    inputs, outputs, keyword_arrays = SPECS[name]
    inputs, outputs = _pairs(inputs), _outputs(outputs)
    flag_outputs = EXTRA_OUTPUTS.get(name)
    if flag_outputs and call.get(flag_outputs[0]):
        outputs += _outputs(flag_outputs[1])
    # the keyword arrays given become extra gufunc operands
    operands = [(arg, dims) for arg, dims in inputs]
    operands += [(arg, dims) for arg, dims in _pairs(keyword_arrays) if call.get(arg) is not None]
    shapes = {arg: tuple(np.shape(call[arg]) if not _is_dask(call[arg]) else call[arg].shape)
              for arg, _ in operands}
    arrays = [call.pop(arg) for arg, _ in operands]
    arrays = [a if _is_dask(a) else np.asarray(a) for a in arrays]
    names = [arg for arg, _ in operands]
    backward = name.endswith("_backward")
    if backward and "rel_bias" in names:
        outputs += _outputs("f(r)")
    if "attention" in name and all(np.isfinite(size) for a in arrays for size in a.shape):
        # shapes and keywords checked now, with the NumPy function's messages
        core_ranks = {arg: len(_core_sizes([(a, d)])) for a, (arg, d) in zip(arrays, operands)}
        check_by_empty_call(fn, dict(zip(names, arrays)), core_ranks, **call)
    if name == "update_centroids" and any(
            a.ndim - len(_core_sizes([(a, d)])) > arrays[0].ndim - 2
            for a, (_, d) in zip(arrays[1:], operands[1:])):
        raise ValueError("update_centroids pools x's extra leading axes into one mean; with "
                         "Dask arrays give centroids, x, labels and mask the same leading axes")
    if name == "members_from_labels" and call.get("max_size") is None:
        raise ValueError("members_from_labels with Dask arrays needs max_size (the width of "
                         "the member lists must be known before computing)")
    if backward:        # every block sees full batch axes; gradients are summed back below
        batch = np.broadcast_shapes(*(a.shape[:a.ndim - len(_core_sizes([(a, d)]))]
                                      for a, (_, d) in zip(arrays, operands)))
        arrays = [da.broadcast_to(a, batch + a.shape[a.ndim - len(_core_sizes([(a, d)])):])
                  for a, (_, d) in zip(arrays, operands)]
    deciding = {arg: np.empty(0, a.dtype) for a, (arg, _) in zip(arrays, operands)
                if arg not in NOT_DECIDING_DTYPE}
    fdtype = float_dtype(**deciding) if deciding else np.dtype(np.float64)
    sizes = _core_sizes(zip(arrays, (d for _, d in operands)))
    sizes.update(c=call.get("n_clusters", sizes.get("c")), w=call.get("w", sizes.get("w")),
                 s=call.get("max_size"))
    if name in ("spherical_kmeans", "members_from_labels", "hamming_kmeans"):
        sizes["c"] = call["n_clusters"]
    signature = (",".join(d for _, d in operands) + "->" + ",".join(d for _, d in outputs))
    single = len(outputs) == 1

    def block(*blocks):          # keywords in the closure: none may clash with dask's own
        return fn(**dict(zip(names, blocks)), **call)

    result = da.apply_gufunc(
        block, signature, *arrays,
        output_dtypes=[fdtype if kind == "f" else np.dtype(np.int64) for kind, _ in outputs]
        if not single else (fdtype if outputs[0][0] == "f" else np.dtype(np.int64)),
        output_sizes={k: v for k, v in sizes.items() if v is not None},
        allow_rechunk=True)
    if backward:
        result = tuple(_unbroadcast(g, shapes[arg]) for g, arg in zip(result, GRADIENTS))
    return result


def _unbroadcast(grad, shape):
    """Sum a lazy gradient over the axes broadcasting added to `shape`."""
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(extra + i for i, s in enumerate(shape)
                                       if s == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=axes).reshape(shape) if axes else grad
