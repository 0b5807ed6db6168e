"""Incremental causal decoding: one new token per sequence per step, attended against a cache.

A cache keeps the keys and values (and whatever its method needs: queries for Combiner's
region summaries, cluster lists for routing) of the tokens seen so far.  ``cache.step(q,
k, v)`` appends one token to every sequence and returns its output row, equal (to
rounding) to the last row of the method's full causal forward over the tokens so far.
Every method works the same way: a planner gathers the new query's key list (all keys,
the local window, its cluster's keys, or the direct keys plus region summaries), and one
softmax over that list gives the row.

Shapes: q (..., 1, d), k (..., 1, d), v (..., 1, e); the leading axes (batch, heads, ...)
are fixed by the first step.  ``active`` (a boolean array over those axes) lets
sequences of different lengths share a cache: only the active ones take a token, the
others keep their state and get a zero row.  Memory grows like the tokens: O(n·(d + e))
per sequence (Combiner: plus its region summaries, also O(n·d)).

A refused call (bad shapes, dtype, `active`) leaves the cache as it was (``prefill``
checks the whole prompt first); a bad `scale` is refused at construction.  d = 0 and
e = 0 work as in the full forward, and an empty prompt (``prefill`` of n = 0), checked
as a step, gives an empty result.  A NaN reaches exactly the rows it reaches in the full
causal forward (a window slot hidden from a step contributes nothing, whatever it holds);
so does an inf, except in `CombinerCache`, which follows `reference.combiner_attention`
where the kernel's summaries differ from it (an infinite key entry).
"""
import numpy as np

from ._checks import (as_matrix, bool_array, cache_dtype, combiner_block, decodable_routing_layer,
                      decode_step, decoding_heads, float_dtype, integer, one_of, scale_option,
                      scale_value)
from .clustering import assign_clusters
from .reference import _dyadic_spans, COMBINER_PLANS
from .routing import _normalize

__all__ = ["DenseCache", "LocalCache", "CombinerCache", "RoutingCache"]


def _softmax_rows(q, keys, values, visible, scale):
    """out (P, e) of one query per problem: q (P, d), keys (P, s, d), values (P, s, e),
    visible (P, s) bool.  A hidden key contributes nothing, even a NaN or inf one; a
    problem with no visible key gets 0."""
    if keys.shape[1] == 0:
        return np.zeros((q.shape[0], values.shape[-1]), np.result_type(q, values))
    logits = scale * np.einsum("pd,psd->ps", q, keys)
    logits = np.where(visible, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    p = np.where(visible, np.exp(logits - top), 0)
    total = p.sum(axis=-1, keepdims=True)
    p = p / np.where(total > 0, total, 1)
    return np.einsum("ps,pse->pe", p, np.where(visible[..., None], values, 0))


class _Cache:
    """Keys, values (and queries) of every sequence so far, grown by doubling; the
    method's planner turns them into each new query's key list."""

    keeps_queries = False

    def __init__(self, *, scale=None):
        self.scale = scale_option(scale)
        self.batch = None       # leading axes, fixed by the first step
        self.lengths = None     # (P,) tokens per flattened sequence

    def _setup(self, q, k, v):
        """Size the cache for the first step's q, k, v; may refuse them before it changes
        anything (a scale too large for their dtype)."""
        self._scale = scale_value(self.scale, q.shape[-1], q.dtype)
        self.batch, self.dtype = q.shape[:-2], q.dtype
        self.d, self.e = q.shape[-1], v.shape[-1]
        P = int(np.prod(self.batch, dtype=np.int64))
        self.lengths = np.zeros(P, np.int64)
        self.keys = np.zeros((P, 16, self.d), self.dtype)
        self.values = np.zeros((P, 16, self.e), self.dtype)
        self.queries = np.zeros((P, 16, self.d), self.dtype) if self.keeps_queries else None

    def _grow(self, need):
        cap = self.keys.shape[1]
        if need <= cap:
            return
        while cap < need:
            cap *= 2

        def grown(a):
            b = np.zeros((a.shape[0], cap, a.shape[2]), a.dtype)
            b[:, :a.shape[1]] = a
            return b
        self.keys, self.values = grown(self.keys), grown(self.values)
        if self.queries is not None:
            self.queries = grown(self.queries)

    def _inputs(self, q, k, v, active):
        """Checked q, k, v as (P, d / e) and the active rows; the first step sets the
        cache up, once all of it is checked."""
        dtype = float_dtype(q=q, k=k, v=v)
        q, k, v = (as_matrix(name, a, dtype) for name, a in (("q", q), ("k", k), ("v", v)))
        first = self.batch is None
        if first:
            decode_step(q, k, v, None)
        else:
            decode_step(q, k, v, (self.batch, self.d, self.e))
            cache_dtype(self.dtype, dtype)
        batch = q.shape[:-2]
        P = int(np.prod(batch, dtype=np.int64))
        if active is None:
            rows = np.arange(P)
        else:
            active = bool_array("active", active)
            rows = np.flatnonzero(np.broadcast_to(active, batch).reshape(-1))
        if first:
            self._setup(q, k, v)
        flat = lambda a: a.reshape(P, a.shape[-1])           # noqa: E731
        return flat(q), flat(k), flat(v), rows

    def step(self, q, k, v, *, active=None):
        """Append one token (q, k, v: (..., 1, d / e)) to every active sequence and return
        the new output rows (..., 1, e) (zero for inactive sequences)."""
        q, k, v, rows = self._inputs(q, k, v, active)
        t = self.lengths[rows]
        self._grow(int(t.max(initial=-1)) + 1)
        self.keys[rows, t], self.values[rows, t] = k[rows], v[rows]
        if self.queries is not None:
            self.queries[rows, t] = q[rows]
        self._append(rows, t, q[rows], k[rows])
        self.lengths[rows] = t + 1
        out = np.zeros((self.lengths.size, self.e), self.dtype)
        if rows.size:
            out[rows] = self._attend(rows, t, q[rows])
        return out.reshape(self.batch + (1, self.e))

    def prefill(self, q, k, v):
        """Feed a prompt (..., n, d) token by token; returns its outputs (..., n, e).  The
        whole prompt is checked first, as a step (batch axes, d, e and dtype against the
        cache's, once it has taken a step; the same n in q, k, v), so a refused prompt
        feeds nothing.  An empty prompt (n = 0) changes nothing and gives an empty
        (..., 0, e)."""
        dtype = float_dtype(q=q, k=k, v=v)
        q, k, v = (as_matrix(name, a, dtype) for name, a in (("q", q), ("k", k), ("v", v)))
        first = None if self.batch is None else (self.batch, self.d, self.e)
        decode_step(q, k, v, first, tokens=q.shape[-2])
        if first is not None:
            cache_dtype(self.dtype, dtype)
        rows = [self.step(q[..., i:i + 1, :], k[..., i:i + 1, :], v[..., i:i + 1, :])
                for i in range(q.shape[-2])]
        return np.concatenate(rows, -2) if rows else np.zeros(q.shape[:-2] + (0, v.shape[-1]),
                                                               dtype)

    def _append(self, rows, t, q, k):
        """Planner hook: record what the method needs about the new tokens."""

    def _attend_positions(self, rows, q, positions, visible):
        """Softmax over the cached keys at `positions` (len(rows), s) where `visible`
        (hidden slots may hold any position: they are read at 0 and contribute nothing)."""
        positions = np.where(visible, positions, 0)
        keys = self.keys[rows[:, None], positions]
        values = self.values[rows[:, None], positions]
        return _softmax_rows(q, keys, values, visible, self._scale)


def _window(t, window):
    """Causal local attention's key positions for tokens at positions t (r,): from the
    start of the previous block up to each token -> positions (r, 2·window), visible."""
    start = np.maximum(t // window - 1, 0) * window
    positions = start[:, None] + np.arange(2 * window)
    return positions, positions <= t[:, None]


class DenseCache(_Cache):
    """Causal dense attention: the new token at position t sees keys 0..t.  Each step
    costs O(t·d)."""

    def _attend(self, rows, t, q):
        span = int(t.max()) + 1
        positions = np.broadcast_to(np.arange(span), (rows.size, span))
        return self._attend_positions(rows, q, positions, positions <= t[:, None])


class LocalCache(_Cache):
    """Causal local attention with blocks of `window` positions: the token at t (block
    b = t // window) sees keys from block b−1 up to itself.  O(window·d) per step."""

    def __init__(self, window, *, scale=None):
        super().__init__(scale=scale)
        self.window = integer("window", window, low=1)

    def _attend(self, rows, t, q):
        return self._attend_positions(rows, q, *_window(t, self.window))


# ------------------------------------------------------------------ Combiner
def _causal_support(plan, i, block):
    """Query i's causal support under `plan`: (direct positions, regions), each region
    (kind, range of members, region-query source or None).  It does not depend on the
    sequence length, so a cache can compute it for the newest token."""
    if plan == "fixed":
        b = i // block
        return list(range(b * block, i + 1)), [
            (("block", g), range(g * block, g * block + block), None) for g in range(b)]
    if plan == "logsparse":
        return [i], [(("span", lo, hi), range(lo, hi), None) for lo, hi in _dyadic_spans(i)]
    M = block
    r, c = divmod(i, M)
    direct = list(range(r * M, i + 1))
    if plan == "axial":
        return direct, [(("row", t, c), range(t * M, t * M + M), t * M + c) for t in range(r)]
    direct += list(range(c, i, M))                          # mixture: own column above
    regions = [(("above", cc, r), range(cc, r * M, M), None) for cc in range(M)
               if cc != c and r > 0]
    for t in range(r):
        if c > 0:
            regions.append((("left", t, c), range(t * M, t * M + c), None))
        if c < M - 1:
            regions.append((("right", t, c), range(t * M + c + 1, t * M + M), None))
    return direct, regions


class CombinerCache(_Cache):
    """Causal Combiner attention (`plan` fixed, axial, logsparse or mixture).  `block`
    must be given for fixed, axial and mixture: the functions' default ⌈√n⌉ depends on
    the final length, which a decoder does not know.  A region's summary (max-pooled key,
    and its values' expectation under the region query) is computed once, when a query
    first needs it — every region of a causal plan lies wholly in the past — and reused.
    Per step: O(block + n/block) keys and summaries (logsparse: O(log n))."""

    keeps_queries = True

    def __init__(self, plan, *, block=None, scale=None):
        super().__init__(scale=scale)
        one_of("plan", plan, COMBINER_PLANS)
        self.plan, self.block = plan, combiner_block(plan, block, explicit=True)
        self.summaries = None       # per sequence: {region: (summary key, summary value)}

    def _setup(self, q, k, v):
        super()._setup(q, k, v)
        self.summaries = [dict() for _ in range(self.lengths.size)]

    def _summary(self, p, region, members, source):
        known = self.summaries[p].get(region)
        if known is None:
            idx = np.fromiter(members, np.int64)
            keys = self.keys[p, idx]
            query = self.queries[p, idx].max(axis=0) if source is None else self.queries[p, source]
            known = (keys.max(axis=0),
                     _softmax_rows(query[None], keys[None], self.values[p, idx][None],
                                   np.ones((1, idx.size), bool), self._scale)[0])
            self.summaries[p][region] = known
        return known

    def _attend(self, rows, t, q):
        out = np.empty((rows.size, self.e), self.dtype)
        for a, (p, i) in enumerate(zip(rows, t)):     # supports differ with the position
            direct, regions = _causal_support(self.plan, int(i), self.block)
            summaries = [self._summary(p, *region) for region in regions]
            keys = np.concatenate([self.keys[p, direct]] + [s[0][None] for s in summaries])
            values = np.concatenate([self.values[p, direct]] + [s[1][None] for s in summaries])
            out[a] = _softmax_rows(q[a][None], keys[None], values[None],
                                   np.ones((1, len(keys)), bool), self._scale)[0]
        return out


# ------------------------------------------------------------------ routing
class RoutingCache(_Cache):
    """Causal decoding of a `RoutingAttention` layer with ``membership="argmax"`` and
    ``causal=True`` (balanced top-w membership looks at the whole sequence and has no
    causal decoding).  At its first step the cache copies the layer's centroids (fit them
    first; the cache never moves them) and its `local_heads`, `window` and `shared_qk`
    (checking them again), and decodes with that copy to the end: a later change of the
    layer (a training call, an assignment, an in-place edit of ``layer.centroids``,
    another window) does not reach it, as its cluster lists and cached keys were built
    with the copy.  Its `scale` is the layer's when the cache is built.  The layer's
    `window` must be set for local heads (the default n // n_clusters depends on the
    final length).

    q, k, v are (..., heads, 1, d): the first `local_heads` heads attend their window,
    the others the keys of the new query's cluster (its argmax centroid); each new key
    joins the list of its own cluster.  As in the layer, a token whose normalised row is
    not finite joins no cluster, and such a query gets a NaN row.  Shared-QK layers
    attend to the normalised queries and hide a token's own key unless it is the only one
    it can see.  Per step: O(n / n_clusters + window) keys per head."""

    def __init__(self, layer):
        super().__init__(scale=layer.scale)
        decodable_routing_layer(layer)
        self.layer = layer
        self.members = None     # per flattened sequence: {cluster: list of key positions}
        self.centroids = None   # the layer's, copied at the first step
        self.local_heads = self.window = self.shared_qk = None     # the layer's, likewise

    def _setup(self, q, k, v):
        layer = self.layer
        decodable_routing_layer(layer)      # as built, unless the layer changed since
        decoding_heads(q.shape, layer.local_heads, layer.centroids)
        super()._setup(q, k, v)
        self.local_heads, self.window, self.shared_qk = \
            layer.local_heads, layer.window, layer.shared_qk
        self.heads = q.shape[-3]
        self.members = [dict() for _ in range(self.lengths.size)]
        if layer.centroids is not None:
            self.centroids = np.array(layer.centroids, self.dtype)          # a copy

    def _append(self, rows, t, q, k):
        if self.shared_qk:        # keys are the normalised queries, in every head
            k = _normalize(q)[0]
            self.keys[rows, t] = k
        head = rows % self.heads - self.local_heads
        routed = head >= 0
        self._query_labels = {}
        if not routed.any():
            return
        cent = self.centroids[head[routed]]                                 # (r, c, d)
        # the layer's labels: argmax over the normalised row's scores, -1 (no cluster)
        # for a row that is not finite
        nearest = lambda x: assign_clusters(_normalize(x)[0][:, None], cent)[:, 0]  # noqa: E731
        q_labels = nearest(q[routed])
        k_labels = q_labels if self.shared_qk else nearest(k[routed])
        for p, i, c in zip(rows[routed].tolist(), t[routed].tolist(), k_labels.tolist()):
            if c >= 0:
                self.members[p].setdefault(c, []).append(i)
        self._query_labels = dict(zip(rows[routed].tolist(), q_labels.tolist()))

    def _attend(self, rows, t, q):
        out = np.empty((rows.size, self.e), self.dtype)
        local = rows % self.heads < self.local_heads
        if local.any():
            positions, visible = _window(t[local], self.window)
            if self.shared_qk:
                visible = self._exclude_self(visible, positions == t[local][:, None])
            out[local] = self._attend_positions(rows[local], q[local], positions, visible)
        for a in np.flatnonzero(~local):
            p = rows[a]
            if self._query_labels[int(p)] < 0:      # a query in no cluster: NaN, as the layer
                out[a] = np.nan
                continue
            positions = np.asarray(self.members[p].get(self._query_labels[int(p)], []), np.int64)
            visible = np.ones((1, positions.size), bool)
            if self.shared_qk:
                visible = self._exclude_self(visible, positions[None] == t[a])
            out[a] = self._attend_positions(rows[a:a + 1], q[a:a + 1], positions[None],
                                            visible)[0]
        return out

    @staticmethod
    def _exclude_self(visible, is_self):
        """A token's own key is hidden unless it is the only key it can see."""
        alone = ~(visible & ~is_self).any(axis=-1, keepdims=True)
        return visible & (~is_self | alone)
