/* routing_backward_body.h — routing attention's backward (typed body, included by
 * routing_body.h): per-cluster gradients on the engine, the next cluster's rows hinted
 * meanwhile, then the per-slot gradients summed per token. */
/* ------------------------------------------------------------------ backward */
/* The relative bias gradient is summed per group of consecutive clusters (a function of
 * the shape only, so the same bits for any thread count): group of cluster cl of c. */
#ifndef RA_BIAS_GROUPS
#define RA_BIAS_GROUPS 8
#endif
static inline int FN(bias_group)(int cl, int c)
{
    const int groups = c < RA_BIAS_GROUPS ? c : RA_BIAS_GROUPS;
    return (int)((int64_t)cl * groups / c);
}

/* Cluster cl: gradient rows dq (w.r.t. the scaled query, times scale), dk, dv, placed by
 * routing_place_grads.
 * The gradient reaching slot (cl, r) of token i is dO = dout_i / count_i (mean) or
 * dout_i with the merged lse L_i and delta_i = dout_i·out_i (lse merge: exactly the
 * gradient of one softmax over the concatenated key lists). */
static void FN(routing_cluster_backward)(const KT *K, const RaRoutingPlan *P, int cl, RaMat dout,
                                         RaMat q, RaMat k, RaMat v, T scale, int flags,
                                         int merge_lse, T *ws, FN(RoutingBuffers) *buf)
{
    const int d = P->d, e = P->e, nq = P->qcount[cl], nk = P->kcount[cl];
    const int64_t *qpos = P->qlist + (ptrdiff_t)cl * P->w;
    const int64_t *kpos = P->klist + (ptrdiff_t)cl * P->u;
    RaArena a = {(char *)ws, 0};
    FN(RoutingTile) t;
    FN(routing_tile)(&a, &t, d, e, P->u, 1);
    T *const dk = t.dk, *const dv = t.dv;
    memset(dk, 0, sizeof(T) * (size_t)nk * d);
    memset(dv, 0, sizeof(T) * (size_t)nk * e);
    const uint8_t *const k_shared = P->k_shared + (ptrdiff_t)cl * P->u;
    if (nq == 0 || nk == 0) {
        memset(t.dq, 0, sizeof(T) * (size_t)RA_BQ * d);
        for (int r0 = 0; r0 < nq; r0 += RA_BQ) {
            const ptrdiff_t slot0 = (ptrdiff_t)cl * P->w + r0;
            FN(routing_place_grads)(P->q_shared + slot0, qpos + r0,
                                    nq - r0 < RA_BQ ? nq - r0 : RA_BQ, t.dq, d,
                                    buf->dq_slot + slot0 * d, scale, buf->dq);
        }
        FN(routing_place_grads)(k_shared, kpos, nk, dk, d,
                                buf->dk_slot + (ptrdiff_t)cl * P->u * d, 1, buf->dk);
        FN(routing_place_grads)(k_shared, kpos, nk, dv, e,
                                buf->dv_slot + (ptrdiff_t)cl * P->u * e, 1, buf->dv);
        return;
    }
    FN(RaQGradTile) g = t.g;
    g.hints = t.hints;                  /* the lines the next cluster reads (lookahead) */
    T *const qs = t.q, *const dop = t.dout, *const lrow = t.lse, *const delta = t.delta;
    FN(RaKeys) keys = FN(ra_pack_keys)(k, kpos, v, kpos, nk, d, e, 1, t.k, t.kt, NULL, t.vt);
    keys.pos = kpos;
    FN(RaPairs) pairs;                  /* this cluster's own bias gradient row */
    if (buf->pairs) {
        pairs = *buf->pairs;
        pairs.dbias = buf->dbias_part ? buf->dbias_part + (ptrdiff_t)FN(bias_group)(cl, P->c) * buf->r
                                        + (P->n - 1) : NULL;
        g.pairs = &pairs;
    }
    for (int r0 = 0; r0 < nq; r0 += RA_BQ) {
        const int rows = nq - r0 < RA_BQ ? nq - r0 : RA_BQ;
        const ptrdiff_t slot0 = (ptrdiff_t)cl * P->w + r0;
        FN(ra_gather)(q, qpos + r0, 0, rows, d, scale, 0, qs, d);
        FN(ra_gather)(dout, qpos + r0, 0, rows, e, 1, 0, dop, e);
        for (int r = 0; r < rows; r++) {
            const int64_t i = qpos[r0 + r], slot = slot0 + r;
            const int shared = P->q_shared[slot];
            const T wgt = merge_lse || !shared ? 1
                                                : (T)1 / (T)(P->q_start[i + 1] - P->q_start[i]);
            T *dr = dop + (ptrdiff_t)r * e;
            if (wgt != 1)
                for (int c = 0; c < e; c++) dr[c] *= wgt;
            delta[r] = merge_lse || !shared
                       ? buf->delta_tok[i]        /* dO = dout_i on the merged row */
                       : FN(ra_dot)((const char *)dr, sizeof(T),
                                    (const char *)(buf->o_slot + slot * e), sizeof(T), e);
            lrow[r] = merge_lse ? buf->lse[i] : buf->l_slot[slot];
        }
        T *const dq = t.dq;
        memset(dq, 0, sizeof(T) * (size_t)rows * d);
        g.rows = rows;
        g.q = qs;
        g.dout = dop;
        g.lse = lrow;
        g.delta = delta;
        g.pos = qpos + r0;
        g.dq = dq;
        FN(ra_attend_backward)(K, &g, &keys, dk, d, dv, e, d, e, flags,
                               buf->self_only + slot0);
        FN(routing_place_grads)(P->q_shared + slot0, qpos + r0, rows, dq, d,
                                buf->dq_slot + slot0 * d, scale, buf->dq);
    }
    FN(routing_place_grads)(k_shared, kpos, nk, dk, d, buf->dk_slot + (ptrdiff_t)cl * P->u * d,
                            1, buf->dk);
    FN(routing_place_grads)(k_shared, kpos, nk, dv, e, buf->dv_slot + (ptrdiff_t)cl * P->u * e,
                            1, buf->dv);
}

/* Sum the slot rows of one token (occurrences [a, z) in cluster order) into dst. */
static void FN(routing_sum_slots)(const int64_t *occ, int64_t a, int64_t z, const T *rows,
                                  int width, T mul, RaMat dst, int64_t i)
{
    if (dst.s1 != (ptrdiff_t)sizeof(T)) {
        for (int c = 0; c < width; c++) {
            T acc = 0;
            for (int64_t t = a; t < z; t++) acc += rows[occ[t] * width + c];
            RA_MAT_AT(T, dst, i, c) = mul * acc;
        }
        return;
    }
    /* unit-stride row: whole slot rows at a time (the same sums, in the same order; the
       first row is copied rather than added to zero, and a multiplier of 1 is skipped) */
    T *o = (T *)(dst.data + (ptrdiff_t)i * dst.s0);
    if (z == a) {
        memset(o, 0, sizeof(T) * (size_t)width);
        return;
    }
    memcpy(o, rows + occ[a] * width, sizeof(T) * (size_t)width);
    for (int64_t t = a + 1; t < z; t++) {
        const T *r = rows + occ[t] * width;
        for (int c = 0; c < width; c++) o[c] += r[c];
    }
    if (mul != 1)
        for (int c = 0; c < width; c++) o[c] *= mul;
}


/* What the backward's clusters share. */
typedef struct {
    const KT *K;
    const RaRoutingPlan *P;
    RaMat dout, q, k, v;
    T scale;
    int flags, merge_lse;
    char *scratch;
    size_t per_thread;
    FN(RoutingBuffers) *buf;
} FN(RoutingBackward);

/* Queue the rows cluster cl's backward reads first (k, v, q, dout), then the result rows
 * it writes in place (dq of its first RA_ROUTING_BQ queries, dk and dv of its keys; not
 * the slot rows, which are consecutive), for this thread's current cluster to hint: the
 * lines then arrive before the writes, which otherwise wait on them. */
static void FN(routing_fetch_cluster_grads)(const void *ctx, ptrdiff_t cl)
{
    const FN(RoutingBackward) *B = ctx;
    const RaRoutingPlan *P = B->P;
    RaHints *h = FN(thread_hints)(B->scratch, B->per_thread, P, ra_thread_id(), 1);
    FN(queue_cluster_lines)(h, P, cl, B->k, B->v, B->q, B->dout);
    const size_t lines = FN(routing_hint_lines)(P->d, P->e, P->u, 1);
    const int cap = lines > 0x7fffffff ? 0x7fffffff : (int)lines;
    const int64_t *kpos = P->klist + cl * P->u, *qpos = P->qlist + cl * P->w;
    for (int i = 0; i < P->qcount[cl] && i < RA_ROUTING_BQ; i++)
        if (qpos[i] >= 0 && !P->q_shared[cl * P->w + i])
            ra_hints_add_row(h, cap, B->buf->dq, qpos[i], P->d, sizeof(T));
    for (int j = 0; j < P->kcount[cl]; j++) {
        if (kpos[j] < 0 || P->k_shared[cl * P->u + j]) continue;
        ra_hints_add_row(h, cap, B->buf->dk, kpos[j], P->d, sizeof(T));
        ra_hints_add_row(h, cap, B->buf->dv, kpos[j], P->e, sizeof(T));
    }
}

/* Cluster cl's backward, the queued lines paced over its hinting products (the logits
 * again, dout·vᵀ, ds·k: 2d + e multiply-adds per pair); the rest hinted at its end. */
static void FN(routing_cluster_grads_unit)(const void *ctx, ptrdiff_t cl)
{
    const FN(RoutingBackward) *B = ctx;
    const RaRoutingPlan *P = B->P;
    const int tid = ra_thread_id();
    RaHints *h = FN(thread_hints)(B->scratch, B->per_thread, P, tid, 1);
    ra_hints_pace(h, (double)P->qcount[cl] * P->kcount[cl] * (2.0 * P->d + P->e));
    FN(routing_cluster_backward)(B->K, P, (int)cl, B->dout, B->q, B->k, B->v, B->scale, B->flags,
                                 B->merge_lse, (T *)(B->scratch + (size_t)tid * B->per_thread),
                                 B->buf);
    ra_hints_issue(h, h->count);
    h->next = h->count = 0;
}
/* dout (B; n, e), q, k, v, q_idx, k_idx -> dq (B; n, d), dk (B; m, d), dv (B; m, e).
 * With saved.o != NULL, the forward's merged output (B; n, e) and lse (B; n) (both
 * contiguous per problem) and its slot statistics are used instead of recomputing it. */
int FN(ra_routing_backward)(ptrdiff_t B, int n, int m, int d, int e, int c, int w, int u,
                            RaBMat dout, RaBMat q, RaBMat k, RaBMat v, RaBMat q_idx,
                            RaBMat k_idx, RaBVec scale, RaBVec causal, RaBVec exclude_self,
                            RaBVec merge_lse, RaBMat saved_out, RaBVec saved_lse,
                            RaRoutingSlots saved, const RaBPairs *pairs, RaBMat dq, RaBMat dk,
                            RaBMat dv)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    RaRoutingPlan plan;
    if (ra_routing_plan_alloc(&plan, n, m, d, e, c, w, u) != RA_OK) return RA_ERR_NOMEM;
    const size_t qslots = (size_t)c * w, kslots = (size_t)c * u;
    const size_t per_thread = FN(routing_tile_bytes)(d, e, u, 1);
    FN(RoutingBuffers) buf = {&plan};
    const int recompute = saved.o == NULL;
    if (recompute) {
        buf.o_slot = ra_alloc(ra_mul(sizeof(T), ra_mul(qslots, e)));
        buf.l_slot = ra_alloc(ra_mul(sizeof(T), qslots));
        buf.self_only = ra_alloc(qslots);
        buf.out = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)n, e)));
        buf.lse = ra_alloc(ra_mul(sizeof(T), (size_t)n));
    }
    buf.delta_tok = ra_alloc(ra_mul(sizeof(T), (size_t)n));
    buf.dq_slot = ra_alloc(ra_mul(sizeof(T), ra_mul(qslots, d)));
    buf.dk_slot = ra_alloc(ra_mul(sizeof(T), ra_mul(kslots, d)));
    buf.dv_slot = ra_alloc(ra_mul(sizeof(T), ra_mul(kslots, e)));
    buf.r = pairs->bias.data && pairs->dbias.data ? n + m - 1 : 0;
    const int groups = c < RA_BIAS_GROUPS ? c : RA_BIAS_GROUPS;
    buf.dbias_part = buf.r ? ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)groups, buf.r))) : NULL;
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    int status = (!recompute || (buf.o_slot && buf.l_slot && buf.self_only && buf.out && buf.lse)) &&
                 buf.delta_tok && buf.dq_slot && buf.dk_slot && buf.dv_slot && scratch &&
                 (!buf.r || buf.dbias_part)
                 ? RA_OK : RA_ERR_NOMEM;
    for (ptrdiff_t b = 0; b < B && status == RA_OK; b++) {
        status = ra_routing_plan_build(&plan, ra_mat_at(q_idx, b), ra_mat_at(k_idx, b), 1);
        if (status != RA_OK) break;
        const int flags = ra_routing_flags(RA_VEC_AT(uint8_t, ra_vec_at(causal, b), 0),
                                           RA_VEC_AT(uint8_t, ra_vec_at(exclude_self, b), 0));
        const int lse_merge = RA_VEC_AT(uint8_t, ra_vec_at(merge_lse, b), 0) != 0;
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, b), 0);
        RaMat qb = ra_mat_at(q, b), kb = ra_mat_at(k, b), vb = ra_mat_at(v, b);
        RaMat gb = ra_mat_at(dout, b);
        buf.dq = ra_mat_at(dq, b);
        buf.dk = ra_mat_at(dk, b);
        buf.dv = ra_mat_at(dv, b);
        FN(RaPairs) pr;
        buf.pairs = FN(ra_pairs_at)(pairs, b, n, NULL, &pr);
        if (recompute) {   /* the forward again: slot rows, merged output and lse */
            RaMat outm = {(char *)buf.out, (ptrdiff_t)sizeof(T) * e, sizeof(T)};
            RaVec lsev = {(char *)buf.lse, sizeof(T)};
            FN(routing_problem_forward)(K, &plan, qb, kb, vb, sc, flags, lse_merge, scratch,
                                        per_thread, &buf, outm, lsev);
        } else {
            buf.o_slot = (T *)(saved.o + b * saved.o_sb);
            buf.l_slot = (T *)(saved.l + b * saved.l_sb);
            buf.self_only = (uint8_t *)(saved.self_only + b * saved.self_sb);
            buf.out = (T *)(saved_out.data + b * saved_out.sb);
            buf.lse = (T *)(saved_lse.data + b * saved_lse.sb);
        }
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < n; i++)      /* one pass in token order, not per slot */
            if (lse_merge || plan.q_start[i + 1] - plan.q_start[i] == 1)
                buf.delta_tok[i] = FN(ra_dot)(gb.data + i * gb.s0, gb.s1,
                                              (const char *)(buf.out + i * e), sizeof(T), e);
        FN(empty_hint_queues)(scratch, per_thread, &plan, nt, 1);   /* the bias path hints none */
        if (buf.r) {
            /* with a bias gradient: groups of consecutive clusters in parallel, each one
               group's clusters in order into the group's own partial */
            #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
            for (int g = 0; g < groups; g++) {
                memset(buf.dbias_part + (size_t)g * buf.r, 0, sizeof(T) * (size_t)buf.r);
                for (int cl = 0; cl < c; cl++)
                    if (FN(bias_group)(cl, c) == g)
                        FN(routing_cluster_backward)(K, &plan, cl, gb, qb, kb, vb, sc, flags,
                                                     lse_merge, (T *)(scratch + (size_t)ra_thread_id() * per_thread),
                                                     &buf);
            }
        } else {
            const FN(RoutingBackward) Bk = {K, &plan, gb, qb, kb, vb, sc, flags, lse_merge,
                                            scratch, per_thread, &buf};
            ra_lookahead_for(nt, c, FN(routing_fetch_cluster_grads), FN(routing_cluster_grads_unit),
                             &Bk);
        }
        /* forward: logits = (scale·q)·kᵀ, so dq = scale · Σ slots; tokens in one cluster
           are written already, tokens in no cluster get zero gradient */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < n; i++)
            if (plan.q_start[i + 1] - plan.q_start[i] != 1)
                FN(routing_sum_slots)(plan.q_occ, plan.q_start[i], plan.q_start[i + 1],
                                      buf.dq_slot, d, sc, buf.dq, i);
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t j = 0; j < m; j++) {
            if (plan.k_start[j + 1] - plan.k_start[j] == 1) continue;
            FN(routing_sum_slots)(plan.k_occ, plan.k_start[j], plan.k_start[j + 1], buf.dk_slot,
                                  d, 1, buf.dk, j);
            FN(routing_sum_slots)(plan.k_occ, plan.k_start[j], plan.k_start[j + 1], buf.dv_slot,
                                  e, 1, buf.dv, j);
        }
        FN(ra_pairs_write_dbias)(pairs, b, buf.r, buf.dbias_part, groups);   /* group order */
    }
    if (recompute) {
        ra_free(buf.o_slot);
        ra_free(buf.l_slot);
        ra_free(buf.self_only);
        ra_free(buf.out);
        ra_free(buf.lse);
    }
    ra_free(buf.delta_tok);
    ra_free(buf.dq_slot);
    ra_free(buf.dk_slot);
    ra_free(buf.dv_slot);
    ra_free(buf.dbias_part);
    ra_free(scratch);
    ra_routing_plan_free(&plan);
    return status;
}
