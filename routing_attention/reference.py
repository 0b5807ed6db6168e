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
           "combiner_plan"]


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def masked_softmax(logits, visible):
    """Row softmax of `logits` over the entries where `visible` is True.

    Returns (p, lse); a row with nothing visible gets p = 0 and lse = -inf.
    """
    s = np.where(visible, logits, -np.inf)
    mx = s.max(axis=-1, keepdims=True, initial=-np.inf)   # a row of no keys at all too
    mx = np.where(np.isneginf(mx), 0.0, mx)
    e = np.where(visible, np.exp(s - mx), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    seen = total > 0
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
    return 1.0 / np.sqrt(d) if scale is None else float(scale)


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_lse=False):
    """softmax(scale · q kᵀ + mask) v with the explicit (…, n, m) probability matrix."""
    q, k, v = _f64(q, k, v)
    s = _scale(scale, q.shape[-1]) * (q @ np.swapaxes(k, -1, -2))
    p, lse = masked_softmax(s, _dense_visible(q.shape[-2], k.shape[-2], causal, key_mask))
    out = p @ v
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, *, causal=False, key_mask=None, scale=None, lse=None,
                       output=None):
    """(dq, dk, dv) of `attention` by the textbook softmax Jacobian."""
    dout, q, k, v = _f64(dout, q, k, v)
    sc = _scale(scale, q.shape[-1])
    s = sc * (q @ np.swapaxes(k, -1, -2))
    p, _ = masked_softmax(s, _dense_visible(q.shape[-2], k.shape[-2], causal, key_mask))
    dv = np.swapaxes(p, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = sc * (ds @ k)
    dk = sc * (np.swapaxes(ds, -1, -2) @ q)
    return unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)


# ------------------------------------------------------------------ routing attention
def _batched(arrays_and_core):
    """Broadcast the batch axes of (array, core_rank) pairs; yields per-index views."""
    shape = np.broadcast_shapes(*(a.shape[: a.ndim - r] for a, r in arrays_and_core))
    full = [np.broadcast_to(a, shape + a.shape[a.ndim - r:]) for a, r in arrays_and_core]
    return shape, full


def _cluster_problems(q, k, q_idx, k_idx, causal, exclude_self, sc):
    """For one problem: per cluster (queries, keys, probabilities p, lse) with the
    explicit visibility matrix (exclude_self falls back to self when alone)."""
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
        p, lse = masked_softmax(sc * (q[qs] @ k[ks].T), vis)
        out.append((qs, ks, p, lse))
    return out


def routing_attention(q, k, v, q_idx, k_idx, *, causal=False, exclude_self=False, merge="mean",
                      scale=None, return_lse=False):
    """Per cluster a dense masked softmax; per token a mean or log-sum-exp merge."""
    q, k, v = _f64(q, k, v)
    q_idx, k_idx = np.asarray(q_idx, np.int64), np.asarray(k_idx, np.int64)
    sc = _scale(scale, q.shape[-1])
    shape, (qb, kb, vb, qib, kib) = _batched([(q, 2), (k, 2), (v, 2), (q_idx, 2), (k_idx, 2)])
    n, e = q.shape[-2], v.shape[-1]
    out = np.zeros(shape + (n, e))
    lse_out = np.full(shape + (n,), -np.inf)
    for b in np.ndindex(*shape):
        rows = [[] for _ in range(n)]            # (o, lse) per cluster containing the token
        for qs, ks, p, lse in _cluster_problems(qb[b], kb[b], qib[b], kib[b], causal,
                                                exclude_self, sc):
            o = p @ vb[b][ks]
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
                               merge="mean", scale=None):
    """Per cluster the softmax Jacobian, with the gradient each cluster receives from the
    merge: dout/count (mean) or dout with the global normaliser (lse)."""
    dout, q, k, v = _f64(dout, q, k, v)
    q_idx, k_idx = np.asarray(q_idx, np.int64), np.asarray(k_idx, np.int64)
    sc = _scale(scale, q.shape[-1])
    out, L = routing_attention(q, k, v, q_idx, k_idx, causal=causal, exclude_self=exclude_self,
                               merge=merge, scale=scale, return_lse=True)
    shape, (qb, kb, vb, qib, kib, gb) = _batched([(q, 2), (k, 2), (v, 2), (q_idx, 2), (k_idx, 2),
                                                  (dout, 2)])
    ob, Lb = np.broadcast_to(out, shape + out.shape[-2:]), np.broadcast_to(L, shape + L.shape[-1:])
    dq, dk, dv = (np.zeros(shape + a.shape[-2:]) for a in (q, k, v))
    for b in np.ndindex(*shape):
        count = np.zeros(q.shape[-2])
        for qs_ in qib[b]:
            count[qs_[qs_ >= 0]] += 1
        for qs, ks, p, lse in _cluster_problems(qb[b], kb[b], qib[b], kib[b], causal,
                                                exclude_self, sc):
            if merge == "mean":
                g = gb[b][qs] / count[qs][:, None]
                o = p @ vb[b][ks]
            else:
                finite = np.isfinite(Lb[b][qs])
                with np.errstate(invalid="ignore"):
                    shift = np.where(finite, lse - Lb[b][qs], 0)
                p = p * np.where(finite, np.exp(shift), 0)[:, None]
                g, o = gb[b][qs], ob[b][qs]
            dv[b][ks] += p.T @ g
            dp = g @ vb[b][ks].T
            ds = p * (dp - (g * o).sum(axis=1, keepdims=True))
            dq[b][qs] += sc * ds @ kb[b][ks]
            dk[b][ks] += sc * ds.T @ qb[b][qs]
    return unbroadcast(dq, q.shape), unbroadcast(dk, k.shape), unbroadcast(dv, v.shape)


def local_attention(q, k, v, window, *, causal=False, scale=None):
    """Dense attention with the local block mask |block(i) - block(j)| <= 1
    (causal: block(j) in {block(i) - 1, block(i)} and j <= i)."""
    n, m = np.shape(q)[-2], np.shape(k)[-2]
    bi, bj = np.arange(n)[:, None] // window, np.arange(m)[None, :] // window
    vis = (bj >= bi - 1) & (bj <= bi + (0 if causal else 1))
    if causal:
        vis &= np.arange(m)[None, :] <= np.arange(n)[:, None]
    q, k, v = _f64(q, k, v)
    p, _ = masked_softmax(_scale(scale, q.shape[-1]) * (q @ np.swapaxes(k, -1, -2)), vis)
    return p @ v


def local_attention_backward(dout, q, k, v, window, *, causal=False, scale=None):
    """(dq, dk, dv) of `local_attention` by the softmax Jacobian."""
    n, m = np.shape(q)[-2], np.shape(k)[-2]
    bi, bj = np.arange(n)[:, None] // window, np.arange(m)[None, :] // window
    vis = (bj >= bi - 1) & (bj <= bi + (0 if causal else 1))
    if causal:
        vis &= np.arange(m)[None, :] <= np.arange(n)[:, None]
    dout, q, k, v = _f64(dout, q, k, v)
    sc = _scale(scale, q.shape[-1])
    p, _ = masked_softmax(sc * (q @ np.swapaxes(k, -1, -2)), vis)
    dv = np.swapaxes(p, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return (unbroadcast(sc * (ds @ k), q.shape), unbroadcast(sc * (np.swapaxes(ds, -1, -2) @ q), k.shape),
            unbroadcast(dv, v.shape))
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


def combiner_plan(plan, n, block=None, causal=True):
    """Each query's support, straight from DESIGN §4.3.

    Returns a list over queries i of (direct, regions): direct is a list of key
    positions; each region is (kmem, qsrc, vmem): the summary key is the max-pool of the
    keys in kmem, the summary value the softmax expectation of v over vmem under the
    region query, which is the max-pool of the queries in vmem (qsrc None) or q[qsrc].
    """
    if plan not in COMBINER_PLANS:
        raise ValueError(f"plan must be one of {COMBINER_PLANS}; got {plan!r}")
    s = combiner_default_block(plan, n) if block is None else block
    out = []
    for i in range(n):
        direct, regions = [], []
        if plan == "fixed":
            b = i // s
            direct = [j for j in range(b * s, min(n, b * s + s)) if not causal or j <= i]
            for g in range((n + s - 1) // s):
                if g < b or (not causal and g > b):
                    mem = list(range(g * s, min(n, g * s + s)))
                    regions.append((mem, None, mem))
        elif plan == "logsparse":
            direct = [i]
            for lo, hi in _dyadic_spans(i):
                regions.append((list(range(lo, hi)), None, list(range(lo, hi))))
            if not causal:
                for lo, hi in _dyadic_spans(n - 1 - i):
                    mem = list(range(n - hi, n - lo))
                    regions.append((mem, None, mem))
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
                        regions.append((cells, cells[min(c, len(cells) - 1)], cells))
            else:   # mixture
                direct = [j for j in row(r) if not causal or j <= i]
                direct += [j for j in col(c) if j < i or (not causal and j > i)]
                for cc in range(M):
                    if cc == c:
                        continue
                    above = [j for j in col(cc) if j // M < r]
                    below = [j for j in col(cc) if j // M > r]
                    for mem in ([above] if causal else [above, below]):
                        if mem:
                            regions.append((mem, None, mem))
                for t in range(nrows):
                    if t < r or (not causal and t != r):
                        left = [j for j in row(t) if j % M < c]
                        right = [j for j in row(t) if j % M > c]
                        for mem in (left, right):
                            if mem:
                                regions.append((mem, None, mem))
        out.append((sorted(direct), regions))
    return out


def _combiner_problem(q, k, sc, support):
    """Per query: direct keys, logits p (softmax over direct + summaries), and per region
    (kmem, vmem, region query q̂, pooled key k̂, the region distribution a)."""
    rows = []
    for i, (direct, regions) in enumerate(support):
        regs = []
        for kmem, qsrc, vmem in regions:
            qh = q[vmem].max(axis=0) if qsrc is None else q[qsrc]
            kh = k[kmem].max(axis=0)
            a, _ = masked_softmax(sc * (k[vmem] @ qh), np.ones(len(vmem), dtype=bool))
            regs.append((kmem, qsrc, vmem, qh, kh, a))
        logits = np.concatenate([sc * (k[direct] @ q[i]),
                                 np.array([sc * (q[i] @ r[4]) for r in regs])])
        p, _ = masked_softmax(logits, np.ones(len(logits), dtype=bool))
        rows.append((direct, p, regs))
    return rows


def _combiner_batched(q, k, v, dout=None):
    q, k, v = _f64(q, k, v)
    shape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                () if dout is None else np.shape(dout)[:-2])
    flat = lambda a: np.broadcast_to(a, shape + a.shape[-2:]).reshape((-1,) + a.shape[-2:])  # noqa: E731
    arrays = [flat(q), flat(k), flat(v)]
    if dout is not None:
        arrays.append(flat(np.asarray(dout, dtype=np.float64)))
    return shape, arrays


def combiner_attention_weights(q, k, *, plan="fixed", block=None, causal=True, scale=None):
    """The effective (…, n, n) attention matrix of Combiner: row i holds the direct
    weights of query i plus, for each region, its summary weight × the region's own
    distribution over its members.  combiner_attention(q, k, v) = weights @ v."""
    n = np.shape(q)[-2]
    sc = _scale(scale, np.shape(q)[-1])
    support = combiner_plan(plan, n, block, causal)
    shape, (qf, kf, _) = _combiner_batched(q, k, np.zeros(np.shape(k)[:-1] + (1,)))
    A = np.zeros((qf.shape[0], n, n))
    for b in range(qf.shape[0]):
        for i, (direct, p, regs) in enumerate(_combiner_problem(qf[b], kf[b], sc, support)):
            A[b, i, direct] += p[:len(direct)]
            for w, (_, _, vmem, _, _, a) in zip(p[len(direct):], regs):
                A[b, i, vmem] += w * a
    return A.reshape(shape + (n, n))


def combiner_attention(q, k, v, *, plan="fixed", block=None, causal=True, scale=None):
    """Combiner attention through its explicit effective attention matrix."""
    A = combiner_attention_weights(q, k, plan=plan, block=block, causal=causal, scale=scale)
    return A @ np.asarray(v, dtype=np.float64)


def combiner_attention_backward(dout, q, k, v, *, plan="fixed", block=None, causal=True,
                                scale=None):
    """(dq, dk, dv) of `combiner_attention`, differentiated by hand query by query:
    the shared softmax, each region's own softmax, and max-pooling (the gradient goes to
    the arg-max element; ties to the lowest position)."""
    n, d = np.shape(q)[-2:]
    sc = _scale(scale, d)
    support = combiner_plan(plan, n, block, causal)
    shape, (qf, kf, vf, gf) = _combiner_batched(q, k, v, dout)
    dq, dk, dv = np.zeros_like(qf), np.zeros_like(kf), np.zeros_like(vf)
    cols = np.arange(d)
    for b in range(qf.shape[0]):
        qb, kb, vb = qf[b], kf[b], vf[b]
        for i, (direct, p, regs) in enumerate(_combiner_problem(qb, kb, sc, support)):
            g = gf[b, i]
            vals = [vb[j] for j in direct] + [r[5] @ vb[r[2]] for r in regs]
            keys = [kb[j] for j in direct] + [r[4] for r in regs]
            # out_i = Σ p_e value_e with p = softmax(sc·q_i·key_e)
            dp = np.array([g @ x for x in vals])
            ds = p * (dp - p @ dp)
            dq[b, i] += sc * sum(s_ * x for s_, x in zip(ds, keys))
            for t, j in enumerate(direct):
                dk[b, j] += sc * ds[t] * qb[i]
                dv[b, j] += p[t] * g
            for t, (kmem, qsrc, vmem, qh, kh, a) in enumerate(regs, start=len(direct)):
                dkh, dvh = sc * ds[t] * qb[i], p[t] * g
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
    return (unbroadcast(full(dq), np.shape(q)), unbroadcast(full(dk), np.shape(k)),
            unbroadcast(full(dv), np.shape(v)))
