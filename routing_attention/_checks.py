"""Argument checking for every public function: dtypes, ranks, shapes, scalars, keywords.

This module is the one home of the package's argument checks (tests/test_checks_single_home.py
fails on a `raise ValueError` / `raise TypeError` elsewhere, bar the framework bridges' checks
of their framework's own objects).  Every error names the argument it is about, so a user
can tell which input to fix.
"""
import math
import numbers
import operator
import re
import weakref

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# The kernels index a core axis (sequence, feature) with C int, in pairs: INT_MAX // 2.
MAX_CORE_SIZE = 2**30 - 1
# Integer arguments reach C as int64.
MAX_INT64 = 2**63 - 1

# Attributes by which NumPy (or the DLPack protocol) recognises an array-like object.
_ARRAY_PROTOCOLS = ("__array__", "__array_interface__", "__array_struct__", "__array_function__",
                    "__dlpack__", "__cuda_array_interface__")


# ------------------------------------------------------------------ array inputs
def reject_foreign(name, a):
    """Raise TypeError if `a` is an array object of another library (a torch tensor, a
    dask or JAX array, a pandas object, ...): np.asarray would silently copy, compute or
    move it, and the gradients could not flow back to it.  NumPy arrays (and
    subclasses), NumPy scalars, Python scalars, lists, tuples and other plain objects
    pass.  Every array argument of the NumPy API goes through here."""
    if isinstance(a, (np.ndarray, np.generic, list, tuple, int, float, complex, bool,
                      str, bytes)) or a is None:
        return
    kind = type(a)
    if not any(hasattr(kind, attr) for attr in _ARRAY_PROTOCOLS):
        return
    library = kind.__module__.split(".")[0]
    what = f"{library}.{kind.__qualname__}" if library != "builtins" else kind.__qualname__
    if library == "torch":
        raise TypeError(f"{name} is a {what}; the NumPy API takes NumPy arrays. For torch "
                        "tensors use routing_attention.torch (same functions, with autograd), "
                        f"or pass {name}.detach().numpy()")
    raise TypeError(f"{name} is a {what}, not a NumPy array; convert it with np.asarray({name}) "
                    "(this copies or computes it) before calling the NumPy API")


def as_array(name, a, dtype=None):
    """np.asarray(a, dtype) for a user's argument, refusing other libraries' arrays."""
    reject_foreign(name, a)
    return np.asarray(a, dtype=dtype)


def float_dtype(**arrays):
    """The dtype a call computes in: float32 or float64, by NumPy's promotion rules.

    np.result_type of the inputs' dtypes, with float16 computed as float32 and
    integer/bool-only inputs as float64 (float32 with int64 gives float64, with int8
    float32); complex, object, string and extended-precision inputs, and other
    libraries' arrays, raise TypeError naming the argument.
    """
    dtypes = []
    for name, a in arrays.items():
        reject_foreign(name, a)
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
        layout = {2: " (..., sequence, feature)", 3: " (..., heads, sequence, feature)"}
        raise ValueError(f"{name} must have at least {min_rank} dimension"
                         f"{'' if min_rank == 1 else 's'}{layout.get(min_rank, '')}; "
                         f"got shape {arr.shape}")
    return arr


def qkv_arrays(q, k, v):
    """q (..., n, d), k (..., m, d), v (..., m, e) as arrays of their common float dtype,
    with the feature size of q and k and the sequence length of k and v checked."""
    dtype = float_dtype(q=q, k=k, v=v)
    q = as_matrix("q", q, dtype)
    k = as_matrix("k", k, dtype)
    v = as_matrix("v", v, dtype)
    qkv_shapes(q.shape, k.shape, v.shape)
    for name, x in (("q", q), ("k", k), ("v", v)):
        core_size(name, x.shape[-2:], x.shape)
    return q, k, v


def qkv_shapes(q_shape, k_shape, v_shape):
    """Shapes (any framework's) q (..., n, d), k (..., m, d), v (..., m, e): q and k share
    the feature size d, k and v the sequence length m."""
    if k_shape[-1] != q_shape[-1]:
        raise ValueError(f"q and k must have the same feature size d: q has {q_shape[-1]} "
                         f"(shape {tuple(q_shape)}), k has {k_shape[-1]} (shape {tuple(k_shape)})")
    if v_shape[-2] != k_shape[-2]:
        raise ValueError(f"k and v must have the same sequence length m: k has {k_shape[-2]} "
                         f"(shape {tuple(k_shape)}), v has {v_shape[-2]} (shape {tuple(v_shape)})")


def check_by_empty_call(forward, arrays, core_ranks, **keywords):
    """Check a lazy or traced call now: `forward` (a NumPy API function) runs on empty
    stand-ins of `arrays` (name -> array-like with shape and dtype; core_ranks: name ->
    rank of its core axes), so its own shape and keyword checks raise with their
    messages.  No work is done: every stand-in gets a leading axis of 0, after padding
    the batch axes with 1s to one rank so that the added axes line up; a message quotes
    the shapes given (a padded batch phrase may keep its leading 1s)."""
    shapes = {key: tuple(a.shape) for key, a in arrays.items()}
    batch = max(len(shape) - core_ranks[key] for key, shape in shapes.items())
    padded = {key: (1,) * (batch - len(shape) + core_ranks[key]) + shape
              for key, shape in shapes.items()}
    try:
        forward(**{key: np.zeros((0,) + padded[key], a.dtype) for key, a in arrays.items()},
                **keywords)
    except (TypeError, ValueError) as err:
        text = re.sub(r"\(0, ([^()]*)\)",
                      lambda m: f"({m.group(1)}{',' if ',' not in m.group(1) else ''})", str(err))
        for key, shape in shapes.items():
            if padded[key] != shape:
                text = text.replace(str(padded[key]), str(shape))
        raise type(err)(text) from None


# ------------------------------------------------------------------ fast path
_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))
_LARGEST = {dt: float(np.finfo(dt).max) for dt in _NATIVE}
_ALL_KEYS = {}          # m -> the all-True (m,) key mask, a read-only broadcast view


def plain_qkv(q, k, v):
    """True when q, k, v need no conversion and no check beyond these: NumPy arrays of
    one native float dtype (float32 or float64), at least 2-D, with equal batch axes and
    matching d and m within MAX_CORE_SIZE.  Calls that pass it skip the general checks,
    which cost more than a small problem's arithmetic; anything else takes the full
    path (same results, and its clear errors)."""
    if type(q) is not np.ndarray or type(k) is not np.ndarray or type(v) is not np.ndarray:
        return False
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt or dt not in _NATIVE:
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    return (len(qs) >= 2 and len(ks) >= 2 and len(vs) >= 2 and qs[:-2] == ks[:-2] == vs[:-2]
            and qs[-1] == ks[-1]
            and ks[-2] == vs[-2] and max(qs[-2], ks[-2], qs[-1], vs[-1]) <= MAX_CORE_SIZE)


def plain_scale(scale, d, dtype):
    """scale_value for None or a finite Python float that fits the dtype, else None
    (then the caller takes the full path)."""
    if scale is None:           # the very expression of scale_value: the same bits
        return dtype.type(1.0 / math.sqrt(d)) if d > 0 else dtype.type(1.0)
    if type(scale) is float and abs(scale) <= _LARGEST[dtype]:
        return dtype.type(scale)
    return None


def all_keys(m):
    """The all-True key mask of length m (cached per length)."""
    mask = _ALL_KEYS.get(m)
    if mask is None:
        mask = _ALL_KEYS[m] = np.broadcast_to(np.True_, (m,))
    return mask


def core_size(name, sizes, shape=None):
    """ValueError if a core size (sequence length, feature size) exceeds what the
    kernels index (MAX_CORE_SIZE), before anything of that size is built."""
    for size in sizes:
        if size > MAX_CORE_SIZE:
            raise ValueError(f"{name}: a core dimension of {size} exceeds the supported maximum "
                             f"{MAX_CORE_SIZE}" + (f" (shape {shape})" if shape is not None else ""))


def as_bool_mask(name, mask, length, rows="keys"):
    """A (..., length) boolean mask over `rows` (keys, queries, ...); False marks padding."""
    arr = as_array(name, mask)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array (False = padding); got dtype {arr.dtype}")
    mask_length(name, arr.shape, length, rows)
    return arr


def mask_length(name, shape, length, rows="keys"):
    """A mask's shape (any framework's) is (..., length)."""
    if len(shape) < 1 or shape[-1] != length:
        raise ValueError(f"{name} must have shape (..., {length}) to match the {rows}; "
                         f"got {tuple(shape)}")


def mask_fits(name, mask, batch, per_head=True):
    """ValueError unless the leading axes of `mask` (..., length) broadcast to `batch`
    (the q/k/v batch shape): NumPy would let a mask such as torch's (B, 1, 1, m) for
    q (B, H, n, d) enlarge the result to (B, B, H, n, e), which is almost always a
    mistake.  per_head=False: `batch` excludes the heads axis (a layer's masks are
    shared by every head)."""
    try:
        fits = np.broadcast_shapes(mask.shape[:-1], tuple(batch)) == tuple(batch)
    except ValueError:
        fits = False
    if not fits:
        length, batch = mask.shape[-1], tuple(batch)
        axes = "of q, k and v" if per_head else "of q without its heads axis (one mask serves " \
            "every head)"
        torch_fix = (f"{name}[..., 0, :] here, of shape (B, 1, {length})" if per_head else
                     f"{name}[:, 0, 0, :] here, of shape (B, {length})")
        raise ValueError(f"{name} must have shape (..., {length}) with leading axes that broadcast "
                         f"to the batch axes {batch} {axes}; got {tuple(mask.shape)}, which would change "
                         f"the result's shape. Give it shape {batch + (length,)}, or fewer "
                         f"leading axes (e.g. ({length},)); a PyTorch-style mask (B, 1, 1, "
                         f"{length}) for q (B, H, n, d) is {torch_fix}")


def batch_shape(**arrays_and_core_ranks):
    """Broadcast the leading (batch) axes of (array, core_rank) pairs, naming the culprits."""
    shapes = {name: a.shape[: a.ndim - r] for name, (a, r) in arrays_and_core_ranks.items()}
    try:
        return np.broadcast_shapes(*shapes.values())
    except ValueError:
        desc = ", ".join(f"{name} {s}" for name, s in shapes.items())
        raise ValueError(f"batch axes do not broadcast: {desc}") from None


def scale_value(scale, d, dtype):
    """The logit scale as a `dtype` scalar; None means 1/sqrt(d).  A scale that is not
    finite in `dtype` (e.g. 1e39 in float32) is a ValueError, not a silent inf."""
    if scale is None:
        return dtype.type(1.0 / np.sqrt(d)) if d > 0 else dtype.type(1.0)
    not_traced("scale", scale, "a Python float")
    reject_foreign("scale", scale)
    if isinstance(scale, (str, bytes)) or np.iscomplexobj(scale):
        raise TypeError(f"scale must be a real number; got {scale!r}")
    try:
        s = float(scale)
    except OverflowError:
        raise ValueError("scale must be finite; got a number too large for a float") from None
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number; got {scale!r}") from None
    if not np.isfinite(s):
        raise ValueError(f"scale must be finite; got {scale!r}")
    if abs(s) > float(np.finfo(dtype).max):
        raise ValueError(f"scale={scale!r} overflows {np.dtype(dtype).name} (largest "
                         f"{np.finfo(dtype).max:.4g}), the precision of the inputs; use a "
                         "smaller scale, or float64 inputs")
    return dtype.type(s)


def integer(name, value, low=None, high=MAX_INT64):
    """An int argument in [low, high] (by default at most the int64 maximum, as it
    reaches C as int64), with a message naming it otherwise."""
    try:
        v = operator.index(value)
    except TypeError:
        not_traced(name, value, "a Python int")
        raise TypeError(f"{name} must be an integer; got {value!r}") from None
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}; got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}; got {v}")
    return v


def not_traced(name, value, kind):
    """A JAX value traced by jit where the call needs a Python value: a TypeError that
    says how to make it static."""
    if "Tracer" in type(value).__name__:
        raise TypeError(f"{name} must be {kind} known when tracing, not a traced value: under "
                        f"jax.jit mark it static (static_argnames=('{name}',))")


def flag(name, value):
    """A boolean keyword."""
    if not isinstance(value, (bool, np.bool_)):
        not_traced(name, value, "True or False")
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


def kernel_out(out, dtype, *inputs):
    """What a forward kernel writes for a checked `out=`: out itself, or None (a fresh
    array, which the caller then copies into out) when out overlaps one of `inputs` (the
    routing and clustered kernels read input rows after writing output rows) or holds a
    lower precision than the results (the saved output the backward reads must keep the
    results' precision)."""
    if out is None or out.dtype != dtype or any(np.may_share_memory(out, x) for x in inputs):
        return None
    return out


def into_out(target, result):
    """The forward's return value: `result`, copied into the caller's out= array when the
    kernel wrote a separate one (kernel_out)."""
    if target is None or target is result:
        return result
    target[...] = result
    return target


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
        a = as_array(key, saved[key])
        if a.shape != batch + core_shapes[key]:
            raise ValueError(f"{key} must have shape {batch + core_shapes[key]} (from the same "
                             f"forward call); got {a.shape}")
        a = a.astype(dtypes[key], copy=False)
        arrays.append(np.ascontiguousarray(a) if contiguous else a)
    return arrays


# ------------------------------------------------------------------ saved keywords
# A forward called with ``return_saved=True`` records, in saved["keywords"], every keyword
# that shaped its result, resolved (scale as the float used, block as the int used, the
# key mask as a copy of the boolean array).  The backward takes each keyword the caller
# leaves at None from there, and refuses one that disagrees: a gradient is never computed
# for other keywords than the forward's.

def _same(a, b):
    """Equality of two resolved keyword values (arrays: same shape and elements)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.shape == b.shape
                and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == b.dtype.kind == "f")))
    return a is b if a is None or b is None else bool(a == b)


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    return repr(value)


class BackwardKeywords:
    """A backward's keywords, merged with the saved statistics of its forward.

    ``BackwardKeywords(func, saved, defaults, **passed)``: `saved` is the backward's
    ``**saved`` (arrays, and optionally "keywords", the forward's record); `passed` the
    keywords as given (None = not given).  `.values` holds, for each keyword, the value
    passed, else the forward's, else the default; `.arrays` the saved arrays without
    the record.  `check(resolved)` then raises ValueError naming a keyword passed
    explicitly whose resolved value differs from the forward's."""

    def __init__(self, func, saved, defaults, **passed):
        self.func, self.passed = func, passed
        self.arrays = dict(saved)
        forward = self.arrays.pop("keywords", None)
        if forward is not None:
            if not isinstance(forward, dict):
                raise TypeError(f"{func}: keywords must be the dict saved['keywords'] of the "
                                f"forward call; got {type(forward).__name__}")
            if set(forward) != set(passed):
                raise ValueError(f"{func}: saved['keywords'] records {sorted(forward)}, not the "
                                 f"keywords {sorted(passed)} of this function's forward: the "
                                 "saved statistics come from another function")
        self.forward = forward
        self.values = {name: value if value is not None
                       else forward[name] if forward is not None else defaults[name]
                       for name, value in passed.items()}

    def check(self, resolved):
        """`resolved`: every keyword's value as the forward records it."""
        if self.forward is None:
            return
        for name, value in self.passed.items():
            if value is not None and not _same(resolved[name], self.forward[name]):
                raise ValueError(
                    f"{self.func}: {name}={_describe(value)} disagrees with the forward call, "
                    f"which used {name}={_describe(self.forward[name])} (saved['keywords']); "
                    f"the gradient would be wrong. Pass the forward's {name}, or leave it out "
                    "to take it from the saved statistics")


def scale_option(scale):
    """A layer's or cache's `scale` option, checked where it is given: None, or a real
    finite number (its overflow in float32 is checked by each call, `scale_value`)."""
    scale_value(scale, 1, np.dtype(np.float64))
    return scale


def pair_record(terms):
    """The pair terms (dropout_p, dropout_seed, rel_bias) as the saved keywords record
    them: the bias as a private copy (None without one)."""
    p, seed, bias = terms
    return dict(dropout_p=p, dropout_seed=seed,
                rel_bias=None if bias is None else np.array(bias, copy=True))


def mask_record(mask, use_mask):
    """A key mask as the saved keywords record it: a private copy, or None."""
    return np.array(mask, dtype=bool, copy=True) if use_mask else None


# ------------------------------------------------------------------ layer call contexts
class LayerContext:
    """Everything a layer's backward needs from one call, made by ``layer.forward``:
    ``y, ctx = layer.forward(q, k, v)`` then ``dq, dk, dv = layer.backward(dout, ctx)``.
    Opaque; its statistics are the layer's own and are never overwritten by later calls.
    It refers to the q, k, v passed (copying them would cost a tenth of a call): the
    caller must not write into them before the backward, or the gradients are those of
    the new values (`routing_attention.torch` catches this with torch's version
    counters)."""

    __slots__ = ("_layer", "data")

    def __init__(self, layer, data):
        self._layer, self.data = weakref.ref(layer), data

    def __repr__(self):
        layer = self._layer()
        return f"<{type(layer).__name__ if layer is not None else 'layer'} call context>"


class LayerCalls:
    """Call bookkeeping shared by the NumPy layers, so that a backward never uses the
    statistics of another call than the one meant.

    ``layer.forward(...)`` returns (output, LayerContext); ``layer.backward(dout, ctx)``
    uses that context.  ``layer(...)`` keeps its call's context in the layer, and
    ``layer.backward(dout)`` uses it when it is unambiguous: one ``layer(...)`` call since
    the previous context-free backward (repeating that backward is allowed).  After two
    or more such calls it raises RuntimeError.  Only the kept context's arrays are
    reused (overwritten) by the next ``layer(...)`` call of the same shapes; contexts
    handed out by ``forward`` never are."""

    _kept = None        # data of the last layer(...) call
    _calls = 0          # layer(...) calls since the last context-free backward

    def _reusable(self):
        """The kept call's data, now released for reuse by a new layer(...) call (and no
        longer available to backward, in case that call fails part-way), or None."""
        data, self._kept = self._kept, None
        return data

    def _keep(self, data):
        self._kept = data
        self._calls += 1

    def _context(self, ctx):
        """The data `backward` works on: ctx's, or the kept call's if unambiguous."""
        name = type(self).__name__
        if ctx is not None:
            if not isinstance(ctx, LayerContext):
                raise TypeError(f"{name}.backward: ctx must be the context returned by "
                                f"{name}.forward; got {type(ctx).__name__}")
            if ctx._layer() is not self:
                raise ValueError(f"{name}.backward: ctx comes from another layer's forward call")
            return ctx.data
        if self._kept is None:
            raise RuntimeError(f"{name}.backward needs a forward call first (layer(q, k, v), "
                               "or y, ctx = layer.forward(q, k, v) then backward(dout, ctx))")
        if self._calls > 1:
            raise RuntimeError(
                f"{name}.backward(dout) is ambiguous: the layer was called {self._calls} times "
                "since the last backward, and the gradient of an earlier call would be computed "
                "with the last call's statistics. Take each call's context and pass it: "
                "y, ctx = layer.forward(q, k, v); ...; dq, dk, dv = layer.backward(dout, ctx)")
        self._calls = 0
        return self._kept


# ------------------------------------------------------------------ shared argument checks
def one_of(name, value, choices):
    """value, which must be one of `choices` (a keyword such as plan, merge, membership)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def dout_shape(dout, n, e):
    """dout must match the attention output's core shape (n, e)."""
    if dout.shape[-2:] != (n, e):
        raise ValueError(f"dout must have shape (..., n, e) = (..., {n}, {e}) like the attention "
                         f"output; got {dout.shape}")


def layer_dout(dout, shape):
    """A layer's dout: exactly `shape`, the output of the call it differentiates.  The
    plain backwards broadcast dout (summing over extra leading axes); a layer knows its
    output's shape, so a dout of another shape is a mistake, not a batch to sum over.
    Its dtype is checked as any dout's (the backward casts it to the call's dtype)."""
    float_dtype(dout=dout)
    dout = np.asarray(dout)
    if dout.shape != tuple(shape):
        raise ValueError(f"dout must have shape {tuple(shape)} like the layer call's output; "
                         f"got {dout.shape}")
    return dout


def int_array(name, a, min_rank=1):
    """An integer array as int64 (uint64 bit patterns are kept), naming the argument."""
    arr = as_array(name, a)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array; got dtype {arr.dtype}")
    min_dims(name, arr.shape, min_rank)
    if arr.dtype == np.uint64:
        return arr.view(np.int64)
    return arr.astype(np.int64, copy=False)


def labels_array(labels, n, n_clusters, rows="rows"):
    """(..., n) int64 cluster labels, each in [-1, n_clusters) (-1 = no cluster)."""
    lab = int_array("labels", labels)
    if lab.shape[-1] != n:
        raise ValueError(f"labels must have shape (..., {n}) to match the {rows}; got {lab.shape}")
    if lab.size and (lab.min() < -1 or lab.max() >= n_clusters):
        raise ValueError(f"labels must lie in [-1, n_clusters) = [-1, {n_clusters}) (-1 = no "
                         f"cluster); got values in [{lab.min()}, {lab.max()}]")
    return lab


def cluster_count(value, n, name, shape=None, rows="rows"):
    """n_clusters in [1, n] for the n `rows` of `name`, saying which bound failed."""
    c = integer("n_clusters", value, 1)
    where = f" of {name} (shape {shape})" if shape is not None else ""
    if n == 0 and shape is not None:
        raise ValueError(f"{name} has no rows (shape {shape}): k-means needs at least "
                         f"n_clusters = {c} of them")
    if c > n:
        raise ValueError(f"n_clusters must be <= the number of {rows} n = {n}{where}; got {c}")
    return c


def decay_value(decay):
    """The EMA decay of centroid updates, a real number in [0, 1]."""
    try:
        v = float(decay)
    except (TypeError, ValueError):
        raise TypeError(f"decay must be a number in [0, 1]; got {decay!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"decay must lie in [0, 1]; got {decay!r}")
    return v


def same_features(a_name, a, b_name, b):
    """Two arrays with the same feature size d (their last axis)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{a_name} and {b_name} must have the same feature size d: {a_name} "
                         f"has shape {a.shape}, {b_name} has shape {b.shape}")


def member_lists(name, idx, length, deferred=False):
    """A (..., c, w) membership array: entries in [-1, length), no position repeated inside
    one cluster's list.  Returns it as int64.

    deferred=True checks the type and shape only (and the range of unsigned entries, which
    the cast to int64 could wrap to -1): for a caller whose kernel validates the lists
    itself and that runs this full check for the message when the kernel rejects them
    (`kernel_checked_lists`).  Sorting every list to find a repeat costs ~1 % of a routing
    forward at n = 16384."""
    arr = as_array(name, idx)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of positions (-1 = empty slot); "
                        f"got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{name} must have shape (..., n_clusters, size); got {arr.shape}")
    if not deferred or arr.dtype.kind == "u":
        bad = (arr < -1) | (arr >= length)    # before the cast: uint64 must not wrap to -1
        if bad.any():
            raise ValueError(f"{name} has entries outside [-1, {length}): first offender "
                             f"{int(arr[bad][0])} at {tuple(int(i) for i in np.argwhere(bad)[0])}")
    arr = arr.astype(np.int64, copy=False)
    if not deferred and arr.shape[-1] > 1:
        s = np.sort(arr, axis=-1)
        dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
        if dup.any():
            where = tuple(int(i) for i in np.argwhere(dup)[0][:-1])
            raise ValueError(f"{name} repeats a position inside the list of cluster {where}")
    return arr


def kernel_checked_lists(call, lists):
    """call() -> its result, for a kernel given membership lists checked with
    member_lists(..., deferred=True): the kernel rejects an entry out of range or repeated
    with a bare ValueError, upon which the full check of `lists` ((name, array, length)
    triples) raises its own message, naming the list, the cluster and the entry; if they
    pass it, the kernel's error stands."""
    try:
        return call()
    except ValueError:
        for name, arr, length in lists:
            member_lists(name, arr, length)
        raise


def routing_heads(heads, local_heads, built_for):
    """A routing layer's heads: local_heads of them local, the rest routed; `built_for` is
    the number of routing heads its centroids were made for (None: not made yet)."""
    if local_heads > heads:
        raise ValueError(f"local_heads ({local_heads}) exceeds the number of heads ({heads})")
    if built_for is not None and built_for != heads - local_heads:
        raise ValueError(f"the layer was built for {built_for} routing heads; "
                         f"got {heads - local_heads}")


def same_leading_axes(q_shape, k_shape):
    """q and k routed together need the same (batch, heads) axes."""
    if tuple(q_shape[:-2]) != tuple(k_shape[:-2]):
        raise ValueError("q and k must have the same leading (batch, heads) axes for the "
                         f"routing decisions; got q {tuple(q_shape)} and k {tuple(k_shape)}")


def combiner_block(plan, block, explicit=False):
    """A Combiner plan's block: none for 'logsparse' (its regions are dyadic spans), else
    an integer >= 1, or None for the default unless `explicit` (decoding, whose default
    would depend on the final length).  Returns the block (None when left to default)."""
    if plan == "logsparse":
        if block is not None:
            raise ValueError("block is not used by plan='logsparse' (its regions are dyadic "
                             f"spans); pass block=None, got {block!r}")
        return None
    if block is None:
        if explicit:
            raise ValueError(f"decoding plan={plan!r} needs an explicit block (the default "
                             "⌈√n⌉ depends on the final sequence length)")
        return None
    return integer("block", block, low=1)


def core_shape(name, shape, expected, axes):
    """An array whose core axes (named `axes`, e.g. "n_clusters, d") must be `expected`."""
    if tuple(shape[-len(expected):]) != tuple(expected) or len(shape) < len(expected):
        raise ValueError(f"{name} must have shape (..., {axes}) = (..., "
                         f"{', '.join(map(str, expected))}); got {tuple(shape)}")


def disjoint_outputs(outs):
    """out= arrays that share no memory (their results would depend on the order the kernel
    writes them in).  Returns them."""
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            if np.shares_memory(a, b):
                raise ValueError("the out arrays must not overlap one another")
    return outs


def out_tuple(out, count, what):
    """out= given as a tuple of `count` arrays (`what` names them)."""
    if not isinstance(out, tuple) or len(out) != count:
        raise TypeError(f"out must be a {what} tuple")
    return out


def some_clusters(centroids):
    """centroids (..., c, d) with c >= 1."""
    if centroids.shape[-2] < 1:
        raise ValueError(f"centroids must hold at least one cluster; got shape {centroids.shape}")


def lsh_planes(planes, d, max_bits):
    """LSH planes (..., bits, d + 1): 1 <= bits <= max_bits, a normal and a threshold each."""
    bits = planes.shape[-2]
    if not 1 <= bits <= max_bits:
        raise ValueError(f"planes must have between 1 and {max_bits} rows (one per bit); "
                         f"got {bits} (shape {planes.shape})")
    if planes.shape[-1] != d + 1:
        raise ValueError(f"planes must have d + 1 = {d + 1} columns (normal vector, then "
                         f"threshold) for x with d = {d}; got shape {planes.shape}")


def same_cluster_count(q_idx, k_idx):
    """Query and key member lists of the same clusters."""
    if q_idx.shape[-2] != k_idx.shape[-2]:
        raise ValueError(f"q_idx and k_idx must list the same number of clusters: "
                         f"{q_idx.shape[-2]} vs {k_idx.shape[-2]}")


def given_or_saved(func, name, value):
    """A backward keyword that has no default: given, or from the forward's saved dict."""
    if value is None:
        raise TypeError(f"{func} needs {name} (or the forward's saved statistics, "
                        "return_saved=True)")
    return value


def saved_from(func, improved, forward_topk):
    """The plain clustered backward takes only the plain forward's saved statistics, the
    improved backward only the improved forward's (forward_topk: the forward's topk)."""
    if (forward_topk is not None) != improved:
        source = "improved_clustered_attention" if forward_topk else "clustered_attention"
        raise ValueError(f"{func}: the saved statistics come from {source} (topk="
                         f"{forward_topk!r}); use {source}_backward")


def some_rows(what, **shapes):
    """Arrays (name=shape) whose sequence axis (-2) must not be empty for `what`."""
    if any(shape[-2] == 0 for shape in shapes.values()):
        got = " and ".join(f"{name} of shape {tuple(shape)}" for name, shape in shapes.items())
        raise ValueError(f"{what}; got {got}")


def self_attention_layout(q, k):
    """Combiner: as many keys as queries, at least one of each."""
    if k.shape[-2] != q.shape[-2]:
        raise ValueError(f"combiner_attention needs as many keys as queries (n == m, a "
                         f"self-attention layout): q has n={q.shape[-2]} (shape {q.shape}), "
                         f"k has m={k.shape[-2]} (shape {k.shape})")
    if q.shape[-2] < 1:
        raise ValueError(f"combiner_attention needs a sequence of at least 1 position; got "
                         f"q of shape {q.shape}")


def forward_statistic(name, shape, expected, core=None):
    """A saved statistic of the forward (its output or lse), with the forward's full shape;
    `core` describes its core axes in the message, e.g. "(..., n)"."""
    if tuple(shape) != tuple(expected):
        described = f"{core} = {tuple(expected)}" if core else f"{tuple(expected)}"
        raise ValueError(f"{name} must have shape {described} (the forward's {name}); "
                         f"got {tuple(shape)}")


def broadcast_heads(q, k, v):
    """The number of heads (axis -3) q, k and v broadcast to."""
    try:
        return np.broadcast_shapes(*((x.shape[-3],) for x in (q, k, v)))[0]
    except ValueError:
        raise ValueError(f"q, k and v must have the same number of heads (axis -3), or 1; "
                         f"got {q.shape[-3]}, {k.shape[-3]} and {v.shape[-3]}") from None


# ------------------------------------------------------------------ decoding caches
def decode_step(q, k, v, first_step, tokens=None):
    """One decoding step's q, k, v: one new token each, shaped like the first step's
    (first_step: (batch, d, e), or None at the first step: then q, k, v must agree).
    tokens: a prompt's length (q's), which k and v must share, for a whole prompt
    checked before any of it is fed."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if tokens is None and a.shape[-2] != 1:
            raise ValueError(f"{name} must hold one new token per sequence, shape (..., 1, "
                             f"features); got {a.shape}")
        if tokens is not None and a.shape[-2] != tokens:
            raise ValueError(f"{name} must hold the prompt's {tokens} tokens per sequence, "
                             f"as q does, shape (..., {tokens}, features); got {a.shape}")
    if first_step is None:
        if q.shape[:-2] != k.shape[:-2] or q.shape[:-2] != v.shape[:-2] or \
                k.shape[-1] != q.shape[-1]:
            raise ValueError(f"q, k, v must have the same leading axes and q, k the same d; "
                             f"got {q.shape}, {k.shape}, {v.shape}")
        return
    batch, d, e = first_step
    n = 1 if tokens is None else tokens
    what = "the first step's" if tokens is None else f"the cache's, with the prompt's {n} tokens"
    for name, a, f in (("q", q, d), ("k", k, d), ("v", v, e)):
        if a.shape != batch + (n, f):
            raise ValueError(f"{name} must have shape {batch + (n, f)} like {what}; "
                             f"got {a.shape}")


def cache_dtype(held, got):
    """A cache keeps the float type of its first step."""
    if got != held:
        raise TypeError(f"this cache holds {held} tokens; got {got}")


def bool_array(name, a):
    """A boolean array (a selection of sequences, ...)."""
    a = np.asarray(a)
    if a.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array; got dtype {a.dtype}")
    return a


def decodable_routing_layer(layer):
    """A RoutingAttention layer that token-by-token decoding can follow: causal, argmax
    membership, an explicit window for its local heads."""
    if layer.membership != "argmax" or not layer.causal:
        raise ValueError("RoutingCache decodes a causal layer with membership='argmax' "
                         f"(got membership={layer.membership!r}, causal={layer.causal}); "
                         "balanced top-w membership is not causal and cannot be decoded")
    if layer.local_heads and layer.window is None:
        raise ValueError("RoutingCache needs the layer's window set for its local heads "
                         "(the default n // n_clusters depends on the final length)")


def decoding_heads(q_shape, local_heads, centroids):
    """q (..., heads, 1, d) for a routing layer with local_heads local heads and routing
    centroids (heads - local_heads, c, d) (None: never run).  Returns the routing heads."""
    if len(q_shape) < 3:
        raise ValueError(f"q must have shape (..., heads, 1, d); got {q_shape}")
    heads = q_shape[-3]
    routing = heads - local_heads
    if routing > 0 and centroids is None:
        raise ValueError("RoutingCache needs the layer's centroids: run the layer on a "
                         "batch first or set layer.centroids")
    if routing < 0 or (routing and centroids.shape[0] != routing):
        raise ValueError(f"the layer has {local_heads} local heads and "
                         f"{0 if centroids is None else centroids.shape[0]} "
                         f"routing heads; got {heads} heads")
    return routing


def rank_at_least(name, shape, axes):
    """An array (any framework's) whose shape ends in the named core `axes`, e.g.
    ("heads", "sequence", "feature")."""
    if len(shape) < len(axes):
        raise ValueError(f"{name} must have shape (..., {', '.join(axes)}); got {tuple(shape)}")


def min_dims(name, shape, count):
    """An array of at least `count` dimensions."""
    if len(shape) < count:
        raise ValueError(f"{name} must have at least {count} dimension(s); got shape "
                         f"{tuple(shape)}")



# ------------------------------------------------------------------ pair terms
DROP_ONE = 1 << 24     # dropout probabilities are quantised to multiples of 2^-24


def dropout_args(p, seed):
    """dropout_p, dropout_seed -> (p, seed, threshold): p a float in [0, 1), quantised to
    threshold / 2^24; seed an int in [0, 2^63) (required when p > 0; may stay None when
    p == 0)."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (numbers.Real, np.floating)):
        raise TypeError(f"dropout_p must be a float in [0, 1); got {p!r}")
    p = float(p)
    if not 0 <= p < 1:
        raise ValueError(f"dropout_p must be in [0, 1); got {p}")
    threshold = int(np.floor(p * DROP_ONE + 0.5))
    if threshold >= DROP_ONE:
        raise ValueError(f"dropout_p={p} rounds to 1 at the 2^-24 resolution of the dropout mask")
    if threshold == 0:
        return p, (None if seed is None else integer("dropout_seed", seed, 0)), 0
    if seed is None:
        raise ValueError("dropout_p > 0 needs dropout_seed (an int): the backward regenerates "
                         "the dropout mask from it")
    return p, integer("dropout_seed", seed, 0), threshold


def rel_bias_array(rel_bias, n, m, dtype):
    """The relative position bias: a float array (..., n + m - 1), entry j - i + n - 1 for
    query i and key j, contiguous in its last axis; None stays None."""
    if rel_bias is None:
        return None
    a = as_matrix("rel_bias", rel_bias, dtype, min_rank=1)
    if a.shape[-1] != n + m - 1:
        raise ValueError(f"rel_bias must have n + m - 1 = {n + m - 1} entries in its last axis "
                         f"(one per offset j - i from {-(n - 1)} to {m - 1}); got shape {a.shape}")
    if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        a = np.ascontiguousarray(a)
    return a


def bias_table(table, name="table"):
    """A learned bucket table (..., buckets) of at least one bucket."""
    a = as_matrix(name, table, float_dtype(**{name: table}), min_rank=1)
    if a.shape[-1] < 1:
        raise ValueError(f"{name} needs at least one bucket in its last axis; got shape {a.shape}")
    return a


def bucket_layout(num_buckets, max_distance, bidirectional):
    """T5 bucketing parameters: enough buckets for an exact half and a log half."""
    num_buckets = integer("num_buckets", num_buckets, 1)
    max_distance = integer("max_distance", max_distance, 1)
    half = num_buckets // 2 if flag("bidirectional", bidirectional) else num_buckets
    if half < 2:
        raise ValueError(f"num_buckets={num_buckets} leaves fewer than 2 buckets per direction")
    if max_distance <= half // 2:
        raise ValueError(f"max_distance must exceed {half // 2} (the exactly bucketed "
                         f"distances); got {max_distance}")
    return num_buckets, max_distance, bool(bidirectional)


def bias_sources(count):
    """relative_bias needs at least one of alibi and table."""
    if count == 0:
        raise ValueError("relative_bias needs alibi, table or both")


def no_bias_without_topk(rel_bias):
    """Plain clustered attention takes no position bias (a centroid has no position)."""
    if rel_bias is not None:
        raise TypeError("rel_bias needs the improved form (topk): plain clustered attention "
                        "attends once per centroid, which has no position")


def pair_terms_without_lse(return_lse):
    """The torch bridge does not return the lse of calls with dropout or a position bias."""
    if return_lse:
        raise ValueError("return_lse is not available with dropout_p > 0 or rel_bias in the "
                         "torch bridge (its gradient would not be propagated)")
