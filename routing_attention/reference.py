"""Dense NumPy reference of every operation: the oracle the C kernels are tested against.

Plain and obviously correct rather than fast: each function builds the explicit n×m
softmax matrix.  Everything is computed in float64 whatever the input dtype, and the
results are float64.  Shapes and keywords follow the public functions exactly.
"""
import numpy as np

from ._checks import unbroadcast

__all__ = ["attention", "attention_backward", "masked_softmax",
           "SplitMix64", "spherical_kmeans", "assign_clusters", "update_centroids",
           "commitment_loss", "top_members", "members_from_labels", "lsh_hash",
           "hamming_kmeans"]


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def masked_softmax(logits, visible):
    """Row softmax of `logits` over the entries where `visible` is True.

    Returns (p, lse); a row with nothing visible gets p = 0 and lse = -inf.
    """
    s = np.where(visible, logits, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
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


def _mask_or_all(mask, shape):
    return np.ones(shape, dtype=bool) if mask is None else np.broadcast_to(mask, shape)


def _spherical_one(x, c, iters, seed, valid, init):
    n, d = x.shape
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    xn = np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0.0)
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
                s = xn[lab == j].sum(axis=0)
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
        X = x[lead + b].reshape(-1, d)
        L = labels[lead + b].reshape(-1)
        M = valid[lead + b].reshape(-1)
        for j in range(c):
            sel = (L == j) & M
            if sel.any():
                v = decay * cent[b][j] + (1 - decay) * X[sel].mean(axis=0)
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
