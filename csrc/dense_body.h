/* dense_body.h — typed dense planner; included by dense.c per dtype. */

/* Key positions of one problem: j, or -1 where key_mask is False (the engine hides
 * those keys and skips the tiles a causal query tile cannot see). */
static void FN(dense_key_positions)(int m, RaVec key_mask, int64_t *kpos)
{
    for (int j = 0; j < m; j++)
        kpos[j] = key_mask.data == NULL || RA_VEC_AT(uint8_t, key_mask, j) ? j : -1;
}

/* Scratch of the forward.  Per problem: kᵀ (d, m), v (m, e) (leading dimensions from
 * ra_spread_ld), key positions (m); per thread: a query tile and its positions (BQ). */
typedef struct { T *kt, *v; int64_t *kpos; } FN(DenseFwdPack);
typedef struct { FN(RaQTile) qt; T *q; int64_t *qpos; } FN(DenseFwdTile);

static void FN(dense_fwd_pack)(RaArena *a, FN(DenseFwdPack) *pk, int m, int d, int e)
{
    pk->kt = RA_TAKE(a, T, ra_mul(d, ra_spread_ld(m, sizeof(T))));
    pk->v = RA_TAKE(a, T, ra_mul(m, ra_spread_ld(e, sizeof(T))));
    pk->kpos = RA_TAKE(a, int64_t, (size_t)m);
}

static void FN(dense_fwd_tile)(RaArena *a, FN(DenseFwdTile) *t, int d, int e)
{
    t->q = FN(ra_qtile_layout)(&t->qt, a, RA_BQ, d, e);
    t->qpos = RA_TAKE(a, int64_t, RA_BQ);
}

/* Problem b's kᵀ, v and key positions into the pack at `mem`. */
static void FN(dense_fwd_pack_problem)(char *mem, ptrdiff_t b, int m, int d, int e, RaBMat k,
                                       RaBMat v, RaBVec key_mask)
{
    RaArena at = {mem, 0};
    FN(DenseFwdPack) pb;
    FN(dense_fwd_pack)(&at, &pb, m, d, e);
    FN(ra_gather)(ra_mat_at(k, b), NULL, 0, m, d, 1, 1, pb.kt, ra_spread_ld(m, sizeof(T)));
    FN(ra_gather)(ra_mat_at(v, b), NULL, 0, m, e, 1, 0, pb.v, ra_spread_ld(e, sizeof(T)));
    FN(dense_key_positions)(m, ra_vec_at(key_mask, b), pb.kpos);
}

/* What the forward's query tiles share. */
typedef struct {
    const KT *K;
    int n, m, d, e;
    RaBMat q, out;
    RaBVec scale, causal, lse;
    const RaBPairs *pairs;
} FN(DenseForward);

/* Query rows [i0, i0 + BQ) of problem b against its pack at `mem`: online softmax over the
 * visible key tiles, the finished rows into out and lse.  `tile`: the thread's scratch. */
static void FN(dense_fwd_query_tile)(const FN(DenseForward) *F, ptrdiff_t b, int i0,
                                     char *mem, char *tile)
{
    const int n = F->n, m = F->m, d = F->d, e = F->e;
    const int rows = n - i0 < RA_BQ ? n - i0 : RA_BQ;
    const int is_causal = RA_VEC_AT(uint8_t, ra_vec_at(F->causal, b), 0) != 0;
    const T sc = RA_VEC_AT(T, ra_vec_at(F->scale, b), 0);
    RaArena at = {mem, 0};
    FN(DenseFwdPack) pb;
    FN(dense_fwd_pack)(&at, &pb, m, d, e);
    const FN(RaKeys) keys = {.count = m, .kt = pb.kt, .ldkt = ra_spread_ld(m, sizeof(T)),
                             .v = pb.v, .ldv = ra_spread_ld(e, sizeof(T)), .pos = pb.kpos};
    RaArena wt = {tile, 0};
    FN(DenseFwdTile) w;
    FN(dense_fwd_tile)(&wt, &w, d, e);
    for (int r = 0; r < rows; r++) w.qpos[r] = i0 + r;
    FN(RaPairs) pr;
    w.qt.rows = rows;
    w.qt.pos = w.qpos;
    w.qt.pairs = FN(ra_pairs_at)(F->pairs, b, n, NULL, &pr);
    FN(ra_gather)(ra_mat_at(F->q, b), NULL, i0, rows, d, sc, 0, w.q, d);
    FN(ra_fwd_init)(&w.qt, e);
    FN(ra_attend)(F->K, &w.qt, &keys, d, e, is_causal ? RA_CAUSAL : 0);
    RaMat o = ra_mat_at(F->out, b);
    RaVec l = ra_vec_at(F->lse, b);
    FN(ra_fwd_finish)(&w.qt, e, o.data + (ptrdiff_t)i0 * o.s0, o.s0, o.s1,
                      l.data + (ptrdiff_t)i0 * l.s0, l.s0);
}

/* q (B; n, d), k (B; m, d), v (B; m, e) -> out (B; n, e), lse (B; n).  Many problems
 * (B >= RA_DENSE_PER_PROBLEM · threads): each thread packs one problem at a time into
 * its own scratch and runs all its query tiles (the pack stays in cache); fewer: every
 * problem packed first, then all (problem, query tile) units shared out.  A tile's
 * result is the same either way. */
int FN(ra_attention_forward)(ptrdiff_t B, int n, int m, int d, int e, RaBMat q, RaBMat k,
                             RaBMat v, RaBVec key_mask, RaBVec scale, RaBVec causal,
                             const RaBPairs *pairs, RaBMat out, RaBVec lse)
{
    const FN(DenseForward) F = {&ra_kernels()->KSEL, n, m, d, e, q, out, scale, causal, lse,
                                pairs};
    const int nqb = (n + RA_BQ - 1) / RA_BQ;
    const int nt = ra_num_threads();
    const int per_problem_mode = B >= (ptrdiff_t)RA_DENSE_PER_PROBLEM * nt;
    RaArena pm = {NULL, 0}, tm = {NULL, 0};
    FN(DenseFwdPack) pk;
    FN(DenseFwdTile) tile;
    FN(dense_fwd_pack)(&pm, &pk, m, d, e);
    FN(dense_fwd_tile)(&tm, &tile, d, e);
    const size_t per_problem = pm.used, per_thread = tm.used;
    char *packs = ra_alloc(ra_mul(per_problem, per_problem_mode ? (size_t)nt : (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!packs || !scratch) { ra_free(packs); ra_free(scratch); return RA_ERR_NOMEM; }
    if (per_problem_mode) {
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (ptrdiff_t b = 0; b < B; b++) {
            char *mem = packs + (size_t)ra_thread_id() * per_problem;
            FN(dense_fwd_pack_problem)(mem, b, m, d, e, k, v, key_mask);
            for (int i0 = 0; i0 < n; i0 += RA_BQ)
                FN(dense_fwd_query_tile)(&F, b, i0, mem,
                                         scratch + (size_t)ra_thread_id() * per_thread);
        }
    } else {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t b = 0; b < B; b++)
            FN(dense_fwd_pack_problem)(packs + b * per_problem, b, m, d, e, k, v, key_mask);
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (ptrdiff_t unit = 0; unit < B * nqb; unit++)
            FN(dense_fwd_query_tile)(&F, unit / nqb, (int)(unit % nqb) * RA_BQ,
                                     packs + (unit / nqb) * per_problem,
                                     scratch + (size_t)ra_thread_id() * per_thread);
    }
    ra_free(packs);
    ra_free(scratch);
    return RA_OK;
}

/* Scratch of the backward.  Per problem: scaled q (n, d), dout (n, e), lse, delta (n),
 * k (m, d), kᵀ (d, m), vᵀ (e, m), key positions (m), dq partials (G, n, d), relative
 * bias gradient partials (G, r); per thread:
 * dk (BK, d), dv (BK, e) of one key tile, a gradient tile and its positions (BQ). */
typedef struct { T *q, *dout, *lse, *delta, *k, *kt, *vt, *dq_part, *dbias_part; int64_t *kpos; } FN(DenseBwdPack);
typedef struct { FN(RaQGradTile) g; T *dk, *dv; int64_t *qpos; } FN(DenseBwdTile);

static void FN(dense_bwd_pack)(RaArena *a, FN(DenseBwdPack) *pk, int n, int m, int d, int e,
                               int G, int r)
{
    pk->dbias_part = RA_TAKE(a, T, ra_mul(G, r));
    pk->q = RA_TAKE(a, T, ra_mul(n, d));
    pk->dout = RA_TAKE(a, T, ra_mul(n, e));
    pk->lse = RA_TAKE(a, T, (size_t)n);
    pk->delta = RA_TAKE(a, T, (size_t)n);
    pk->k = RA_TAKE(a, T, ra_mul(m, d));
    pk->kt = RA_TAKE(a, T, ra_mul(ra_spread_ld(m, sizeof(T)), d));
    pk->vt = RA_TAKE(a, T, ra_mul(ra_spread_ld(m, sizeof(T)), e));
    pk->kpos = RA_TAKE(a, int64_t, (size_t)m);
    pk->dq_part = RA_TAKE(a, T, ra_mul(G, ra_mul(n, d)));
}

static void FN(dense_bwd_tile)(RaArena *a, FN(DenseBwdTile) *t, int d, int e)
{
    t->dk = RA_TAKE(a, T, (size_t)RA_BK * d);
    t->dv = RA_TAKE(a, T, (size_t)RA_BK * e);
    FN(ra_qgrad_layout)(&t->g, a, RA_BQ, NULL);
    t->qpos = RA_TAKE(a, int64_t, RA_BQ);
}

/* What the backward's steps share. */
typedef struct {
    const KT *K;
    int n, m, d, e, G, r, nkb, nqb, blocks_per_group;
    RaBMat dout, q, k, v, out, dq, dk, dv;
    RaBVec key_mask, lse, scale, causal;
    const RaBPairs *pairs;
} FN(DenseBackward);

static FN(DenseBwdPack) FN(dense_bwd_pack_at)(const FN(DenseBackward) *A, char *mem)
{
    RaArena at = {mem, 0};
    FN(DenseBwdPack) pb;
    FN(dense_bwd_pack)(&at, &pb, A->n, A->m, A->d, A->e, A->G, A->r);
    return pb;
}

/* 1. problem b packed at `mem`: scaled q, dout, lse, delta = rowsum(dout ∘ out), k, kᵀ, vᵀ,
 *    key positions; its dq and bias partials zeroed. */
static void FN(dense_bwd_pack_problem)(const FN(DenseBackward) *A, ptrdiff_t b, char *mem)
{
    const int n = A->n, m = A->m, d = A->d, e = A->e;
    const FN(DenseBwdPack) pb = FN(dense_bwd_pack_at)(A, mem);
    const T sc = RA_VEC_AT(T, ra_vec_at(A->scale, b), 0);
    RaMat o = ra_mat_at(A->out, b), g = ra_mat_at(A->dout, b);
    RaVec l = ra_vec_at(A->lse, b);
    FN(ra_gather)(ra_mat_at(A->q, b), NULL, 0, n, d, sc, 0, pb.q, d);
    FN(ra_gather)(g, NULL, 0, n, e, 1, 0, pb.dout, e);
    for (int i = 0; i < n; i++) {
        pb.delta[i] = FN(ra_dot)((const char *)(pb.dout + (ptrdiff_t)i * e), sizeof(T),
                                 o.data + (ptrdiff_t)i * o.s0, o.s1, e);
        pb.lse[i] = RA_VEC_AT(T, l, i);
    }
    FN(ra_gather)(ra_mat_at(A->k, b), NULL, 0, m, d, 1, 0, pb.k, d);
    FN(ra_gather)(ra_mat_at(A->k, b), NULL, 0, m, d, 1, 1, pb.kt, ra_spread_ld(m, sizeof(T)));
    FN(ra_gather)(ra_mat_at(A->v, b), NULL, 0, m, e, 1, 1, pb.vt, ra_spread_ld(m, sizeof(T)));
    FN(dense_key_positions)(m, ra_vec_at(A->key_mask, b), pb.kpos);
    memset(pb.dq_part, 0, sizeof(T) * (size_t)A->G * n * d);
    memset(pb.dbias_part, 0, sizeof(T) * (size_t)A->G * A->r);
}

/* 2. key group grp of problem b: dk, dv of its keys; its dq partial over all queries.
 *    `tile`: the thread's scratch. */
static void FN(dense_bwd_group)(const FN(DenseBackward) *A, ptrdiff_t b, int grp, char *mem,
                                char *tile)
{
    const int n = A->n, m = A->m, d = A->d, e = A->e;
    const FN(DenseBwdPack) pb = FN(dense_bwd_pack_at)(A, mem);
    const int is_causal = RA_VEC_AT(uint8_t, ra_vec_at(A->causal, b), 0) != 0;
    RaArena wt = {tile, 0};
    FN(DenseBwdTile) w;
    FN(dense_bwd_tile)(&wt, &w, d, e);
    T *dqg = pb.dq_part + (size_t)grp * n * d;
    FN(RaPairs) pr;
    w.g.pairs = FN(ra_pairs_at)(A->pairs, b, n, A->r ? pb.dbias_part + (size_t)grp * A->r : NULL,
                                &pr);
    RaMat dkm = ra_mat_at(A->dk, b), dvm = ra_mat_at(A->dv, b);
    const int t_end = (grp + 1) * A->blocks_per_group < A->nkb ? (grp + 1) * A->blocks_per_group
                                                               : A->nkb;
    for (int t = grp * A->blocks_per_group; t < t_end; t++) {
        const int j0 = t * RA_BK, cols = m - j0 < RA_BK ? m - j0 : RA_BK;
        const int ld = ra_spread_ld(m, sizeof(T));
        const FN(RaKeys) tile_keys = {.count = cols, .kt = pb.kt + j0, .ldkt = ld,
                                      .k = pb.k + (ptrdiff_t)j0 * d, .ldk = d,
                                      .vt = pb.vt + j0, .ldvt = ld, .pos = pb.kpos + j0};
        memset(w.dk, 0, sizeof(T) * (size_t)cols * d);
        memset(w.dv, 0, sizeof(T) * (size_t)cols * e);
        for (int qb = 0; qb < A->nqb; qb++) {
            const int i0 = qb * RA_BQ, rows = n - i0 < RA_BQ ? n - i0 : RA_BQ;
            for (int r = 0; r < rows; r++) w.qpos[r] = i0 + r;
            w.g.rows = rows;
            w.g.q = pb.q + (ptrdiff_t)i0 * d;
            w.g.dout = pb.dout + (ptrdiff_t)i0 * e;
            w.g.lse = pb.lse + i0;
            w.g.delta = pb.delta + i0;
            w.g.pos = w.qpos;
            w.g.dq = dqg + (ptrdiff_t)i0 * d;
            FN(ra_attend_backward)(A->K, &w.g, &tile_keys, w.dk, d, w.dv, e, d, e,
                                   is_causal ? RA_CAUSAL : 0, NULL);
        }
        /* forward: logits = (scale·q)·kᵀ, so dk = scale · dsᵀ·q = dsᵀ·qs (already) */
        for (int r = 0; r < cols; r++) {
            for (int c = 0; c < d; c++) RA_MAT_AT(T, dkm, j0 + r, c) = w.dk[(ptrdiff_t)r * d + c];
            for (int c = 0; c < e; c++) RA_MAT_AT(T, dvm, j0 + r, c) = w.dv[(ptrdiff_t)r * e + c];
        }
    }
}

/* 3. dq rows [i0, i0 + BQ) of problem b = scale · (the group partials summed in group
 *    order). */
static void FN(dense_bwd_dq_rows)(const FN(DenseBackward) *A, ptrdiff_t b, int i0, char *mem)
{
    const int n = A->n, d = A->d, i1 = n - i0 < RA_BQ ? n : i0 + RA_BQ;
    const FN(DenseBwdPack) pb = FN(dense_bwd_pack_at)(A, mem);
    const T sc = RA_VEC_AT(T, ra_vec_at(A->scale, b), 0);
    RaMat dqm = ra_mat_at(A->dq, b);
    const size_t stride = (size_t)n * d;
    for (int i = i0; i < i1; i++)
        for (int c = 0; c < d; c++) {
            T acc = 0;
            for (int grp = 0; grp < A->G; grp++) acc += pb.dq_part[grp * stride + (size_t)i * d + c];
            RA_MAT_AT(T, dqm, i, c) = sc * acc;
        }
}

/* dout (B; n, e), q (B; n, d), k (B; m, d), v (B; m, e), out (B; n, e), lse (B; n)
 * -> dq (B; n, d), dk (B; m, d), dv (B; m, e).  Key blocks are split into G groups of
 * consecutive blocks (G from B alone); each (problem, group) owns its dk / dv rows and a
 * private dq partial, summed in group order at the end.  Many problems (B >=
 * RA_DENSE_PER_PROBLEM · threads): each thread takes a problem at a time through every
 * step in its own scratch; fewer: each step over all problems in turn, the (problem,
 * group) units shared out.  The same results either way. */
int FN(ra_attention_backward)(ptrdiff_t B, int n, int m, int d, int e, RaBMat dout, RaBMat q,
                              RaBMat k, RaBMat v, RaBVec key_mask, RaBMat out, RaBVec lse,
                              RaBVec scale, RaBVec causal, const RaBPairs *pairs, RaBMat dq,
                              RaBMat dk, RaBMat dv)
{
    const int nkb = (m + RA_BK - 1) / RA_BK, nqb = (n + RA_BQ - 1) / RA_BQ;
    const int nt = ra_num_threads();
    int G = (int)((RA_TARGET_UNITS + B - 1) / B);
    if (G > nkb) G = nkb;
    if (G < 1) G = 1;
    const FN(DenseBackward) A = {
        .K = &ra_kernels()->KSEL, .n = n, .m = m, .d = d, .e = e, .G = G,
        .r = pairs->bias.data && pairs->dbias.data ? n + m - 1 : 0, .nkb = nkb, .nqb = nqb,
        .blocks_per_group = nkb ? (nkb + G - 1) / G : 0, .dout = dout, .q = q, .k = k, .v = v,
        .out = out, .dq = dq, .dk = dk, .dv = dv, .key_mask = key_mask, .lse = lse,
        .scale = scale, .causal = causal, .pairs = pairs};
    const int per_problem_mode = B >= (ptrdiff_t)RA_DENSE_PER_PROBLEM * nt;
    RaArena pm = {NULL, 0}, tm = {NULL, 0};
    FN(DenseBwdPack) pk;
    FN(DenseBwdTile) tile;
    FN(dense_bwd_pack)(&pm, &pk, n, m, d, e, G, A.r);
    FN(dense_bwd_tile)(&tm, &tile, d, e);
    const size_t per_problem = pm.used, per_thread = tm.used;
    char *packs = ra_alloc(ra_mul(per_problem, per_problem_mode ? (size_t)nt : (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!packs || !scratch) { ra_free(packs); ra_free(scratch); return RA_ERR_NOMEM; }
    if (per_problem_mode) {
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (ptrdiff_t b = 0; b < B; b++) {
            char *mem = packs + (size_t)ra_thread_id() * per_problem;
            FN(dense_bwd_pack_problem)(&A, b, mem);
            for (int grp = 0; grp < G; grp++)
                FN(dense_bwd_group)(&A, b, grp, mem, scratch + (size_t)ra_thread_id() * per_thread);
            for (int i0 = 0; i0 < n; i0 += RA_BQ) FN(dense_bwd_dq_rows)(&A, b, i0, mem);
            FN(ra_pairs_write_dbias)(pairs, b, A.r, FN(dense_bwd_pack_at)(&A, mem).dbias_part, G);
        }
    } else {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t b = 0; b < B; b++) FN(dense_bwd_pack_problem)(&A, b, packs + b * per_problem);
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (ptrdiff_t unit = 0; unit < B * G; unit++)
            FN(dense_bwd_group)(&A, unit / G, (int)(unit % G), packs + (unit / G) * per_problem,
                                scratch + (size_t)ra_thread_id() * per_thread);
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t unit = 0; unit < B * nqb; unit++)
            FN(dense_bwd_dq_rows)(&A, unit / nqb, (int)(unit % nqb) * RA_BQ,
                                  packs + (unit / nqb) * per_problem);
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t b = 0; b < B; b++)
            FN(ra_pairs_write_dbias)(pairs, b, A.r,
                                     FN(dense_bwd_pack_at)(&A, packs + b * per_problem).dbias_part, G);
    }
    ra_free(packs);
    ra_free(scratch);
    return RA_OK;
}
