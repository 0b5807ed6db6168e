"""Terms on the attention weights of the pairs a method attends directly: attention
dropout and a relative position bias.

Every attention function takes

* ``dropout_p`` and ``dropout_seed``: after the softmax, each weight p_ij of query i and
  key j is dropped (set to 0) with probability ``dropout_p`` and the rest are multiplied
  by 1 / (1 - dropout_p).  The decision for (i, j) in problem b (the flat index over the
  broadcast batch axes) is a counter-based hash of (seed, b, i, j): SplitMix64 (see
  `dropout_keys` and csrc/common.h), so it is the same for any thread count and tile order,
  the backward regenerates it instead of storing a mask, and `routing_attention.reference`
  builds the same mask densely.  dropout_p is quantised to a multiple of 2^-24.
* ``rel_bias``: an array (..., n + m - 1) added to the logit of (i, j) as
  ``rel_bias[..., j - i + n - 1]`` (after `scale` multiplies q·k, before the softmax).
  Build it from ALiBi slopes and/or a learned T5-style bucket table with `relative_bias`;
  the backward returns its gradient, which `relative_bias_backward` maps back to the
  slopes and the table.
"""
import numpy as np

from ._checks import (as_matrix, batch_shape, bias_sources, bias_table, bucket_layout,
                      dropout_args, float_dtype, integer, rel_bias_array)

__all__ = ["alibi_slopes", "t5_buckets", "relative_bias", "relative_bias_backward",
           "dropout_keys"]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix_final(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_keys(seed, batch):
    """The dropout stream of every problem of a batch (uint64, shape `batch`): problem b
    (flat C-order index) gets the (b + 1)-th output of SplitMix64 seeded with `seed`."""
    count = int(np.prod(batch, dtype=np.int64))
    b = np.arange(1, count + 1, dtype=np.uint64)      # 1-d: array arithmetic wraps silently
    return _splitmix_final(np.full(count, seed, np.uint64) + b * GOLDEN).reshape(batch)


def _operands(dtype, batch, threshold, seed, rel_bias):
    """(drop, drop_key, bias) operands of the attention gufuncs."""
    keys = dropout_keys(seed, batch) if threshold else np.uint64(0)
    bias = rel_bias if rel_bias is not None else np.empty(0, dtype)
    return np.int64(threshold), keys, bias


def _checked(dtype, cores, n, m, dropout_p, dropout_seed, rel_bias):
    """A call's pair terms, checked: (cores with rel_bias added, the broadcast batch, the
    gufunc operands (drop, drop_key, bias), the resolved terms (dropout_p, dropout_seed,
    rel_bias), which `pair_record` turns into the saved keywords).
    cores: {name: (array, core rank)} of the call's other operands."""
    p, seed, threshold = dropout_args(dropout_p, dropout_seed)
    rel_bias = rel_bias_array(rel_bias, n, m, dtype)
    if rel_bias is not None:
        cores = dict(cores, rel_bias=(rel_bias, 1))
    batch = batch_shape(**cores)
    return cores, batch, _operands(dtype, batch, threshold, seed, rel_bias), (p, seed, rel_bias)


# the operands of a call without pair terms, per dtype char
NO_PAIRS = {c: (np.int64(0), np.uint64(0), np.empty(0, c)) for c in "fd"}


def alibi_slopes(heads):
    """ALiBi's head slopes (Press et al. 2022): the geometric sequence 2^(-8h/H), h = 1..H,
    for H a power of two; otherwise those of the next lower power of two followed by every
    other slope of the next higher one, as the paper's code does.  float64, shape (heads,)."""
    heads = integer("heads", heads, low=1)

    def powers(h):
        return 2.0 ** (-8.0 * np.arange(1, h + 1) / h)
    low = 1 << (heads.bit_length() - 1)
    if low == heads:
        return powers(heads)
    return np.concatenate([powers(low), powers(2 * low)[0::2][: heads - low]])


def t5_buckets(offsets, num_buckets=32, max_distance=128, bidirectional=True):
    """T5's relative position buckets (Raffel et al. 2020) of key-minus-query offsets.

    Half the buckets (per direction when `bidirectional`) hold the distances 0, 1, ...
    exactly; the rest cover distances up to `max_distance` in logarithmic steps, and
    farther ones share the last bucket.  Causal (not bidirectional): keys after the query
    share bucket 0 with the query itself.  Returns int64 buckets in [0, num_buckets)."""
    num_buckets, max_distance, bidirectional = bucket_layout(num_buckets, max_distance,
                                                             bidirectional)
    offsets = np.asarray(offsets, dtype=np.int64)
    if bidirectional:
        half = num_buckets // 2
        base = np.where(offsets > 0, half, 0)
        dist = np.abs(offsets)
    else:
        half, base, dist = num_buckets, 0, np.maximum(-offsets, 0)
    exact = half // 2
    with np.errstate(divide="ignore"):
        far = exact + np.floor(np.log(np.maximum(dist, 1) / exact)
                               / np.log(max_distance / exact) * (half - exact))
    far = np.minimum(far, half - 1).astype(np.int64)
    return base + np.where(dist < exact, dist, far)


def _offsets(n, m):
    return np.arange(-(n - 1), m, dtype=np.int64)   # j - i for entry j - i + n - 1


def relative_bias(n, m, *, alibi=None, table=None, max_distance=128, bidirectional=True):
    """The `rel_bias` argument for n queries and m keys: (..., n + m - 1).

    alibi : array (...,), optional
        ALiBi slopes, axes like the batch axes (e.g. `alibi_slopes(H)`, shape (H,), for
        a (B, H, n, d) layout); adds -slope·|j - i|.
    table : array (..., num_buckets), optional
        A learned bias per T5 bucket (`t5_buckets` with this max_distance and
        bidirectional); adds table[bucket(j - i)].
    Both may be given (they add).  The result's leading axes are those of alibi and
    table broadcast together."""
    offsets = _offsets(n, m)
    parts = []
    if alibi is not None:
        slopes = as_matrix("alibi", alibi, float_dtype(alibi=alibi), min_rank=0)
        parts.append(-slopes[..., None] * np.abs(offsets).astype(slopes.dtype))
    if table is not None:
        t = bias_table(table)
        parts.append(t[..., t5_buckets(offsets, t.shape[-1], max_distance, bidirectional)])
    bias_sources(len(parts))
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def relative_bias_backward(drel_bias, n, m, *, alibi=None, table=None, max_distance=128,
                           bidirectional=True):
    """Gradients of `relative_bias` from the gradient of its result (an attention
    backward's d rel_bias): (dalibi, dtable), each None where that input was None, with
    the input's shape (summed over broadcast axes)."""
    from ._checks import unbroadcast
    g = np.asarray(drel_bias)
    offsets = _offsets(n, m)
    dalibi = dtable = None
    if alibi is not None:
        shape = np.shape(alibi)
        dalibi = unbroadcast(-(g * np.abs(offsets)).sum(axis=-1), shape)
    if table is not None:
        t = bias_table(table)
        onehot = t5_buckets(offsets, t.shape[-1], max_distance, bidirectional)[:, None] == \
            np.arange(t.shape[-1])[None, :]
        dtable = unbroadcast(g @ onehot.astype(g.dtype), t.shape)
    return dalibi, dtable
