"""Argument checking shared by every public function: dtypes, ranks, shapes, scalars.

Every error names the argument it is about, so a user can tell which input to fix.
"""
import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_dtype(**arrays):
    """The dtype a call computes in: float32 or float64, by NumPy's promotion rules.

    Integers and bools promote to float64, float16 to float32; complex, object, string
    and extended-precision inputs raise TypeError naming the argument.
    """
    dtypes = []
    for name, a in arrays.items():
        dt = np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype
        if dt.kind == "c":
            raise TypeError(f"{name} has complex dtype {dt}; attention needs real floating-point input")
        if dt.kind not in "biuf":
            raise TypeError(f"{name} has dtype {dt}; expected a real numeric dtype (float32 or float64)")
        if dt.kind == "f" and dt.itemsize > 8:
            raise TypeError(f"{name} has dtype {dt}; only float32 and float64 are computed, "
                            "cast it with .astype(np.float64)")
        dtypes.append(dt)
    dt = np.result_type(*dtypes)
    if dt.kind != "f":
        dt = np.dtype(np.float64)
    return np.dtype(np.float32) if dt.itemsize <= 4 else np.dtype(np.float64)


def as_matrix(name, a, dtype, min_rank=2):
    """`a` as an array of `dtype` with at least `min_rank` axes (no copy when possible).
    Complex, object and string input raises TypeError naming `name` (no silent cast)."""
    float_dtype(**{name: a})
    arr = np.asarray(a, dtype=dtype)
    if arr.ndim < min_rank:
        raise ValueError(f"{name} must have at least {min_rank} dimensions "
                         f"(..., sequence, feature); got shape {arr.shape}")
    return arr


def qkv_arrays(q, k, v):
    """q (..., n, d), k (..., m, d), v (..., m, e) as arrays of their common float dtype,
    with the feature size of q and k and the sequence length of k and v checked."""
    dtype = float_dtype(q=q, k=k, v=v)
    q = as_matrix("q", q, dtype)
    k = as_matrix("k", k, dtype)
    v = as_matrix("v", v, dtype)
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k must have the same feature size d: q has {q.shape[-1]} "
                         f"(shape {q.shape}), k has {k.shape[-1]} (shape {k.shape})")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"k and v must have the same sequence length m: k has {k.shape[-2]} "
                         f"(shape {k.shape}), v has {v.shape[-2]} (shape {v.shape})")
    return q, k, v


def as_bool_mask(name, mask, length, rows="keys"):
    """A (..., length) boolean mask over `rows` (keys, queries, ...); False marks padding."""
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array (False = padding); got dtype {arr.dtype}")
    if arr.ndim < 1 or arr.shape[-1] != length:
        raise ValueError(f"{name} must have shape (..., {length}) to match the {rows}; "
                         f"got {arr.shape}")
    return arr


def batch_shape(**arrays_and_core_ranks):
    """Broadcast the leading (batch) axes of (array, core_rank) pairs, naming the culprits."""
    shapes = {name: a.shape[: a.ndim - r] for name, (a, r) in arrays_and_core_ranks.items()}
    try:
        return np.broadcast_shapes(*shapes.values())
    except ValueError:
        desc = ", ".join(f"{name} {s}" for name, s in shapes.items())
        raise ValueError(f"batch axes do not broadcast: {desc}") from None


def scale_value(scale, d, dtype):
    """The logit scale as a `dtype` scalar; None means 1/sqrt(d)."""
    if scale is None:
        return dtype.type(1.0 / np.sqrt(d)) if d > 0 else dtype.type(1.0)
    if isinstance(scale, (str, bytes)) or np.iscomplexobj(scale):
        raise TypeError(f"scale must be a real number; got {scale!r}")
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number; got {scale!r}") from None
    if not np.isfinite(s):
        raise ValueError(f"scale must be finite; got {scale!r}")
    return dtype.type(s)


def integer(name, value, low=None, high=None):
    """An int argument in [low, high], with a message naming it otherwise."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer; got {value!r}") from None
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}; got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}; got {v}")
    return v


def flag(name, value):
    """A boolean keyword."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def check_out(out, shape, dtype, exact=False):
    """`out=`: None, or an ndarray of exactly `shape` that results of `dtype` can be cast
    to (exact: of that very dtype, for integer labels and positions)."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array; got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)} (the broadcast output); "
                         f"got {out.shape}")
    ok = out.dtype == dtype if exact else out.dtype.kind == "f" and out.dtype.itemsize <= 8
    if not ok:
        raise TypeError(f"out has dtype {out.dtype}; results are {np.dtype(dtype)}"
                        + ("" if exact else " (out must be float16, float32 or float64)"))
    return out


def unbroadcast(grad, shape):
    """Sum `grad` over the axes NumPy broadcast to reach it from `shape`."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, s in enumerate(shape) if s == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=axes).reshape(shape)


def saved_arrays(saved, keys, batch, core_shapes, dtypes, contiguous=False):
    """The forward's statistics for a backward gufunc.  `saved` holds all of `keys` (as
    returned with ``return_saved=True``) or nothing; each array must have shape
    batch + core_shapes[key] and is cast to dtypes[key] (and made C-contiguous if asked).
    Nothing saved: zero-stride dummies of the core shapes, which the gufunc ignores."""
    unknown = set(saved) - set(keys)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}; the saved "
                        f"statistics are {keys}")
    if saved and set(saved) != set(keys):
        raise ValueError(f"pass all saved statistics {keys} (as returned with "
                         f"return_saved=True) or none")
    arrays = []
    for key in keys:
        if not saved:
            arrays.append(np.broadcast_to(np.zeros((), dtypes[key]), core_shapes[key]))
            continue
        a = np.asarray(saved[key])
        if a.shape != batch + core_shapes[key]:
            raise ValueError(f"{key} must have shape {batch + core_shapes[key]} (from the same "
                             f"forward call); got {a.shape}")
        a = a.astype(dtypes[key], copy=False)
        arrays.append(np.ascontiguousarray(a) if contiguous else a)
    return arrays
