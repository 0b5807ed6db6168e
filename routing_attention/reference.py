"""Dense NumPy reference of every operation: the oracle the C kernels are tested against.

Plain and obviously correct rather than fast: each function builds the explicit n×m
softmax matrix.  Everything is computed in float64 whatever the input dtype, and the
results are float64.  Shapes and keywords follow the public functions exactly.
"""
import numpy as np

from ._checks import unbroadcast

__all__ = ["attention", "attention_backward", "masked_softmax", "routing_attention",
           "routing_attention_backward", "local_attention", "local_attention_backward",
           "combiner_attention", "combiner_attention_backward", "combiner_attention_weights",
           "combiner_plan",
           "SplitMix64", "spherical_kmeans", "assign_clusters", "update_centroids",
           "commitment_loss", "top_members", "members_from_labels", "lsh_hash",
           "hamming_kmeans",
           "clustered_attention", "clustered_attention_backward",
           "improved_clustered_attention", "improved_clustered_attention_backward",
           "improved_clustered_selection"]


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def masked_softmax(logits, visible):
    """Row softmax of `logits` over the entries where `visible` is True.

    Returns (p, lse); a row with nothing visible gets p = 0 and lse = -inf; a row with a
    NaN among its visible logits gets NaN (p and lse), as the kernels give.
    """
    s = np.where(visible, logits, -np.inf)
    mx = s.max(axis=-1, keepdims=True, initial=-np.inf)   # a row of no keys at all too
    mx = np.where(np.isneginf(mx), 0.0, mx)
    e = np.where(visible, np.exp(s - mx), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    seen = ~(total <= 0)                                  # NaN totals stay NaN rows
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
    if scale is not None:
        return float(scale)
    return 1.0 / np.sqrt(d) if d > 0 else 1.0             # d = 0: every logit is 0


# ------------------------------------------------------------------ pair terms
def dropout_factor(dropout_p, dropout_seed, batch, qpos, kpos):
    """The dropout factor of every (query, key) pair, (batch..., len(qpos), len(kpos)):
    1/(1 - p') where kept, 0 where dropped, p' = dropout_p rounded to a multiple of 2^-24.
    Problem b (flat index over `batch`) draws from the (b + 1)-th SplitMix64 output for
    dropout_seed; pair (i, j) keeps iff the top 24 bits of the SplitMix64 finaliser of
    key + (i·2^32 + j)·0x9E3779B97F4A7C15 are at least round(p·2^24)."""
    thr = int(np.floor(dropout_p * 2**24 + 0.5))
    out = np.ones(tuple(batch) + (len(qpos), len(kpos)))
    if thr == 0:
        return out
    rng = SplitMix64(dropout_seed)
    i = np.asarray(qpos, np.int64).astype(np.uint64)[:, None]   # row -1 - c wraps, as in C
    j = np.asarray(kpos, np.uint64)[None, :]
    for b in _problems(batch):
        z = np.uint64(rng.next()) + ((i << np.uint64(32)) + j) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        out[b] = np.where((z >> np.uint64(40)) >= thr, 2**24 / (2**24 - thr), 0.0)
    return out


def bias_matrix(rel_bias, n, m):
    """rel_bias (..., n + m - 1) as the (..., n, m) logit offsets, entry (i, j) =
    rel_bias[..., j - i + n - 1]; 0 when rel_bias is None."""
    if rel_bias is None:
        return 0.0
    idx = np.arange(m)[None, :] - np.arange(n)[:, None] + n - 1
    return np.asarray(rel_bias, np.float64)[..., idx]


def bias_matrix_grad(dlogits, n, m, shape):
    """The gradient of rel_bias (of `shape`) from that of the logits (..., n, m)."""
    idx = (np.arange(m)[None, :] - np.arange(n)[:, None] + n - 1).ravel()
    flat = dlogits.reshape(dlogits.shape[:-2] + (n * m,))
    g = np.zeros(dlogits.shape[:-2] + (n + m - 1,))
    for t in range(n + m - 1):
        g[..., t] = flat[..., idx == t].sum(axis=-1)
    return unbroadcast(g, shape)


def _dense_pairs(q, k, v, dropout_p, dropout_seed, rel_bias):
    n, m = q.shape[-2], k.shape[-2]
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                np.shape(rel_bias)[:-1] if rel_bias is not None else ())
    return bias_matrix(rel_bias, n, m), dropout_factor(dropout_p, dropout_seed, batch,
                                                       np.arange(n), np.arange(m))


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, dropout_p=0.0,
              dropout_seed=None, rel_bias=None, return_lse=False):
    """(softmax(scale · q kᵀ + bias + mask) ∘ dropout) v with the explicit (…, n, m)
    probability matrix."""
    q, k, v = _f64(q, k, v)
    bias, keep = _dense_pairs(q, k, v, dropout_p, dropout_seed, rel_bias)
    s = _scale(scale, q.shape[-1]) * (q @ np.swapaxes(k, -1, -2)) + bias
    p, lse = masked_softmax(s, _dense_visible(q.shape[-2], k.shape[-2], causal, key_mask))
    out = (p * keep) @ v
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, *, causal=False, key_mask=None, scale=None, dropout_p=0.0,
                       dropout_seed=None, rel_bias=None, lse=None, output=None):
    """(dq, dk, dv [, drel_bias]) of `attention` by the textbook softmax Jacobian."""
    dout, q, k, v = _f64(dout, q, k, v)
    sc = _scale(scale, q.shape[-1])
    bias, keep = _dense_pairs(q, k, v, dropout_p, dropout_seed, rel_bias)
    s = sc * (q @ np.swapaxes(k, -1, -2)) + bias
    p, _ = masked_softmax(s, _dense_visible(q.shape[-2], k.shape[-2], causal, key_mask))
    dv = np.swapaxes(p * keep, -1, -2) @ dout
    dp = (dout @ np.swapaxes(v, -1, -2)) * keep
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = sc * (ds @ k)
    dk = sc * (np.swapaxes(ds, -1, -2) @ q)
    grads = unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)
    if rel_bias is None:
        return grads
    return grads + (bias_matrix_grad(ds, q.shape[-2], k.shape[-2], np.shape(rel_bias)),)


# ------------------------------------------------------------------ routing attention
def _batched(arrays_and_core):
    """Broadcast the batch axes of (array, core_rank) pairs; yields per-index views."""
    shape = np.broadcast_shapes(*(a.shape[: a.ndim - r] for a, r in arrays_and_core))
    full = [np.broadcast_to(a, shape + a.shape[a.ndim - r:]) for a, r in arrays_and_core]
    return shape, full


def _cluster_problems(q, k, q_idx, k_idx, causal, exclude_self, sc, bias=0.0, keep=None):
    """For one problem: per cluster (queries, keys, probabilities p, lse, dropout factor)
    with the explicit visibility matrix (exclude_self falls back to self when alone);
    bias (n, m) and keep (n, m) are the problem's pair terms (see bias_matrix,
    dropout_factor)."""
    out = []
    for qs_, ks_ in zip(q_idx, k_idx):
        qs, ks = qs_[qs_ >= 0], ks_[ks_ >= 0]
        vis = np.ones((len(qs), len(ks)), dtype=bool)
        if causal:
            vis &= ks[None, :] <= qs[:, None]
        if exclude_self:
            is_self = ks[None, :] == qs[:, None]
            alone = ~(vis & ~is_self).any(axis=1, keepdims=True)
            vis &= ~is_self | alone
        b = bias[np.ix_(qs, ks)] if np.ndim(bias) else bias
        p, lse = masked_softmax(sc * (q[qs] @ k[ks].T) + b, vis)
        f = keep[np.ix_(qs, ks)] if keep is not None else np.ones_like(p)
        out.append((qs, ks, p, lse, f))
    return out


def _routing_pairs(q, k, v, q_idx, k_idx, dropout_p, dropout_seed, rel_bias):
    """The batch shape and per-problem pair terms of a routing call."""
    n, m = q.shape[-2], k.shape[-2]
    extra = [(np.asarray(rel_bias, np.float64), 1)] if rel_bias is not None else []
    shape, _ = _batched([(q, 2), (k, 2), (v, 2), (q_idx, 2), (k_idx, 2)] + extra)
    bias = np.broadcast_to(bias_matrix(rel_bias, n, m), shape + (n, m))
    keep = dropout_factor(dropout_p, dropout_seed, shape, np.arange(n), np.arange(m))
    return shape, bias, keep


def routing_attention(q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False, merge="mean",
                      scale=None, dropout_p=0.0, dropout_seed=None, rel_bias=None,
                      return_lse=False):
    """Per cluster a dense masked softmax; per token a mean or log-sum-exp merge."""
    q, k, v = _f64(q, k, v)
    q_idx, k_idx = np.asarray(q_idx, np.int64), np.asarray(k_idx, np.int64)
    sc = _scale(scale, q.shape[-1])
    shape, bias, keep = _routing_pairs(q, k, v, q_idx, k_idx, dropout_p, dropout_seed, rel_bias)
    qb, kb, vb, qib, kib = (np.broadcast_to(a, shape + a.shape[-2:])
                            for a in (q, k, v, q_idx, k_idx))
    n, e = q.shape[-2], v.shape[-1]
    out = np.zeros(shape + (n, e))
    lse_out = np.full(shape + (n,), -np.inf)
    for b in np.ndindex(*shape):
        rows = [[] for _ in range(n)]            # (o, lse) per cluster containing the token
        for qs, ks, p, lse, f in _cluster_problems(qb[b], kb[b], qib[b], kib[b], causal,
                                                   exclude_self, sc, bias[b], keep[b]):
            o = (p * f) @ vb[b][ks]
            for r, i in enumerate(qs):
                rows[i].append((o[r], lse[r]))
        for i, items in enumerate(rows):
            if not items:
                continue
            ls = np.array([l for _, l in items])
            big = ls.max()
            L = -np.inf if np.isneginf(big) else big + np.log(np.exp(ls - big).sum())
            lse_out[b + (i,)] = L
            if merge == "mean":
                out[b + (i,)] = np.mean([o for o, _ in items], axis=0)
            elif not np.isneginf(L):
                out[b + (i,)] = sum(np.exp(l - L) * o for o, l in items)
    return (out, lse_out) if return_lse else out


def routing_attention_backward(dout, q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False,
                               merge="mean", scale=None, dropout_p=0.0, dropout_seed=None,
                               rel_bias=None):
    """Per cluster the softmax Jacobian, with the gradient each cluster receives from the
    merge: dout/count (mean) or dout with the global normaliser (lse)."""
    dout, q, k, v = _f64(dout, q, k, v)
    q_idx, k_idx = np.asarray(q_idx, np.int64), np.asarray(k_idx, np.int64)
    sc = _scale(scale, q.shape[-1])
    pair_kw = dict(dropout_p=dropout_p, dropout_seed=dropout_seed, rel_bias=rel_bias)
    out, L = routing_attention(q, k, v, q_idx, k_idx, causal=causal, exclude_self=exclude_self,
                               merge=merge, scale=scale, return_lse=True, **pair_kw)
    fshape, bias, keep = _routing_pairs(q, k, v, q_idx, k_idx, **pair_kw)
    shape = np.broadcast_shapes(fshape, dout.shape[:-2])
    qb, kb, vb, qib, kib, gb = (np.broadcast_to(a, shape + a.shape[-2:])
                                for a in (q, k, v, q_idx, k_idx, dout))
    bias, keep = (np.broadcast_to(a, shape + a.shape[-2:]) for a in (bias, keep))
    ob, Lb = np.broadcast_to(out, shape + out.shape[-2:]), np.broadcast_to(L, shape + L.shape[-1:])
    dq, dk, dv = (np.zeros(shape + a.shape[-2:]) for a in (q, k, v))
    dlogits = np.zeros(shape + (q.shape[-2], k.shape[-2]))
    for b in np.ndindex(*shape):
        count = np.zeros(q.shape[-2])
        for qs_ in qib[b]:
            count[qs_[qs_ >= 0]] += 1
        for qs, ks, p, lse, f in _cluster_problems(qb[b], kb[b], qib[b], kib[b], causal,
                                                   exclude_self, sc, bias[b], keep[b]):
            if merge == "mean":
                g = gb[b][qs] / count[qs][:, None]
                o = (p * f) @ vb[b][ks]
            else:
                finite = np.isfinite(Lb[b][qs])
                with np.errstate(invalid="ignore"):
                    shift = np.where(finite, lse - Lb[b][qs], 0)
                p = p * np.where(finite, np.exp(shift), 0)[:, None]
                g, o = gb[b][qs], ob[b][qs]
            dv[b][ks] += (p * f).T @ g
            dp = (g @ vb[b][ks].T) * f
            ds = p * (dp - (g * o).sum(axis=1, keepdims=True))
            dq[b][qs] += sc * ds @ kb[b][ks]
            dk[b][ks] += sc * ds.T @ qb[b][qs]
            dlogits[b][np.ix_(qs, ks)] += ds
    grads = unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)
    if rel_bias is None:
        return grads
    return grads + (bias_matrix_grad(dlogits, q.shape[-2], k.shape[-2], np.shape(rel_bias)),)


def _local_visible(n, m, window, causal):
    bi, bj = np.arange(n)[:, None] // window, np.arange(m)[None, :] // window
    vis = (bj >= bi - 1) & (bj <= bi + (0 if causal else 1))
    if causal:
        vis &= np.arange(m)[None, :] <= np.arange(n)[:, None]
    return vis


def local_attention(q, k, v, window, *, causal=False, scale=None, dropout_p=0.0,
                    dropout_seed=None, rel_bias=None):
    """Dense attention with the local block mask |block(i) - block(j)| <= 1
    (causal: block(j) in {block(i) - 1, block(i)} and j <= i)."""
    q, k, v = _f64(q, k, v)
    bias, keep = _dense_pairs(q, k, v, dropout_p, dropout_seed, rel_bias)
    vis = _local_visible(q.shape[-2], k.shape[-2], window, causal)
    p, _ = masked_softmax(_scale(scale, q.shape[-1]) * (q @ np.swapaxes(k, -1, -2)) + bias, vis)
    return (p * keep) @ v


def local_attention_backward(dout, q, k, v, window, *, causal=False, scale=None, dropout_p=0.0,
                             dropout_seed=None, rel_bias=None):
    """(dq, dk, dv [, drel_bias]) of `local_attention` by the softmax Jacobian."""
    dout, q, k, v = _f64(dout, q, k, v)
    sc = _scale(scale, q.shape[-1])
    bias, keep = _dense_pairs(q, k, v, dropout_p, dropout_seed, rel_bias)
    vis = _local_visible(q.shape[-2], k.shape[-2], window, causal)
    p, _ = masked_softmax(sc * (q @ np.swapaxes(k, -1, -2)) + bias, vis)
    dv = np.swapaxes(p * keep, -1, -2) @ dout
    dp = (dout @ np.swapaxes(v, -1, -2)) * keep
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    grads = (unbroadcast(sc * (ds @ k), q.shape), unbroadcast(sc * (np.swapaxes(ds, -1, -2) @ q), k.shape),
             unbroadcast(dv, v.shape))
    if rel_bias is None:
        return grads
    return grads + (bias_matrix_grad(ds, q.shape[-2], k.shape[-2], np.shape(rel_bias)),)


# ---------------------------------------------------------------------- Combiner (§4.3)
COMBINER_PLANS = ("fixed", "axial", "logsparse", "mixture")


def combiner_default_block(plan, n):
    """⌈√n⌉ for fixed, axial and mixture; logsparse has no block (None)."""
    return None if plan == "logsparse" else int(np.ceil(np.sqrt(n)))


def _dyadic_spans(i):
    """The spans [lo, hi) that tile [0, i): one per set bit l of i."""
    spans, l = [], 0
    while (i >> l) > 0:
        if (i >> l) & 1:
            spans.append((((i >> (l + 1)) << (l + 1)), ((i >> l) << l)))
        l += 1
    return spans


def combiner_plan(plan, n, block=None, causal=False):
    """Each query's support, straight from docs/design.md (Combiner).

    Returns a list over queries i of (direct, regions): direct is a list of key
    positions; each region is (kmem, qsrc, vmem, vid): the summary key is the max-pool of
    the keys in kmem, the summary value the softmax expectation of v over vmem under the
    region query, which is the max-pool of the queries in vmem (qsrc None) or q[qsrc];
    vid names the region (its summary weight's dropout column is -1 - vid): fixed, the
    block g; axial, the region query's position; logsparse, the span (dir, l, a) counted
    by direction, then level, then a; mixture, kind·(rows·M) + r·M + c with kind 0/1 the
    cells of column c above/below row r, 2/3 those of row r left/right of column c.
    """
    if plan not in COMBINER_PLANS:
        raise ValueError(f"plan must be one of {COMBINER_PLANS}; got {plan!r}")
    s = combiner_default_block(plan, n) if block is None else block
    levels = max(0, (n - 1).bit_length())                  # 2^levels >= n
    span_base = [[0] * levels for _ in range(2)]           # first vid of (dir, level)
    counted = 0
    for dir_ in range(2):
        for lev in range(levels):
            span_base[dir_][lev] = counted
            counted += -(-n // (2 << lev))

    def span_vid(dir_, lo, hi):
        lev = (hi - lo).bit_length() - 1
        return span_base[dir_][lev] + (lo >> (lev + 1))
    out = []
    for i in range(n):
        direct, regions = [], []
        if plan == "fixed":
            b = i // s
            direct = [j for j in range(b * s, min(n, b * s + s)) if not causal or j <= i]
            for g in range((n + s - 1) // s):
                if g < b or (not causal and g > b):
                    mem = list(range(g * s, min(n, g * s + s)))
                    regions.append((mem, None, mem, g))
        elif plan == "logsparse":
            direct = [i]
            for lo, hi in _dyadic_spans(i):
                regions.append((list(range(lo, hi)), None, list(range(lo, hi)),
                                span_vid(0, lo, hi)))
            if not causal:
                for lo, hi in _dyadic_spans(n - 1 - i):
                    mem = list(range(n - hi, n - lo))
                    regions.append((mem, None, mem, span_vid(1, lo, hi)))
        else:
            M = s
            nrows = (n + M - 1) // M
            r, c = divmod(i, M)
            row = lambda t: list(range(t * M, min(n, t * M + M)))          # noqa: E731
            col = lambda cc: list(range(cc, n, M))                         # noqa: E731
            if plan == "axial":
                direct = [j for j in row(r) if not causal or j <= i]
                for t in range(nrows):
                    if t < r or (not causal and t != r):
                        cells = row(t)
                        src = cells[min(c, len(cells) - 1)]
                        regions.append((cells, src, cells, src))
            else:   # mixture
                direct = [j for j in row(r) if not causal or j <= i]
                direct += [j for j in col(c) if j < i or (not causal and j > i)]
                for cc in range(M):
                    if cc == c:
                        continue
                    above = [j for j in col(cc) if j // M < r]
                    below = [j for j in col(cc) if j // M > r]
                    for kind, mem in ([(0, above)] if causal else [(0, above), (1, below)]):
                        if mem:
                            regions.append((mem, None, mem, kind * nrows * M + r * M + cc))
                for t in range(nrows):
                    if t < r or (not causal and t != r):
                        left = [j for j in row(t) if j % M < c]
                        right = [j for j in row(t) if j % M > c]
                        for kind, mem in ((2, left), (3, right)):
                            if mem:
                                regions.append((mem, None, mem, kind * nrows * M + t * M + c))
        out.append((sorted(direct), regions))
    return out


def _combiner_problem(q, k, sc, support, bias=None, keep=None, keep_summary=None):
    """Per query: direct keys, weights p (softmax over direct + summaries), their dropout
    factors f, and per region (kmem, vmem, region query q̂, pooled key k̂, the region
    distribution a).  bias (n, n), keep (n, n), keep_summary (n, regions): the problem's
    pair terms (None: none); the bias applies to direct keys only."""
    rows = []
    for i, (direct, regions) in enumerate(support):
        regs = []
        for kmem, qsrc, vmem, vid in regions:
            qh = q[vmem].max(axis=0) if qsrc is None else q[qsrc]
            kh = k[kmem].max(axis=0)
            a, _ = masked_softmax(sc * (k[vmem] @ qh), np.ones(len(vmem), dtype=bool))
            regs.append((kmem, qsrc, vmem, qh, kh, a))
        direct_logits = sc * (k[direct] @ q[i])
        if bias is not None:
            direct_logits = direct_logits + bias[i, direct]
        logits = np.concatenate([direct_logits, np.array([sc * (q[i] @ r[4]) for r in regs])])
        p, _ = masked_softmax(logits, np.ones(len(logits), dtype=bool))
        f = np.ones_like(p)
        if keep is not None:
            f = np.concatenate([keep[i, direct], keep_summary[i, [g[3] for g in regions]]])
        rows.append((direct, p, regs, f))
    return rows


def _combiner_pairs(support, shape, n, dropout_p, dropout_seed, rel_bias):
    """Per flat problem: (bias (n, n) or None, keep (n, n) or None, keep_summary)."""
    count = int(np.prod(shape, dtype=np.int64))
    bias = keep = keep_s = [None] * count          # a list of None: no term
    if rel_bias is not None:
        bias = np.broadcast_to(bias_matrix(rel_bias, n, n), shape + (n, n)).reshape(-1, n, n)
    if dropout_p:
        vids = 1 + max([g[3] for _, regions in support for g in regions], default=0)
        keep = dropout_factor(dropout_p, dropout_seed, shape, np.arange(n),
                              np.arange(n)).reshape(-1, n, n)
        keep_s = dropout_factor(dropout_p, dropout_seed, shape, np.arange(n),
                                -1 - np.arange(vids)).reshape(-1, n, vids)
    return bias, keep, keep_s


def _combiner_batched(q, k, v, dout=None, rel_bias=None):
    q, k, v = _f64(q, k, v)
    shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                () if dout is None else np.shape(dout)[:-2],
                                () if rel_bias is None else np.shape(rel_bias)[:-1])
    flat = lambda a: np.broadcast_to(a, shape + a.shape[-2:]).reshape((-1,) + a.shape[-2:])  # noqa: E731
    arrays = [flat(q), flat(k), flat(v)]
    if dout is not None:
        arrays.append(flat(np.asarray(dout, dtype=np.float64)))
    return shape, arrays


def combiner_attention_weights(q, k, *, plan="fixed", block=None, causal=False, scale=None,
                               dropout_p=0.0, dropout_seed=None, rel_bias=None):
    """The effective (…, n, n) attention matrix of Combiner: row i holds the direct
    weights of query i plus, for each region, its summary weight × the region's own
    distribution over its members (each weight of the query's softmax times its dropout
    factor).  combiner_attention(q, k, v) = weights @ v."""
    n = np.shape(q)[-2]
    sc = _scale(scale, np.shape(q)[-1])
    support = combiner_plan(plan, n, block, causal)
    shape, (qf, kf, _) = _combiner_batched(q, k, np.zeros(np.shape(k)[:-1] + (1,)),
                                           rel_bias=rel_bias)
    bias, keep, keep_s = _combiner_pairs(support, shape, n, dropout_p, dropout_seed, rel_bias)
    A = np.zeros((qf.shape[0], n, n))
    for b in range(qf.shape[0]):
        for i, (direct, p, regs, f) in enumerate(_combiner_problem(qf[b], kf[b], sc, support,
                                                                    bias[b], keep[b], keep_s[b])):
            pf = p * f
            A[b, i, direct] += pf[:len(direct)]
            for w, (_, _, vmem, _, _, a) in zip(pf[len(direct):], regs):
                A[b, i, vmem] += w * a
    return A.reshape(shape + (n, n))


def combiner_attention(q, k, v, *, plan="fixed", block=None, causal=False, scale=None,
                       dropout_p=0.0, dropout_seed=None, rel_bias=None):
    """Combiner attention through its explicit effective attention matrix."""
    v = np.asarray(v, dtype=np.float64)
    # the problems (and so the dropout masks) are numbered over v's batch axes too
    batch = np.broadcast_shapes(np.shape(q)[:-2], np.shape(k)[:-2], v.shape[:-2])
    q, k = (np.broadcast_to(x, batch + np.shape(x)[-2:]) for x in (q, k))
    A = combiner_attention_weights(q, k, plan=plan, block=block, causal=causal, scale=scale,
                                   dropout_p=dropout_p, dropout_seed=dropout_seed,
                                   rel_bias=rel_bias)
    return A @ v


def combiner_attention_backward(dout, q, k, v, *, plan="fixed", block=None, causal=False,
                                scale=None, dropout_p=0.0, dropout_seed=None, rel_bias=None):
    """(dq, dk, dv) of `combiner_attention`, differentiated by hand query by query:
    the shared softmax, each region's own softmax, and max-pooling (the gradient goes to
    the arg-max element; ties to the lowest position)."""
    n, d = np.shape(q)[-2:]
    sc = _scale(scale, d)
    support = combiner_plan(plan, n, block, causal)
    shape, (qf, kf, vf, gf) = _combiner_batched(q, k, v, dout, rel_bias)
    fshape = np.broadcast_shapes(np.shape(q)[:-2], np.shape(k)[:-2], np.shape(v)[:-2],
                                 () if rel_bias is None else np.shape(rel_bias)[:-1])
    # the pair terms belong to the forward's problems (fshape); dout may add axes
    bias, keep, keep_s = (
        x if x[0] is None else
        np.broadcast_to(x.reshape(fshape + x.shape[1:]), shape + x.shape[1:]).reshape(
            (-1,) + x.shape[1:])
        for x in _combiner_pairs(support, fshape, n, dropout_p, dropout_seed, rel_bias))
    dq, dk, dv = np.zeros_like(qf), np.zeros_like(kf), np.zeros_like(vf)
    dlogits = np.zeros((qf.shape[0], n, n))
    cols = np.arange(d)
    for b in range(qf.shape[0]):
        qb, kb, vb = qf[b], kf[b], vf[b]
        for i, (direct, p, regs, f) in enumerate(_combiner_problem(qb, kb, sc, support, bias[b],
                                                                    keep[b], keep_s[b])):
            g = gf[b, i]
            vals = [vb[j] for j in direct] + [r[5] @ vb[r[2]] for r in regs]
            keys = [kb[j] for j in direct] + [r[4] for r in regs]
            # out_i = Σ p_e f_e value_e with p = softmax(sc·q_i·key_e [+ bias])
            dp = np.array([g @ x for x in vals]) * f
            ds = p * (dp - p @ dp)
            dlogits[b, i, direct] += ds[:len(direct)]
            dq[b, i] += sc * sum(s_ * x for s_, x in zip(ds, keys))
            for t, j in enumerate(direct):
                dk[b, j] += sc * ds[t] * qb[i]
                dv[b, j] += p[t] * f[t] * g
            for t, (kmem, qsrc, vmem, qh, kh, a) in enumerate(regs, start=len(direct)):
                dkh, dvh = sc * ds[t] * qb[i], p[t] * f[t] * g
                # k̂ = max over kmem: gradient to the arg-max row of each column
                dk[b, np.asarray(kmem)[np.argmax(kb[kmem], axis=0)], cols] += dkh
                # v̂ = a @ v[vmem] with a = softmax(sc·q̂·k[vmem])
                dv[b, vmem] += np.outer(a, dvh)
                da = vb[vmem] @ dvh
                dt = a * (da - a @ da)
                dk[b, vmem] += sc * np.outer(dt, qh)
                dqh = sc * (dt @ kb[vmem])
                if qsrc is None:
                    dq[b, np.asarray(vmem)[np.argmax(qb[vmem], axis=0)], cols] += dqh
                else:
                    dq[b, qsrc] += dqh
    full = lambda a: a.reshape(shape + a.shape[-2:])  # noqa: E731
    grads = (unbroadcast(full(dq), np.shape(q)), unbroadcast(full(dk), np.shape(k)),
             unbroadcast(full(dv), np.shape(v)))
    if rel_bias is None:
        return grads
    return grads + (bias_matrix_grad(full(dlogits), n, n, np.shape(rel_bias)),)
# ------------------------------------------------------------------ routing decisions
# Same semantics as routing_attention.clustering, one problem at a time, with the same
# random stream (SplitMix64 below) so seeded results can be compared exactly.  Labels,
# member lists and codes are int64; float results are float64.

class SplitMix64:
    """The PRNG of the C kernels: splitmix64, one stream per problem seeded with `seed`."""

    MASK = 2**64 - 1

    def __init__(self, seed):
        self.state = int(seed) & self.MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def unit(self):
        """Uniform float in [0, 1) from the top 53 bits."""
        return (self.next() >> 11) * 2.0**-53


def _trials(c):
    """Candidates per greedy k-means++ step (as in scikit-learn): 2 + floor(ln c)."""
    return min(2 + int(np.log(c)), 32)


def _problems(batch):
    return list(np.ndindex(*batch)) if batch else [()]


def _argmax_labels(s):
    """Row argmax of s (n, c) ignoring NaN, ties to the lowest column; all-NaN rows -1."""
    ok = ~np.isnan(s)
    s = np.where(ok, s, -np.inf)
    best = ok & (s == s.max(axis=-1, keepdims=True))
    return np.where(ok.any(axis=-1), np.argmax(best, axis=-1), -1).astype(np.int64)


def _pow2_scaled(x):
    """x (..., d) with each row times 2^-e, the power of two that brings its largest |x_i|
    into [0.5, 1), so that no square overflows or underflows (a zero row, or one with a
    NaN or an infinity, is left as it is).  The scaling is exact: the scaled row's unit
    row has the bits of x / sqrt(Σx²) wherever that neither overflows nor underflows."""
    m = np.abs(x).max(axis=-1, keepdims=True, initial=0.0)       # d = 0: no scaling
    return np.ldexp(x, -np.frexp(np.where(np.isfinite(m), m, 0.0))[1])


def _mask_or_all(mask, shape):
    return np.ones(shape, dtype=bool) if mask is None else np.broadcast_to(mask, shape)


def _spherical_one(x, c, iters, seed, valid, init):
    n, d = x.shape
    x = _pow2_scaled(x)                                   # huge and tiny rows too
    with np.errstate(invalid="ignore", over="ignore"):     # rows with a NaN or an inf
        norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
        xn = np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0.0)   # zero stays zero
    valid = valid & np.isfinite(norm[:, 0])      # rows with a NaN or an inf take no part
    vidx = np.flatnonzero(valid)
    if init is not None:
        mu = np.array(init, dtype=np.float64)
    elif vidx.size == 0:
        return np.zeros((c, d))
    else:
        # greedy k-means++: first row uniform; then, per centroid, the best of
        # _trials(c) rows drawn ∝ D² (D = 1 - best cosine): least remaining total D²
        rng = SplitMix64(seed)
        mu = np.zeros((c, d))
        mu[0] = xn[vidx[rng.next() % vidx.size]]
        best = xn @ mu[0]

        def weight(cos):
            w = 1.0 - cos
            return np.where(valid & (w > 0), w * w, 0.0)

        for j in range(1, c):
            w = weight(best)
            if w.sum() > 0:
                cum = np.cumsum(w)
                cands = []
                for _ in range(_trials(c)):
                    pick = int(np.searchsorted(cum, rng.unit() * cum[-1], side="right"))
                    cands.append(pick if pick < n else int(np.flatnonzero(w > 0)[-1]))
                pots = [weight(np.maximum(best, xn @ xn[p])).sum() for p in cands]
                pick = cands[int(np.argmin(pots))]
            else:
                pick = vidx[rng.next() % vidx.size]
            mu[j] = xn[pick]
            best = np.maximum(best, xn @ mu[j])
    if vidx.size == 0:
        return mu
    for _ in range(iters):
        lab = np.where(valid, _argmax_labels(xn @ mu.T), -1)
        for j in range(c):
            if (lab == j).any():
                s = _pow2_scaled(xn[lab == j].sum(axis=0))
                nrm = np.sqrt(s @ s)
                if nrm > 0:
                    mu[j] = s / nrm
    return mu


def spherical_kmeans(x, n_clusters, *, iters=10, seed=0, mask=None, init=None):
    """Spherical k-means: k-means++ seeding (D = 1 - cos, D² weights) + `iters` Lloyd steps."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape[-2:]
    batch = np.broadcast_shapes(x.shape[:-2], () if mask is None else np.shape(mask)[:-1],
                                () if init is None else np.shape(init)[:-2])
    x = np.broadcast_to(x, batch + (n, d))
    valid = _mask_or_all(mask, batch + (n,))
    init = None if init is None else np.broadcast_to(np.asarray(init, np.float64),
                                                      batch + (n_clusters, d))
    out = np.zeros(batch + (n_clusters, d))
    for b in _problems(batch):
        out[b] = _spherical_one(x[b], n_clusters, iters, seed, valid[b],
                                None if init is None else init[b])
    return out


def assign_clusters(x, centroids):
    """argmax_c x·μ_c per row, ties to the lowest c; all-NaN rows get -1."""
    s = np.asarray(x, np.float64) @ np.swapaxes(np.asarray(centroids, np.float64), -1, -2)
    out = np.empty(s.shape[:-1], dtype=np.int64)
    for b in _problems(s.shape[:-2]):
        out[b] = _argmax_labels(s[b])
    return out


def update_centroids(centroids, x, labels, *, decay=0.999, mask=None):
    """EMA step: μ_c ← normalise(decay μ_c + (1 - decay) mean{x_i : label i = c, mask i}).

    Extra leading axes of x / labels / mask (beyond those of centroids) are pooled."""
    cent = np.asarray(centroids, np.float64)
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels)
    n, d = x.shape[-2:]
    c = cent.shape[-2]
    xb = np.broadcast_shapes(x.shape[:-2], labels.shape[:-1],
                             () if mask is None else np.shape(mask)[:-1])
    extra = max(len(xb) - (cent.ndim - 2), 0)
    out_batch = np.broadcast_shapes(cent.shape[:-2], xb[extra:])
    full = xb[:extra] + out_batch
    x = np.broadcast_to(x, full + (n, d))
    labels = np.broadcast_to(labels, full + (n,))
    valid = _mask_or_all(mask, full + (n,))
    cent = np.broadcast_to(cent, out_batch + (c, d))
    out = np.array(cent)
    lead = (slice(None),) * extra
    for b in _problems(out_batch):
        X = x[lead + b]
        X = X.reshape(int(np.prod(X.shape[:-1])), d)              # d = 0 too
        L = labels[lead + b].reshape(-1)
        M = valid[lead + b].reshape(-1)
        for j in range(c):
            sel = (L == j) & M
            if sel.any():
                v = _pow2_scaled(decay * cent[b][j] + (1 - decay) * X[sel].mean(axis=0))
                nrm = np.sqrt(v @ v)
                out[b][j] = v / nrm if nrm > 0 else v
    return out


def commitment_loss(x, centroids, labels, *, mask=None):
    """Per problem: mean of ‖x_i - μ_label(i)‖² over rows with label >= 0 and mask True."""
    x = np.asarray(x, np.float64)
    cent = np.asarray(centroids, np.float64)
    labels = np.asarray(labels)
    n = x.shape[-2]
    batch = np.broadcast_shapes(x.shape[:-2], cent.shape[:-2], labels.shape[:-1],
                                () if mask is None else np.shape(mask)[:-1])
    x = np.broadcast_to(x, batch + x.shape[-2:])
    cent = np.broadcast_to(cent, batch + cent.shape[-2:])
    labels = np.broadcast_to(labels, batch + (n,))
    valid = _mask_or_all(mask, batch + (n,))
    out = np.zeros(batch)
    for b in _problems(batch):
        sel = valid[b] & (labels[b] >= 0)
        if sel.any():
            diff = x[b][sel] - cent[b][labels[b][sel]]
            out[b] = (diff * diff).sum(axis=1).mean()
    return out


def top_members(scores, w):
    """Per cluster the w rows with the largest score (NaN lowest), ties to the lower
    position, sorted by position: by a full stable sort (the oracle may be slow)."""
    s = np.asarray(scores, np.float64)
    n, c = s.shape[-2:]
    out = np.empty(s.shape[:-2] + (c, w), dtype=np.int64)
    for b in _problems(s.shape[:-2]):
        for j in range(c):
            key = np.where(np.isnan(s[b][:, j]), -np.inf, s[b][:, j])
            order = np.lexsort((np.arange(n), -key))
            out[b][j] = np.sort(order[:w])
    return out


def members_from_labels(labels, n_clusters, *, max_size=None):
    """Rows of each cluster by position, -1 padded to max_size (default: largest cluster)."""
    labels = np.asarray(labels)
    batch = labels.shape[:-1]
    lists = {b: [np.flatnonzero(labels[b] == j) for j in range(n_clusters)]
             for b in _problems(batch)}
    if max_size is None:
        max_size = max((len(r) for ls in lists.values() for r in ls), default=0)
    out = np.full(batch + (n_clusters, max_size), -1, dtype=np.int64)
    for b, ls in lists.items():
        for j, rows in enumerate(ls):
            rows = rows[:max_size]
            out[b][j, :len(rows)] = rows
    return out


def lsh_hash(x, planes):
    """bit b = [x·planes[b, :d] > planes[b, d]], packed lowest bit first into int64."""
    x = np.asarray(x, np.float64)
    p = np.asarray(planes, np.float64)
    d = x.shape[-1]
    proj = x @ np.swapaxes(p[..., :d], -1, -2)
    bits = proj > p[..., None, :, d]
    weights = np.left_shift(np.int64(1), np.arange(p.shape[-2], dtype=np.int64))
    return (bits.astype(np.int64) * weights).sum(axis=-1)


def _popcount(a):
    return np.bitwise_count(np.asarray(a, dtype=np.uint64)).astype(np.int64)


def _hamming_assign(codes, cent, valid):
    dist = _popcount(codes[:, None] ^ cent[None, :])
    return np.where(valid, np.argmin(dist, axis=1), -1)


def _hamming_one(codes, c, iters, seed, valid):
    n = codes.size
    vidx = np.flatnonzero(valid)
    if vidx.size == 0:
        return np.full(n, -1, np.int64), np.zeros(c, np.uint64)
    rng = SplitMix64(seed)
    cent = np.zeros(c, np.uint64)
    # greedy k-means++ on Hamming distance (integer D² weights: exact)
    cent[0] = codes[vidx[rng.next() % vidx.size]]
    dist = np.where(valid, _popcount(codes ^ cent[0]), 0)
    for j in range(1, c):
        w = dist * dist
        total = int(w.sum())
        if total > 0:
            cum = np.cumsum(w)
            cands = [int(np.searchsorted(cum, rng.next() % total, side="right"))
                     for _ in range(_trials(c))]
            pots = [int((np.minimum(dist, _popcount(codes ^ codes[p])) ** 2 * valid).sum())
                    for p in cands]
            pick = cands[int(np.argmin(pots))]
        else:
            pick = vidx[rng.next() % vidx.size]
        cent[j] = codes[pick]
        dist = np.where(valid, np.minimum(dist, _popcount(codes ^ cent[j])), 0)
    for _ in range(iters):
        lab = _hamming_assign(codes, cent, valid)
        empty = []
        for j in range(c):
            rows = codes[lab == j]
            if rows.size == 0:
                empty.append(j)
                continue
            ones = ((rows[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).sum(axis=0)
            cent[j] = sum(1 << b for b in range(64) if 2 * int(ones[b]) > rows.size)
        for j in empty:
            cent[j] = codes[vidx[rng.next() % vidx.size]]
    return _hamming_assign(codes, cent, valid), cent


def hamming_kmeans(codes, n_clusters, *, iters=10, seed=0, mask=None, return_centroids=False):
    """k-means on Hamming distance: k-means++ seeding, majority-vote centroids (ties 0),
    empty clusters re-seeded from the stream, masked rows -1; then a final assignment."""
    codes = np.asarray(codes).astype(np.int64).view(np.uint64)
    n = codes.shape[-1]
    batch = np.broadcast_shapes(codes.shape[:-1], () if mask is None else np.shape(mask)[:-1])
    codes = np.broadcast_to(codes, batch + (n,))
    valid = _mask_or_all(mask, batch + (n,))
    labels = np.empty(batch + (n,), np.int64)
    cent = np.empty(batch + (n_clusters,), np.uint64)
    for b in _problems(batch):
        labels[b], cent[b] = _hamming_one(codes[b], n_clusters, iters, seed, valid[b])
    cent = cent.view(np.int64)
    return (labels, cent) if return_centroids else labels
# ------------------------------------------------------------------ clustered attention
def _cluster_parts(q, k, v, labels, n_clusters, topk, key_mask, scale, hold=None,
                   dropout_p=0.0, dropout_seed=None, rel_bias=None):
    """Every matrix of (improved) clustered attention, explicitly, in float64.

    Returns a dict: onehot (…, n, C) member matrix, cent (…, C, d), a (…, C, m) centroid
    attention, top (…, C, m) bool T_c (all False for the plain form, topk None), mhat
    (…, C), p2 (…, n, m) each query's softmax over its cluster's T_c, and w (…, n, m) the
    effective attention weights.  hold=(top, mhat) fixes T_c and m̂_c (finite differences
    of the improved form with m̂ held constant).  Pair terms: the exact part's logits get
    rel_bias and its weights the dropout of pair (i, j) (f2), the centroid weights that
    of row -1 - c (fc); the centroid logits, T_c and m̂_c are untouched by both.
    """
    q, k, v = _f64(q, k, v)
    labels = np.asarray(labels)
    sc = _scale(scale, q.shape[-1])
    onehot = (labels[..., :, None] == np.arange(n_clusters)).astype(np.float64)
    counts = onehot.sum(axis=-2)
    cent = (np.swapaxes(onehot, -1, -2) @ q) / np.maximum(counts, 1)[..., None]
    m = k.shape[-2]
    visible = np.ones((1, m), dtype=bool) if key_mask is None else \
        np.asarray(key_mask, dtype=bool)[..., None, :]
    a, _ = masked_softmax(sc * (cent @ np.swapaxes(k, -1, -2)), visible)
    visible = np.broadcast_to(visible, a.shape)
    n = q.shape[-2]
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], labels.shape[:-1],
                                np.shape(rel_bias)[:-1] if rel_bias is not None else ())
    fc = dropout_factor(dropout_p, dropout_seed, batch, -1 - np.arange(n_clusters), np.arange(m))
    f2 = dropout_factor(dropout_p, dropout_seed, batch, np.arange(n), np.arange(m))
    if hold is not None:
        top, mhat = hold
    elif topk is None:
        top, mhat = np.zeros(a.shape, dtype=bool), np.zeros(a.shape[:-1])
    else:
        # rank keys by a (largest first, ties to the lower key; masked keys last)
        order = np.argsort(np.where(visible, -a, np.inf), axis=-1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(m), order.shape), axis=-1)
        kc = np.minimum(topk, visible.sum(axis=-1, keepdims=True))
        top = (rank < kc) & visible
        mhat = np.where(top, a, 0.0).sum(axis=-1)
    qtop = (onehot @ top.astype(np.float64)) > 0                      # (…, n, m)
    p2, _ = masked_softmax(sc * (q @ np.swapaxes(k, -1, -2)) + bias_matrix(rel_bias, n, m), qtop)
    w = onehot @ np.where(top, 0.0, a * fc) + (onehot @ mhat[..., None]) * p2 * f2
    return dict(onehot=onehot, counts=counts, cent=cent, a=a, top=top, mhat=mhat, p2=p2, w=w,
                sc=sc, fc=fc, f2=f2)


def clustered_attention(q, k, v, labels, n_clusters, *, key_mask=None, scale=None,
                        dropout_p=0.0, dropout_seed=None):
    """Clustered attention: out_i = softmax(scale·q̄_c·kᵀ) v for query i in cluster c,
    q̄_c the mean of the queries labelled c; label -1 gives 0."""
    parts = _cluster_parts(q, k, v, labels, n_clusters, None, key_mask, scale,
                           dropout_p=dropout_p, dropout_seed=dropout_seed)
    return parts["w"] @ np.asarray(v, dtype=np.float64)


def improved_clustered_attention(q, k, v, labels, n_clusters, topk, *, key_mask=None,
                                 scale=None, dropout_p=0.0, dropout_seed=None, rel_bias=None,
                                 _hold=None):
    """Improved clustered attention: exact softmax over each cluster's top-k keys (of the
    centroid attention), rescaled by their centroid mass m̂_c; centroid weights elsewhere."""
    parts = _cluster_parts(q, k, v, labels, n_clusters, topk, key_mask, scale, _hold,
                           dropout_p, dropout_seed, rel_bias)
    return parts["w"] @ np.asarray(v, dtype=np.float64)


def improved_clustered_selection(q, k, labels, n_clusters, topk, *, key_mask=None,
                                 scale=None):
    """(top, mhat): T_c as a (…, C, m) bool matrix and m̂_c (…, C), for finite
    differences with the selection and m̂ held constant."""
    v = np.zeros(np.shape(k)[:-1] + (1,))
    parts = _cluster_parts(q, k, v, labels, n_clusters, topk, key_mask, scale)
    return parts["top"], parts["mhat"]


def _clustered_backward(dout, q, k, v, labels, n_clusters, topk, key_mask, scale,
                        dropout_p=0.0, dropout_seed=None, rel_bias=None):
    dout, q, k, v = _f64(dout, q, k, v)
    P = _cluster_parts(q, k, v, labels, n_clusters, topk, key_mask, scale, None, dropout_p,
                       dropout_seed, rel_bias)
    sc, onehot, a, top, p2 = P["sc"], P["onehot"], P["a"], P["top"], P["p2"]
    dv = np.swapaxes(P["w"], -1, -2) @ dout
    dw = dout @ np.swapaxes(v, -1, -2)                                # (…, n, m)
    # exact part: w += m̂_c · p2 ∘ f2 with m̂ constant; p2 = softmax(sc·q kᵀ + bias) over T_c
    dp2 = (onehot @ P["mhat"][..., None]) * dw * P["f2"]
    ds2 = p2 * (dp2 - (dp2 * p2).sum(axis=-1, keepdims=True))
    dq = sc * (ds2 @ k)
    dk = sc * (np.swapaxes(ds2, -1, -2) @ q)
    # centroid part: w += onehot · (a ∘ fc outside T_c), a = softmax(sc·cent kᵀ)
    da = np.where(top, 0.0, np.swapaxes(onehot, -1, -2) @ dw) * P["fc"]  # (…, C, m)
    ds = a * (da - (da * a).sum(axis=-1, keepdims=True))
    dcent = sc * (ds @ k)
    dk = dk + sc * (np.swapaxes(ds, -1, -2) @ P["cent"])
    # cent = mean of members
    dq = dq + onehot @ (dcent / np.maximum(P["counts"], 1)[..., None])
    grads = unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)
    if rel_bias is None:
        return grads
    return grads + (bias_matrix_grad(ds2, q.shape[-2], k.shape[-2], np.shape(rel_bias)),)


def clustered_attention_backward(dout, q, k, v, labels, n_clusters, *, key_mask=None,
                                 scale=None, dropout_p=0.0, dropout_seed=None):
    """(dq, dk, dv) of `clustered_attention`; a centroid's gradient is shared equally
    by its members."""
    return _clustered_backward(dout, q, k, v, labels, n_clusters, None, key_mask, scale,
                               dropout_p, dropout_seed)


def improved_clustered_attention_backward(dout, q, k, v, labels, n_clusters, topk, *,
                                          key_mask=None, scale=None, dropout_p=0.0,
                                          dropout_seed=None, rel_bias=None):
    """(dq, dk, dv [, drel_bias]) of `improved_clustered_attention` with T_c and m̂_c held
    constant."""
    return _clustered_backward(dout, q, k, v, labels, n_clusters, topk, key_mask, scale,
                               dropout_p, dropout_seed, rel_bias)
