/* routing_body.h — typed routing planner (Routing Transformer); included by routing.c.
 *
 * One problem (one outer gufunc index) at a time:
 *   q (n, d), k (m, d), v (m, e); q_idx (c, w), k_idx (c, u): member lists, -1 = empty.
 *   1. plan:    copy the lists compactly (valid entries in order), validate them, and
 *               build each token's occurrence list (cluster order) for the merges.
 *   2. attend:  per cluster, gather its queries and keys into tiles and run the engine
 *               with the position mask -> one output row and lse per (cluster, query).
 *   3. merge:   per token, combine its rows: mean, or log-sum-exp weights.
 * The backward recomputes 1-3, runs the engine backward per cluster into per-slot
 * gradient rows, and merges them per token in cluster order.  Parallel loops run over
 * clusters (2.) and tokens (3.), each writing its own rows: results do not depend on
 * the number of threads.
 */

/* Per-problem buffers of the routing planner: the forward's slot statistics (the caller's
 * output arrays, or the backward's own when it recomputes) and the backward's slot gradients. */
typedef struct {
    const RaRoutingPlan *plan;
    T *o_slot;        /* (c·w, e) output row of each (cluster, query) slot whose token
                                  is in several clusters (others: not written) */
    RaMat merged;     /* (n, e)   forward: the merged output (rows of one-cluster tokens
                                  are written by the attend step) */
    T *l_slot;        /* (c·w)    its log-sum-exp */
    uint8_t *self_only; /* (c·w)  exclude_self fell back to the query's own key */
    T *out;           /* (n, e)   merged output (backward only) */
    T *lse;           /* (n)      merged log-sum-exp (backward only) */
    T *delta_tok;     /* (n)      backward: dout_i · out_i, for the tokens whose slots
                                  use the merged row (lse merge, or in one cluster) */
    T *dq_slot;       /* (c·w, d) backward only; like dk_slot, dv_slot: rows of tokens in
                                  several clusters only */
    RaMat dq, dk, dv; /* backward: the problem's gradients, (n, d), (m, d), (m, e) */
    T *dk_slot;       /* (c·u, d) backward only */
    T *dv_slot;       /* (c·u, e) backward only */
    const FN(RaPairs) *pairs;  /* the problem's pair terms, or NULL */
    T *dbias_part;    /* (G, r)   backward: the relative bias gradient of each group of
                                  consecutive clusters (RA_BIAS_GROUPS), or NULL */
    int r;            /* n + m - 1 */
} FN(RoutingBuffers);

/* One thread's scratch for a cluster (u keys at most).  Forward: kᵀ (d, u), v (u, e)
 * (packed by ra_pack_keys), a query tile and the next cluster's lines to hint
 * (routing_hint_lines); backward: kᵀ, k (u, d), vᵀ (e, u) (packed), the cluster's key
 * gradients dk (u, d), dv (u, e), then per query tile q (BQ, d), dout (BQ, e), lse, delta
 * (BQ), dq (BQ, d), a gradient tile and the next cluster's lines to hint. */
typedef struct {
    T *k, *kt, *v, *vt, *q, *dout, *lse, *delta, *dk, *dv, *dq;
    FN(RaQTile) qt;
    FN(RaQGradTile) g;
    RaHints *hints;
} FN(RoutingTile);

/* Query rows per forward tile: a cluster of 128 queries runs as one tile, all its rows
 * hinted by the lookahead (the benchmark's clusters 3-4 % faster than as two tiles of
 * RA_BQ; 256 rows measured no faster on clusters of 256).  The backward keeps RA_BQ (128
 * measured the same). */
#ifndef RA_ROUTING_BQ
#define RA_ROUTING_BQ 128
#endif

/* The lines hinted for one cluster at most: its u key rows of k and v and its first
 * RA_ROUTING_BQ query rows of q and the output (forward) or dout (backward), each row one
 * line more than its length in lines when it does not start on a line boundary; the
 * backward as many again for the rows its gradients go to (dk, dv and dq). */
static size_t FN(routing_hint_lines)(int d, int e, int u, int backward)
{
    const size_t per_row = (sizeof(T) * (size_t)d + 63) / 64
                           + (sizeof(T) * (size_t)e + 63) / 64 + 2;
    return ra_mul(per_row, ra_mul((size_t)u + RA_ROUTING_BQ, backward ? 2 : 1));
}

static void FN(routing_tile)(RaArena *a, FN(RoutingTile) *t, int d, int e, int u, int backward)
{
    t->hints = NULL;
    t->v = NULL;
    t->kt = RA_TAKE(a, T, ra_spread_size(d, u, sizeof(T)));
    if (!backward) {
        t->v = RA_TAKE(a, T, ra_spread_size(u, e, sizeof(T)));
        t->q = FN(ra_qtile_layout)(&t->qt, a, RA_ROUTING_BQ, d, e);
        t->hints = RA_TAKE(a, RaHints, 1);
        uintptr_t *runs = RA_TAKE(a, uintptr_t, FN(routing_hint_lines)(d, e, u, 0));
        if (t->hints) t->hints->run = runs;
        t->qt.hints = t->hints;
        return;
    }
    t->k = RA_TAKE(a, T, ra_spread_size(u, d, sizeof(T)));
    t->vt = RA_TAKE(a, T, ra_spread_size(e, u, sizeof(T)));
    t->dk = RA_TAKE(a, T, ra_mul(u, d));
    t->dv = RA_TAKE(a, T, ra_mul(u, e));
    t->dq = RA_TAKE(a, T, (size_t)RA_BQ * d);
    t->q = RA_TAKE(a, T, (size_t)RA_BQ * d);
    t->dout = RA_TAKE(a, T, (size_t)RA_BQ * e);
    t->lse = RA_TAKE(a, T, RA_BQ);
    t->delta = RA_TAKE(a, T, RA_BQ);
    FN(ra_qgrad_layout)(&t->g, a, RA_BQ, NULL);
    t->hints = RA_TAKE(a, RaHints, 1);
    uintptr_t *runs = RA_TAKE(a, uintptr_t, FN(routing_hint_lines)(d, e, u, 1));
    if (t->hints) t->hints->run = runs;
}

/* Bytes of one thread's scratch: the larger of the two layouts when the backward (which
 * may run the forward again in the same scratch) is coming. */
static size_t FN(routing_tile_bytes)(int d, int e, int u, int backward)
{
    FN(RoutingTile) t;
    RaArena f = {NULL, 0}, b = {NULL, 0};
    FN(routing_tile)(&f, &t, d, e, u, 0);
    if (backward) FN(routing_tile)(&b, &t, d, e, u, 1);
    return f.used > b.used ? f.used : b.used;
}

/* ------------------------------------------------------------------ 2. attend (forward) */
/* The backward's gradient rows of one cluster's members (positions pos, rows (count,
 * width), the members' shared flags) to their homes: a token in this cluster only
 * straight to its row of the result (times mul), a token in several clusters to its slot
 * row, summed later (routing_sum_slots).  (The forward writes its rows there as it
 * finishes them.) */
static void FN(routing_place_grads)(const uint8_t *shared, const int64_t *pos, int count,
                                    const T *rows, int width, T *slot_rows, T mul, RaMat dst)
{
    for (int r = 0; r < count; r++) {
        const int64_t i = pos[r];
        const T *src = rows + (ptrdiff_t)r * width;
        if (shared[r]) {
            memcpy(slot_rows + (ptrdiff_t)r * width, src, sizeof(T) * (size_t)width);
        } else if (dst.s1 == (ptrdiff_t)sizeof(T)) {
            T *o = (T *)(dst.data + i * dst.s0);
            if (mul == 1) memcpy(o, src, sizeof(T) * (size_t)width);
            else for (int c = 0; c < width; c++) o[c] = src[c] * mul;
        } else {
            for (int c = 0; c < width; c++) RA_MAT_AT(T, dst, i, c) = mul * src[c];
        }
    }
}

/* Cluster cl: queries qlist[cl·w ..] (nq of them), keys klist[cl·u ..] (nk).
 * l_slot row cl·w + r receives the lse of the r-th member query, its output row goes
 * to o_slot row cl·w + r (a token in several clusters) or straight to the merged output. */
static void FN(routing_cluster_forward)(const KT *K, const RaRoutingPlan *P, int cl, RaMat q,
                                        RaMat k, RaMat v, T scale, int flags, T *ws,
                                        FN(RoutingBuffers) *buf)
{
    const int d = P->d, e = P->e, nq = P->qcount[cl], nk = P->kcount[cl];
    const int64_t *qpos = P->qlist + (ptrdiff_t)cl * P->w;
    const int64_t *kpos = P->klist + (ptrdiff_t)cl * P->u;
    for (int r = nq; r < P->w; r++) {        /* empty slots: defined values, never read */
        const ptrdiff_t slot = (ptrdiff_t)cl * P->w + r;
        memset(buf->o_slot + slot * e, 0, sizeof(T) * (size_t)e);
        buf->l_slot[slot] = -INFINITY;
        buf->self_only[slot] = 0;
    }
    if (nq == 0) return;
    RaArena a = {(char *)ws, 0};
    FN(RoutingTile) t;
    FN(routing_tile)(&a, &t, d, e, P->u, 0);
    FN(RaQTile) qt = t.qt;
    T *const qs = t.q;
    /* the scale goes into kᵀ, so the query rows are copied as they are */
    FN(RaKeys) keys = FN(ra_pack_keys)(k, kpos, v, kpos, nk, d, e, scale, NULL, t.kt, t.v,
                                        NULL);
    keys.pos = kpos;
    for (int r0 = 0; r0 < nq; r0 += RA_ROUTING_BQ) {
        qt.rows = nq - r0 < RA_ROUTING_BQ ? nq - r0 : RA_ROUTING_BQ;
        qt.pos = qpos + r0;
        qt.pairs = buf->pairs;
        FN(ra_gather)(q, qt.pos, 0, qt.rows, d, 1, 0, qs, d);
        FN(ra_fwd_init)(&qt, e);
        FN(ra_attend)(K, &qt, &keys, d, e, flags);
        uint8_t *self_only = buf->self_only + (ptrdiff_t)cl * P->w + r0;
        if (flags & RA_EXCLUDE_SELF) FN(ra_attend_self_fallback)(&qt, &keys, d, e, self_only);
        else memset(self_only, 0, (size_t)qt.rows);
        const ptrdiff_t slot0 = (ptrdiff_t)cl * P->w + r0;
        for (int r = 0; r < qt.rows; r++) {   /* each row finished where it goes */
            const int shared = P->q_shared[slot0 + r];
            char *o = shared ? (char *)(buf->o_slot + (slot0 + r) * e)
                             : buf->merged.data + qt.pos[r] * buf->merged.s0;
            FN(ra_fwd_finish_row)(&qt, r, e, o, shared ? (ptrdiff_t)sizeof(T) : buf->merged.s1,
                                  buf->l_slot + slot0 + r);
        }
    }
}

/* ------------------------------------------------------------------ 3. merge (forward) */
/* Token i: its rows merged by the engine's log-sum-exp merge (lse), or their mean with
 * the same L = logsumexp l_c as lse; in no cluster: 0 and -inf. */
static void FN(routing_merge_token)(const RaRoutingPlan *P, const FN(RoutingBuffers) *buf,
                                    int64_t i, int merge_lse, RaMat out, RaVec lse)
{
    const int e = P->e;
    const int64_t a = P->q_start[i], z = P->q_start[i + 1];
    T *dst = (T *)(out.data + i * out.s0);
    const int contiguous = out.s1 == (ptrdiff_t)sizeof(T);
    if (z - a == 1) {             /* the common case: one cluster, the row is in place */
        RA_VEC_AT(T, lse, i) = buf->l_slot[P->q_occ[a]];
        return;
    }
    const int count = (int)(z - a);
    const T L = FN(ra_lse_merge)(count, P->q_occ + a, buf->l_slot, merge_lse ? buf->o_slot : NULL,
                                 e, (char *)dst, out.s1);
    RA_VEC_AT(T, lse, i) = L;
    if (merge_lse) return;
    if (z == a)                                /* in no cluster: 0 */
        for (int c = 0; c < e; c++) RA_MAT_AT(T, out, i, c) = 0;
    const T wgt = (T)1 / (T)(count > 0 ? count : 1);   /* no 1/0 (an FP flag) for 0 rows */
    for (int64_t t = a; t < z; t++) {          /* the mean: Σ o / count, in cluster order */
        const T *o = buf->o_slot + P->q_occ[t] * e;
        if (contiguous && t == a) for (int c = 0; c < e; c++) dst[c] = 0 + wgt * o[c];
        else if (contiguous) for (int c = 0; c < e; c++) dst[c] += wgt * o[c];
        else for (int c = 0; c < e; c++)
            RA_MAT_AT(T, out, i, c) = (t == a ? 0 : RA_MAT_AT(T, out, i, c)) + wgt * o[c];
    }
}

/* What the forward's clusters share. */
typedef struct {
    const KT *K;
    const RaRoutingPlan *P;
    RaMat q, k, v;
    T scale;
    int flags;
    char *scratch;
    size_t per_thread;
    FN(RoutingBuffers) *buf;
} FN(RoutingForward);

/* Thread tid's hint queue in its scratch, in the forward's or the backward's layout. */
static RaHints *FN(thread_hints)(char *scratch, size_t per_thread, const RaRoutingPlan *P,
                                 int tid, int backward)
{
    RaArena a = {scratch + (size_t)tid * per_thread, 0};
    FN(RoutingTile) t;
    FN(routing_tile)(&a, &t, P->d, P->e, P->u, backward);
    return t.hints;
}

/* Every thread's hint queue emptied: a thread's first cluster hints none. */
static void FN(empty_hint_queues)(char *scratch, size_t per_thread, const RaRoutingPlan *P,
                                  int nt, int backward)
{
    for (int t = 0; t < nt; t++) {
        RaHints *h = FN(thread_hints)(scratch, per_thread, P, t, backward);
        h->next = h->count = 0;
        h->per_fma = h->owed = 0;
    }
}

static RaHints *FN(routing_hints)(const FN(RoutingForward) *F, int tid)
{
    return FN(thread_hints)(F->scratch, F->per_thread, F->P, tid, 0);
}

/* Queue the lines of cluster cl's key rows (of a and b) and its first RA_ROUTING_BQ
 * query rows (of c and o) for thread-local hinting. */
static void FN(queue_cluster_lines)(RaHints *h, const RaRoutingPlan *P, ptrdiff_t cl, RaMat a,
                                    RaMat b, RaMat c, RaMat o)
{
    const int64_t *kpos = P->klist + cl * P->u, *qpos = P->qlist + cl * P->w;
    const size_t lines = FN(routing_hint_lines)(P->d, P->e, P->u, 0);
    const int cap = lines > 0x7fffffff ? 0x7fffffff : (int)lines;
    for (int j = 0; j < P->kcount[cl]; j++) {
        if (kpos[j] < 0) continue;
        ra_hints_add_row(h, cap, a, kpos[j], P->d, sizeof(T));
        ra_hints_add_row(h, cap, b, kpos[j], P->e, sizeof(T));
    }
    for (int i = 0; i < P->qcount[cl] && i < RA_ROUTING_BQ; i++) {
        if (qpos[i] < 0) continue;
        ra_hints_add_row(h, cap, c, qpos[i], P->d, sizeof(T));
        ra_hints_add_row(h, cap, o, qpos[i], P->e, sizeof(T));
    }
}

/* Cluster cl's forward, its products hinting the lines routing_fetch_cluster queued; the
 * lines still queued at its end are hinted then. */
static void FN(routing_cluster_unit)(const void *ctx, ptrdiff_t cl)
{
    const FN(RoutingForward) *F = ctx;
    const RaRoutingPlan *P = F->P;
    RaHints *h = FN(routing_hints)(F, ra_thread_id());
    /* the next cluster's lines hinted in proportion to this one's products (q·kᵀ, p·v); at
       a fixed count per micro-tile they all went out during q·kᵀ (w = 128), or a quarter
       of them was left for a burst at the end (w = 32).  AVX-512 host, 1 thread, new /
       old: 0.972-0.983 at w = 128, 0.988-0.990 at w = 32, 0.995-1.000 at w = 64, 0.998
       at w = 256 */
    ra_hints_pace(h, (double)P->qcount[cl] * P->kcount[cl] * ((double)P->d + P->e));
    FN(routing_cluster_forward)(F->K, F->P, (int)cl, F->q, F->k, F->v, F->scale, F->flags,
                                (T *)(F->scratch + (size_t)ra_thread_id() * F->per_thread),
                                F->buf);
    ra_hints_issue(h, h->count);
    h->next = h->count = 0;
}

/* Queue the lines cluster cl's forward reads first — its keys' rows of k and v, its first
 * query tile's rows of q and of the merged output — for this thread's current cluster to
 * hint (routing_cluster_unit). */
static void FN(routing_fetch_cluster)(const void *ctx, ptrdiff_t cl)
{
    const FN(RoutingForward) *F = ctx;
    FN(queue_cluster_lines)(FN(routing_hints)(F, ra_thread_id()), F->P, cl, F->k, F->v, F->q,
                            F->buf->merged);
}

/* Forward of one problem: attend per cluster (parallel, the next cluster's rows hinted
 * meanwhile), then merge per token (parallel) into out (n, e) / lse (n) given as strided
 * views. */
static void FN(routing_problem_forward)(const KT *K, const RaRoutingPlan *P, RaMat q, RaMat k,
                                        RaMat v, T scale, int flags, int merge_lse,
                                        char *scratch, size_t per_thread,
                                        FN(RoutingBuffers) *buf, RaMat out, RaVec lse)
{
    const int nt = ra_num_threads();
    buf->merged = out;
    const FN(RoutingForward) F = {K, P, q, k, v, scale, flags, scratch, per_thread, buf};
    FN(empty_hint_queues)(scratch, per_thread, P, nt, 0);
    ra_lookahead_for(nt, P->c, FN(routing_fetch_cluster), FN(routing_cluster_unit), &F);
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < P->n; i++)
        FN(routing_merge_token)(P, buf, i, merge_lse, out, lse);
}

/* q (B; n, d), k (B; m, d), v (B; m, e), q_idx (B; c, w), k_idx (B; c, u)
 * -> out (B; n, e), lse (B; n), and the per-slot statistics (contiguous per problem):
 *    slots.o (B; c, w, e), slots.l (B; c, w), slots.self_only (B; c, w) */
int FN(ra_routing_forward)(ptrdiff_t B, int n, int m, int d, int e, int c, int w, int u,
                           RaBMat q, RaBMat k, RaBMat v, RaBMat q_idx, RaBMat k_idx,
                           RaBVec scale, RaBVec causal, RaBVec exclude_self, RaBVec merge_lse,
                           const RaBPairs *pairs, RaBMat out, RaBVec lse, RaRoutingSlots slots)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    RaRoutingPlan plan;
    if (ra_routing_plan_alloc(&plan, n, m, d, e, c, w, u) != RA_OK) return RA_ERR_NOMEM;
    const size_t per_thread = FN(routing_tile_bytes)(d, e, u, 0);
    FN(RoutingBuffers) buf = {&plan};
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    int status = scratch ? RA_OK : RA_ERR_NOMEM;
    for (ptrdiff_t b = 0; b < B && status == RA_OK; b++) {
        status = ra_routing_plan_build(&plan, ra_mat_at(q_idx, b), ra_mat_at(k_idx, b), 0);
        if (status != RA_OK) break;
        buf.o_slot = (T *)(slots.o + b * slots.o_sb);
        buf.l_slot = (T *)(slots.l + b * slots.l_sb);
        buf.self_only = (uint8_t *)(slots.self_only + b * slots.self_sb);
        FN(RaPairs) pr;
        buf.pairs = FN(ra_pairs_at)(pairs, b, n, NULL, &pr);
        const int flags = ra_routing_flags(RA_VEC_AT(uint8_t, ra_vec_at(causal, b), 0),
                                           RA_VEC_AT(uint8_t, ra_vec_at(exclude_self, b), 0));
        FN(routing_problem_forward)(K, &plan, ra_mat_at(q, b), ra_mat_at(k, b), ra_mat_at(v, b),
                                    RA_VEC_AT(T, ra_vec_at(scale, b), 0), flags,
                                    RA_VEC_AT(uint8_t, ra_vec_at(merge_lse, b), 0), scratch,
                                    per_thread, &buf, ra_mat_at(out, b), ra_vec_at(lse, b));
    }
    ra_free(scratch);
    ra_routing_plan_free(&plan);
    return status;
}

#include "routing_backward_body.h"
