/* clustered_body.h — typed clustered-attention planner; included by clustered.c per dtype
 * with T, KT, KSEL and FN(name) = name##_<suffix>. */

#include "clustered_passes_body.h"
#include "clustered_front_body.h"

/* Key groups of the centroid passes: enough units for the threads, a function of the
 * shape only. */
static int FN(cl_groups)(ptrdiff_t B, int m, int C)
{
    const int nkb = (m + RA_BK - 1) / RA_BK, nct = (C + RA_CL_ROWS - 1) / RA_CL_ROWS;
    if (nkb == 0) return 1;
    ptrdiff_t G = (RA_CL_TARGET_UNITS + B * nct - 1) / (B * nct);
    return (int)(G > nkb ? nkb : G < 1 ? 1 : G);
}

/* The query tiles of every cluster of every problem: (b, c, first member) triples. */
static FN(ClUnit) *FN(cl_units)(ptrdiff_t B, int C, char *packs, size_t per_problem,
                                int n, int d, int e, int kmax, int G, int backward,
                                int whole_clusters, ptrdiff_t *count)
{
    /* at most n/BQ + C tiles per problem */
    FN(ClUnit) *units = ra_alloc(ra_mul(sizeof(FN(ClUnit)),
                                        ra_mul((size_t)B, (size_t)n / RA_BQ + C + 1)));
    if (!units) return NULL;
    ptrdiff_t u = 0;
    for (ptrdiff_t b = 0; b < B; b++) {
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        for (int c = 0; c < C; c++) {
            const int size = (int)(p.start[c + 1] - p.start[c]);
            for (int i0 = 0; i0 < size; i0 += whole_clusters ? size : RA_BQ) {
                FN(ClUnit) x = {b, c, i0};
                units[u++] = x;
            }
        }
    }
    *count = u;
    return units;
}

/* Query tile u: out_i = r_c + m̂_c · softmax_{T_c}(q_i·K_T)·V_T for its members. */
static void FN(cl_forward_tile)(const void *ctx, ptrdiff_t unit)
{
    const FN(ClForward) *F = ctx;
    const FN(ClUnit) *u = &F->units[unit];
    const KT *K = F->K;
    const ptrdiff_t b = u->b;
    const int c = u->c, d = F->d, e = F->e, kmax = F->kmax;
    FN(ClProblem) p;
    const int64_t *idx;
    const int rows = FN(cl_tile)(F, u, &p, &idx);
    const int kc = (int)p.info[1];
    FN(ClTiles) w;
    FN(cl_tiles)(&(RaArena){F->scratch + (size_t)ra_thread_id() * F->per_thread, 0}, d, e,
                 kmax, &w);
    const T *r = p.oc + (ptrdiff_t)c * e;   /* r_c = o_c, m̂_c = 0 without keys */
    T mh = 0;
    if (kc > 0) {
        FN(cl_pack_topk)(&w, ra_mat_at(F->k, b), ra_mat_at(F->v, b), p.sel + (size_t)c * kmax,
                         kc, d, e, 0);
        const RaMat packed = {(char *)w.v, (ptrdiff_t)sizeof(T) * w.topk.ldv, sizeof(T)};
        FN(RaPairs) cp;
        mh = FN(cl_residual_into)(packed, 1, e, kmax, &p, c,
                                  FN(cl_centroid_pairs)(F->pairs, b, F->n, &cp), w.res);
        r = w.res;
        FN(RaPairs) pr;
        FN(cl_topk_attend)(K, &w, ra_mat_at(F->q, b), idx, rows, d, e,
                           RA_VEC_AT(T, ra_vec_at(F->scale, b), 0), p.sel + (size_t)c * kmax,
                           FN(ra_pairs_at)(F->pairs, b, F->n, NULL, &pr));
    }
    /* out_i = r_c + m̂_c · o'_i, o'_i = acc_i / sum_i normalised on the way (as
       ra_fwd_finish does: a row that saw no key has o' = 0) */
    RaMat o = ra_mat_at(F->out, b);
    for (int i = 0; i < rows; i++) {
        char *row = o.data + (ptrdiff_t)idx[i] * o.s0;
        if (kc == 0) {
            FN(cl_row_write)(o, idx[i], r, e);
            continue;
        }
        const T sum = w.qt.sum[i], inv = sum == 0 ? 0 : 1 / sum;
        const T *a = w.qt.acc + (ptrdiff_t)i * e;
        if (o.s1 == (ptrdiff_t)sizeof(T))       /* unit stride: vectorised */
            for (int f = 0; f < e; f++) ((T *)row)[f] = r[f] + mh * (a[f] * inv);
        else
            for (int f = 0; f < e; f++) *(T *)(row + (ptrdiff_t)f * o.s1) = r[f] + mh * (a[f] * inv);
    }
}

/* ------------------------------------------------------------------ a call */
/* One forward or backward call (see ra_run_problems): its operands, from problem b0 of
 * the batch on, and its shape-derived sizes (G from the whole batch's B, so a problem's
 * result does not depend on the schedule).  The forward leaves dout, dq, dk, dv unset. */
typedef struct {
    const KT *K;
    ptrdiff_t B;
    int n, m, d, e, C, topk, kmax, G;
    size_t per_problem, per_thread;
    RaBMat q, k, v, out, dout, dq, dk, dv;
    RaBVec labels, key_mask, scale;
    RaBPairs pairs;
    RaClusteredSaved saved;
} FN(ClCall);

/* The call's sizes; RA_ERR_VALUE for an impossible form. */
static int FN(cl_call_sizes)(FN(ClCall) *A, int backward)
{
    /* the plain form attends through centroids only: no pair a bias could apply to */
    if (A->C < 1 || A->topk < 0 || (A->topk == 0 && A->pairs.bias.data)) return RA_ERR_VALUE;
    A->K = &ra_kernels()->KSEL;
    A->kmax = A->topk < A->m ? A->topk : A->m;
    A->G = FN(cl_groups)(A->B, A->m, A->C);
    FN(ClProblem) dummy;
    A->per_problem = FN(cl_carve)(NULL, A->n, A->d, A->e, A->C, A->kmax, A->G, backward, &dummy);
    A->per_thread = FN(cl_thread_bytes)(A->d, A->e, A->kmax);
    return RA_OK;
}

/* Problems per thread from which each thread takes whole problems (ra_run_problems):
 * the improved form only, whose per-problem buffers (top-k lists, T_c's key gradients)
 * outgrow the caches when all problems hold theirs at once; the plain form's steps are
 * short enough that a problem's own (nested, one-thread) OpenMP regions would cost more. */
static int FN(cl_whole_from)(const FN(ClCall) *A) { return A->kmax > 0 ? RA_CL_PER_PROBLEM : 0; }

/* The call from problem b0 of its batch on. */
static FN(ClCall) FN(cl_call_from)(const FN(ClCall) *A, ptrdiff_t b0)
{
    FN(ClCall) r = *A;
    RaBMat *mats[] = {&r.q, &r.k, &r.v, &r.out, &r.dout, &r.dq, &r.dk, &r.dv,
                      &r.saved.o, &r.saved.sel, &r.saved.aw};
    RaBVec *vecs[] = {&r.labels, &r.key_mask, &r.scale, &r.saved.lse};
    for (size_t i = 0; i < sizeof mats / sizeof *mats; i++) *mats[i] = ra_bmat_from(*mats[i], b0);
    for (size_t i = 0; i < sizeof vecs / sizeof *vecs; i++) *vecs[i] = ra_bvec_from(*vecs[i], b0);
    r.pairs = ra_pairs_from(&A->pairs, b0);
    return r;
}

/* ------------------------------------------------------------------ forward */
static int FN(cl_forward_batch)(const void *ctx, ptrdiff_t b0, ptrdiff_t B, int nt, char *packs,
                                char *scratch)
{
    const FN(ClCall) call = FN(cl_call_from)(ctx, b0);
    const KT *K = call.K;
    const int n = call.n, m = call.m, d = call.d, e = call.e, C = call.C, topk = call.topk;
    const int kmax = call.kmax, G = call.G;
    const size_t per_problem = call.per_problem, per_thread = call.per_thread;
    const RaBMat q = call.q, k = call.k, v = call.v, out = call.out;
    const RaBVec labels = call.labels, key_mask = call.key_mask, scale = call.scale;
    const RaBPairs *pairs = &call.pairs;
    const RaClusteredSaved saved = call.saved;
    FN(ClUnit) *units = NULL;
    int status = FN(cl_front)(K, B, n, m, d, e, C, topk, kmax, G, q, k, v, labels, key_mask,
                              scale, packs, per_problem, 0, scratch, per_thread, nt, NULL,
                              pairs);
    if (status != RA_OK) goto done;
    if (saved.o.data) {         /* what the backward would otherwise recompute */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t unit = 0; unit < B * C; unit++) {
            const ptrdiff_t b = unit / C;
            const int c = (int)(unit % C);
            FN(ClProblem) p;
            FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, 0, &p);
            RaMat so = ra_mat_at(saved.o, b), ss = ra_mat_at(saved.sel, b);
            RaMat sa = ra_mat_at(saved.aw, b);
            for (int f = 0; f < e; f++) RA_MAT_AT(T, so, c, f) = p.oc[(ptrdiff_t)c * e + f];
            RA_VEC_AT(T, ra_vec_at(saved.lse, b), c) = p.lsec[c];
            for (int t = 0; t < kmax; t++) {
                RA_MAT_AT(int64_t, ss, c, t) = p.sel[(size_t)c * kmax + t];
                RA_MAT_AT(T, sa, c, t) = p.aw[(size_t)c * kmax + t];
            }
        }
    }
    ptrdiff_t nunits;
    units = FN(cl_units)(B, C, packs, per_problem, n, d, e, kmax, G, 0, 0, &nunits);
    status = RA_ERR_NOMEM;
    if (!units) goto done;

    /* 6. every (problem, cluster, member tile), handed out one at a time: a thread claims
       its next tile first and asks for that one's scattered rows while computing this one */
    const FN(ClForward) F = {n, d, e, C, kmax, G, packs, scratch, per_problem, per_thread,
                             q, k, v, out, scale, pairs, K, units};
    ra_lookahead_for(nt, nunits, FN(cl_fetch_tile), FN(cl_forward_tile), &F);

    /* 7. queries labelled -1 output 0 */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        RaVec l = ra_vec_at(labels, b);
        RaMat o = ra_mat_at(out, b);
        for (int i = 0; i < n; i++)
            if (RA_VEC_AT(int64_t, l, i) < 0)
                for (int f = 0; f < e; f++) RA_MAT_AT(T, o, i, f) = 0;
    }
    status = RA_OK;
done:
    ra_free(units);
    return status;
}

/* q (B; n, d), k (B; m, d), v (B; m, e), labels (B; n), key_mask (B; m) or NULL,
 * scale (B) -> out (B; n, e) */
int FN(ra_clustered_forward)(ptrdiff_t B, int n, int m, int d, int e, int C, int topk,
                             RaBMat q, RaBMat k, RaBMat v, RaBVec labels, RaBVec key_mask,
                             RaBVec scale, const RaBPairs *pairs, RaBMat out,
                             RaClusteredSaved saved)
{
    FN(ClCall) A = {.B = B, .n = n, .m = m, .d = d, .e = e, .C = C, .topk = topk, .q = q,
                    .k = k, .v = v, .out = out, .labels = labels, .key_mask = key_mask,
                    .scale = scale, .pairs = *pairs, .saved = saved};
    const int status = FN(cl_call_sizes)(&A, 0);
    return status != RA_OK ? status
                           : ra_run_problems(B, FN(cl_whole_from)(&A), A.per_problem,
                                             A.per_thread, FN(cl_forward_batch), &A);
}

/* ------------------------------------------------------------------ backward */
/* The relative bias gradient is summed per group of consecutive clusters (a function of
 * the shape only: the same bits for any thread count): how many, and cluster c's. */
static inline int FN(cl_bias_groups)(int C) { return C < 8 ? C : 8; }
static inline int FN(cl_bias_group)(int c, int C)
{
    return (int)((int64_t)c * FN(cl_bias_groups)(C) / C);
}

/* Cluster c of problem b: the T_c terms of its gradient, then dq of its members. */
static void FN(cl_cluster_backward)(const FN(ClBackward) *A, ptrdiff_t b, int c)
{
    const KT *K = A->K;
    const int d = A->d, e = A->e, kmax = A->kmax;
    const size_t ts = sizeof(T);
    FN(ClProblem) p = FN(cl_problem)(A, b);
    const int kc = (int)p.info[1];
    const T sc = RA_VEC_AT(T, ra_vec_at(A->scale, b), 0), mh = p.mhat[c];
    const int64_t *members = p.order + p.start[c];
    const int size = (int)(p.start[c + 1] - p.start[c]);
    const int64_t *sel = p.sel + (size_t)c * kmax;
    const T *aw = p.aw + (size_t)c * kmax, *gs = p.gsum + (ptrdiff_t)c * e;
    const T *cen = p.cent + (ptrdiff_t)c * d;
    T *dcen = p.dcent + (ptrdiff_t)c * d;
    /* T_c's key gradients: this cluster's rows of dkt, dvt, or when they go straight into
       dk, dv at the end, the first cluster's rows (reused, so they stay in cache) */
    const size_t own_rows = A->direct ? 0 : (size_t)c * kmax;
    T *dkt = p.dkt + own_rows * d, *dvt = p.dvt + own_rows * e;
    RaMat km = ra_mat_at(A->k, b), vm = ra_mat_at(A->v, b), dqm = ra_mat_at(A->dq, b);
    FN(ClTiles) w = FN(cl_thread_tiles)(A);
    FN(RaPairs) cp, pr;
    const FN(RaPairs) *cpairs = FN(cl_centroid_pairs)(A->pairs, b, A->n, &cp);
    T *dbias = A->dbias_part ? A->dbias_part + ((size_t)b * FN(cl_bias_groups)(A->C) +
                                                FN(cl_bias_group)(c, A->C)) * A->r : NULL;
    const FN(RaPairs) *pairs = FN(ra_pairs_at)(A->pairs, b, A->n, dbias, &pr);

    /* in the forward: r_c −= a_c[j] f_cj v_j for j ∈ T_c (f_cj the centroid dropout
       factor, 1 without), so the dense step over-counted dv_j by a_c[j]·f_cj·gsum_c and
       ds_j by a_c[j]·f_cj·(gsum_c·v_j): undo both */
    /* T_c's keys and values packed: k (kc, d), v (kc, e) rows, and the transposes */
    if (kc > 0) FN(cl_pack_topk)(&w, km, vm, sel, kc, d, e, 1);
    for (int t = 0; t < kc; t++) {   /* every row of dkt, dvt written here first */
        const T af = aw[t] * FN(ra_drop_factor)(cpairs, CL_CENTROID_ROW(c), sel[t]);
        const T ds = -af * FN(ra_dot)((const char *)gs, sizeof(T),
                                      (const char *)(w.v + (ptrdiff_t)t * w.topk.ldv),
                                      sizeof(T), e);
        const T *restrict kr = w.k + (ptrdiff_t)t * w.topk.ldk;
        T *restrict dk_row = dkt + (ptrdiff_t)t * d, *restrict dv_row = dvt + (ptrdiff_t)t * e;
        for (int f = 0; f < e; f++) dv_row[f] = -af * gs[f];
        for (int f = 0; f < d; f++) dk_row[f] = ds * sc * cen[f];
        for (int f = 0; f < d; f++) dcen[f] += sc * ds * kr[f];
    }
    /* forward 6 was out_i = r_c + m̂_c·o'_i with o'_i = softmax_{T_c}(s·q_i·K_T)·V_T and
       m̂_c constant: the engine backward with dout' = m̂_c·dout_i */
    const T inv = size ? (T)1 / (T)size : 0;
    for (int i0 = 0; i0 < size; i0 += RA_BQ) {
        const int rows = size - i0 < RA_BQ ? size - i0 : RA_BQ;
        const int64_t *idx = members + i0;
        if (kc > 0) {
            /* T_c in one tile: the engine works out lse' and delta from it; else the
               softmax over T_c recomputed first for them */
            const int own = kc <= RA_BK;
            if (own) FN(ra_gather)(ra_mat_at(A->q, b), idx, 0, rows, d, sc, 0, w.qs, d);
            else FN(cl_topk_softmax)(K, &w, ra_mat_at(A->q, b), idx, rows, d, e, sc,
                                     sel, pairs);
            FN(ra_gather)(ra_mat_at(A->dout, b), idx, 0, rows, e, mh, 0, w.dout, e);
            for (int i = 0; !own && i < rows; i++)
                w.delta[i] = FN(ra_dot)((const char *)(w.dout + (ptrdiff_t)i * e), sizeof(T),
                                        (const char *)(w.o + (ptrdiff_t)i * e), sizeof(T), e);
            memset(w.dq, 0, ts * (size_t)rows * d);
            w.gt.rows = rows;
            w.gt.pos = pairs ? idx : NULL;
            w.gt.pairs = pairs;
            const FN(RaKeys) keys = FN(cl_topk_keys)(&w, pairs ? sel : NULL);
            FN(ra_attend_backward)(K, &w.gt, &keys, dkt, d, dvt, e, d, e,
                                   own ? RA_OWN_STATS : 0, NULL);
        }
        /* forward 2 was q̄_c = mean of members: each gets dcent_c / |c| */
        for (int i = 0; i < rows; i++) {
            char *row = dqm.data + (ptrdiff_t)idx[i] * dqm.s0;
            const T *dqi = w.dq + (ptrdiff_t)i * d;
            if (dqm.s1 == (ptrdiff_t)sizeof(T) && kc > 0)   /* unit stride: vectorised */
                for (int f = 0; f < d; f++) ((T *)row)[f] = dcen[f] * inv + sc * dqi[f];
            else
                for (int f = 0; f < d; f++)
                    *(T *)(row + (ptrdiff_t)f * dqm.s1) = dcen[f] * inv + (kc > 0 ? sc * dqi[f] : 0);
        }
    }
    /* T_c's key gradients into dk, dv now: every key receives its clusters' terms in
       cluster order, the same sums cl_topk_key_grads makes */
    for (int t = 0; A->direct && t < kc; t++) {
        if (sel[t] < 0) continue;
        FN(cl_row_add)(ra_mat_at(A->dk, b), sel[t], dkt + (ptrdiff_t)t * d, d);
        FN(cl_row_add)(ra_mat_at(A->dv, b), sel[t], dvt + (ptrdiff_t)t * e, e);
    }
}

static void FN(cl_cluster_unit)(const void *ctx, ptrdiff_t unit)
{
    const FN(ClBackward) *A = ctx;
    FN(cl_cluster_backward)(A, A->units[unit].b, A->units[unit].c);
}

/* Key block [j0, j0 + BK) of problem b: the T_c key gradients added into dk, dv, clusters
 * in order (so the sums do not depend on the thread count). */
static void FN(cl_topk_key_grads)(const FN(ClBackward) *A, ptrdiff_t b, int64_t j0)
{
    const int d = A->d, e = A->e, kmax = A->kmax;
    const int64_t j1 = j0 + RA_BK;
    FN(ClProblem) p = FN(cl_problem)(A, b);
    const int kc = (int)p.info[1];
    RaMat dkm = ra_mat_at(A->dk, b), dvm = ra_mat_at(A->dv, b);
    for (int c = 0; c < A->C; c++) {
        if (p.start[c + 1] == p.start[c]) continue;   /* no members: no gradient */
        const int64_t *sel = p.sel + (size_t)c * kmax;
        int lo = 0, hi = kc;                 /* first t with sel[t] >= j0 */
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (sel[mid] < j0) lo = mid + 1; else hi = mid;
        }
        for (int t = lo; t < kc && sel[t] < j1; t++) {
            FN(cl_row_add)(dkm, sel[t], p.dkt + ((size_t)c * kmax + t) * d, d);
            FN(cl_row_add)(dvm, sel[t], p.dvt + ((size_t)c * kmax + t) * e, e);
        }
    }
}

/* Cluster c's gradient sum gsum_c = Σ_{i∈c} dout_i (unless summed already, a problem per
 * thread) and delta_c = gsum_c · r_c. */
static void FN(cl_cluster_gsum)(const FN(ClBackward) *A, ptrdiff_t b, int c, int summed)
{
    FN(ClProblem) p = FN(cl_problem)(A, b);
    T *gs = p.gsum + (ptrdiff_t)c * A->e;
    if (!summed) FN(cl_member_sum)(ra_mat_at(A->dout, b), A->e, &p, c, gs);
    p.delta[c] = FN(ra_dot)((const char *)gs, sizeof(T),
                            (const char *)(p.r + (ptrdiff_t)c * A->e), sizeof(T), A->e);
}

static int FN(cl_backward_batch)(const void *ctx, ptrdiff_t b0, ptrdiff_t B, int nt,
                                 char *packs, char *scratch)
{
    const FN(ClCall) call = FN(cl_call_from)(ctx, b0);
    const int n = call.n, m = call.m, d = call.d, e = call.e, C = call.C, topk = call.topk;
    const int kmax = call.kmax, G = call.G, nkb = (m + RA_BK - 1) / RA_BK;
    const size_t per_problem = call.per_problem, per_thread = call.per_thread;
    const RaBMat dout = call.dout, q = call.q, k = call.k, v = call.v;
    const RaBMat dq = call.dq, dk = call.dk, dv = call.dv;
    const RaBVec labels = call.labels, key_mask = call.key_mask, scale = call.scale;
    const RaBPairs *pairs = &call.pairs;
    RaClusteredSaved saved = call.saved;
    const int r = pairs->bias.data && pairs->dbias.data ? n + m - 1 : 0;
    const int groups = FN(cl_bias_groups)(C);
    T *dbias_part = r ? ra_alloc(ra_mul(sizeof(T), ra_mul(ra_mul((size_t)B, groups), r))) : NULL;
    FN(ClBackward) A = {n, m, d, e, C, kmax, G, packs, scratch, per_problem, per_thread,
                        dout, q, k, v, dq, dk, dv, labels, key_mask, scale, pairs,
                        dbias_part, r, call.K, NULL, nt == 1};
    FN(ClUnit) *units = NULL;
    int status = RA_ERR_NOMEM;
    if (r && !dbias_part) goto done;

    /* forward passes 1-4: recomputed, or from the forward's saved statistics */
    status = FN(cl_front)(call.K, B, n, m, d, e, C, topk, kmax, G, q, k, v, labels, key_mask,
                          scale, packs, per_problem, 1, scratch, per_thread, nt, &saved, pairs);
    if (status != RA_OK) goto done;

    /* forward 6 broadcast r_c to every member, so the cluster's gradient is their sum */
    const int scan = B >= nt;       /* a problem per thread: its dout rows read in order */
    if (scan) {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t b = 0; b < B; b++) {
            FN(ClProblem) p = FN(cl_problem)(&A, b);
            FN(cl_sums_scan)(ra_mat_at(dout, b), ra_vec_at(labels, b), n, e, C, p.gsum);
        }
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++)
        FN(cl_cluster_gsum)(&A, unit / C, (int)(unit % C), scan);

    /* forward 5 was r_c = a_c·V − Σ_{T_c} a_c[j] v_j: first the full a_c·V term, the
       softmax backward with dout = gsum_c and delta_c = gsum_c · r_c (its rowsum(dout ∘
       out)), one (problem, key group) per unit: dk, dv of the group's keys and a dcent
       partial, summed in group order */
    const int blocks_per_group = nkb ? (nkb + G - 1) / G : 0;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * G; unit++) {
        const ptrdiff_t b = unit / G;
        const int g = (int)(unit % G);
        const int t0 = g * blocks_per_group < nkb ? g * blocks_per_group : nkb;
        const int t1 = t0 + blocks_per_group < nkb ? t0 + blocks_per_group : nkb;
        FN(ClProblem) p = FN(cl_problem)(&A, b);
        FN(ClTiles) w = FN(cl_thread_tiles)(&A);
        FN(RaPairs) cp;
        FN(cl_centroid_group_backward)(call.K, &w, ra_mat_at(k, b), ra_mat_at(v, b),
                                       ra_vec_at(key_mask, b), ra_mat_at(dk, b),
                                       ra_mat_at(dv, b), m, C, d, e,
                                       RA_VEC_AT(T, ra_vec_at(scale, b), 0), &p, t0, t1, g,
                                       FN(cl_centroid_pairs)(pairs, b, n, &cp));
    }
    /* logits were (scale·q̄)·kᵀ: dcent = scale · Σ_g dcent_part[g] */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        const int c = (int)(unit % C);
        FN(ClProblem) p = FN(cl_problem)(&A, unit / C);
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, unit / C), 0);
        for (int f = 0; f < d; f++) {
            T acc = 0;
            for (int g = 0; g < G; g++) acc += p.dcent_part[((ptrdiff_t)g * C + c) * d + f];
            p.dcent[(ptrdiff_t)c * d + f] = sc * acc;
        }
    }

    ptrdiff_t nunits;
    units = FN(cl_units)(B, C, packs, per_problem, n, d, e, kmax, G, 1, 1, &nunits);
    status = RA_ERR_NOMEM;
    if (!units) goto done;
    /* every (problem, cluster): the T_c terms, then dq of its members, handed out one at
       a time with the next one's rows hinted meanwhile; with a bias gradient, groups of
       consecutive clusters, each one's in order */
    if (r) {
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (ptrdiff_t x = 0; x < B * groups; x++) {
            const ptrdiff_t b = x / groups;
            const int g = (int)(x % groups);
            memset(dbias_part + (size_t)x * r, 0, sizeof(T) * (size_t)r);
            FN(ClProblem) p = FN(cl_problem)(&A, b);
            for (int c = 0; c < C; c++)
                if (FN(cl_bias_group)(c, C) == g && p.start[c + 1] > p.start[c])
                    FN(cl_cluster_backward)(&A, b, c);
        }
    } else {
        A.units = units;
        ra_lookahead_for(nt, nunits, FN(cl_fetch_cluster), FN(cl_cluster_unit), &A);
    }

    /* queries labelled -1 get no gradient */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        RaVec l = ra_vec_at(labels, b);
        RaMat g = ra_mat_at(dq, b);
        for (int i = 0; i < n; i++)
            if (RA_VEC_AT(int64_t, l, i) < 0)
                for (int f = 0; f < d; f++) RA_MAT_AT(T, g, i, f) = 0;
    }
    if (kmax > 0 && !A.direct) {   /* (one thread: added cluster by cluster above) */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t unit = 0; unit < B * nkb; unit++)
            FN(cl_topk_key_grads)(&A, unit / nkb, (int64_t)(unit % nkb) * RA_BK);
    }
    /* the relative bias gradient: the groups' partials summed in group order */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++)
        if (r) FN(ra_pairs_write_dbias)(pairs, b, r, dbias_part + (size_t)b * groups * r, groups);
    status = RA_OK;
done:
    ra_free(dbias_part);
    ra_free(units);
    return status;
}

/* dout (B; n, e), q, k, v, labels, key_mask, scale as in the forward
 * -> dq (B; n, d), dk (B; m, d), dv (B; m, e)   (written, not accumulated) */
int FN(ra_clustered_backward)(ptrdiff_t B, int n, int m, int d, int e, int C, int topk,
                              RaBMat dout, RaBMat q, RaBMat k, RaBMat v, RaBVec labels,
                              RaBVec key_mask, RaBVec scale, const RaBPairs *pairs,
                              RaClusteredSaved saved, RaBMat dq, RaBMat dk, RaBMat dv)
{
    FN(ClCall) A = {.B = B, .n = n, .m = m, .d = d, .e = e, .C = C, .topk = topk, .q = q,
                    .k = k, .v = v, .dout = dout, .dq = dq, .dk = dk, .dv = dv,
                    .labels = labels, .key_mask = key_mask, .scale = scale, .pairs = *pairs,
                    .saved = saved};
    const int status = FN(cl_call_sizes)(&A, 1);
    return status != RA_OK ? status
                           : ra_run_problems(B, FN(cl_whole_from)(&A), A.per_problem,
                                             A.per_thread, FN(cl_backward_batch), &A);
}
