/* dense_body.h — typed dense planner; included by dense.c per dtype. */

/* Key positions of one problem: j, or -1 where key_mask is False (the engine hides
 * those keys and skips the tiles a causal query tile cannot see). */
static void FN(dense_key_positions)(int m, RaVec key_mask, int64_t *kpos)
{
    for (int j = 0; j < m; j++)
        kpos[j] = key_mask.data == NULL || RA_VEC_AT(uint8_t, key_mask, j) ? j : -1;
}

/* Scratch of the forward.  Per problem: kᵀ (d, m), v (m, e), key positions (m); per
 * thread: a query tile and its positions (BQ). */
typedef struct { T *kt, *v; int64_t *kpos; } FN(DenseFwdPack);
typedef struct { FN(RaQTile) qt; T *q; int64_t *qpos; } FN(DenseFwdTile);

static void FN(dense_fwd_pack)(RaArena *a, FN(DenseFwdPack) *pk, int m, int d, int e)
{
    pk->kt = RA_TAKE(a, T, ra_mul(d, m));
    pk->v = RA_TAKE(a, T, ra_mul(m, e));
    pk->kpos = RA_TAKE(a, int64_t, (size_t)m);
}

static void FN(dense_fwd_tile)(RaArena *a, FN(DenseFwdTile) *t, int d, int e)
{
    t->q = FN(ra_qtile_layout)(&t->qt, a, RA_BQ, d, e);
    t->qpos = RA_TAKE(a, int64_t, RA_BQ);
}

/* q (B; n, d), k (B; m, d), v (B; m, e) -> out (B; n, e), lse (B; n) */
int FN(ra_attention_forward)(ptrdiff_t B, int n, int m, int d, int e, RaBMat q, RaBMat k,
                             RaBMat v, RaBVec key_mask, RaBVec scale, RaBVec causal,
                             const RaBPairs *pairs, RaBMat out, RaBVec lse)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nqb = (n + RA_BQ - 1) / RA_BQ;
    const int nt = ra_num_threads();
    RaArena pm = {NULL, 0}, tm = {NULL, 0};
    FN(DenseFwdPack) pk;
    FN(DenseFwdTile) tile;
    FN(dense_fwd_pack)(&pm, &pk, m, d, e);
    FN(dense_fwd_tile)(&tm, &tile, d, e);
    const size_t per_problem = pm.used, per_thread = tm.used;
    char *packs = ra_alloc(ra_mul(per_problem, (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!packs || !scratch) { ra_free(packs); ra_free(scratch); return RA_ERR_NOMEM; }

    /* 1. pack kᵀ and v of every problem, and its key positions */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        RaArena at = {packs + b * per_problem, 0};
        FN(DenseFwdPack) pb;
        FN(dense_fwd_pack)(&at, &pb, m, d, e);
        FN(ra_gather)(ra_mat_at(k, b), NULL, 0, m, d, 1, 1, pb.kt, m);
        FN(ra_gather)(ra_mat_at(v, b), NULL, 0, m, e, 1, 0, pb.v, e);
        FN(dense_key_positions)(m, ra_vec_at(key_mask, b), pb.kpos);
    }

    /* 2. every (problem, query tile): online softmax over the visible key tiles */
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * nqb; unit++) {
        const ptrdiff_t b = unit / nqb;
        const int i0 = (int)(unit % nqb) * RA_BQ, rows = n - i0 < RA_BQ ? n - i0 : RA_BQ;
        const int is_causal = RA_VEC_AT(uint8_t, ra_vec_at(causal, b), 0) != 0;
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, b), 0);
        RaArena at = {packs + b * per_problem, 0};
        FN(DenseFwdPack) pb;
        FN(dense_fwd_pack)(&at, &pb, m, d, e);
        const FN(RaKeys) keys = {.count = m, .kt = pb.kt, .ldkt = m, .v = pb.v, .ldv = e,
                                 .pos = pb.kpos};
        RaArena wt = {scratch + (size_t)ra_thread_id() * per_thread, 0};
        FN(DenseFwdTile) w;
        FN(dense_fwd_tile)(&wt, &w, d, e);
        for (int r = 0; r < rows; r++) w.qpos[r] = i0 + r;
        FN(RaPairs) pr;
        w.qt.rows = rows;
        w.qt.pos = w.qpos;
        w.qt.pairs = FN(ra_pairs_at)(pairs, b, n, NULL, &pr);
        FN(ra_gather)(ra_mat_at(q, b), NULL, i0, rows, d, sc, 0, w.q, d);
        FN(ra_fwd_init)(&w.qt, e);
        FN(ra_attend)(K, &w.qt, &keys, d, e, is_causal ? RA_CAUSAL : 0);
        RaMat o = ra_mat_at(out, b);
        RaVec l = ra_vec_at(lse, b);
        FN(ra_fwd_finish)(&w.qt, e, o.data + (ptrdiff_t)i0 * o.s0, o.s0, o.s1,
                          l.data + (ptrdiff_t)i0 * l.s0, l.s0);
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
    pk->kt = RA_TAKE(a, T, ra_mul(m, d));
    pk->vt = RA_TAKE(a, T, ra_mul(m, e));
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

/* dout (B; n, e), q (B; n, d), k (B; m, d), v (B; m, e), out (B; n, e), lse (B; n)
 * -> dq (B; n, d), dk (B; m, d), dv (B; m, e) */
int FN(ra_attention_backward)(ptrdiff_t B, int n, int m, int d, int e, RaBMat dout, RaBMat q,
                              RaBMat k, RaBMat v, RaBVec key_mask, RaBMat out, RaBVec lse,
                              RaBVec scale, RaBVec causal, const RaBPairs *pairs, RaBMat dq,
                              RaBMat dk, RaBMat dv)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nkb = (m + RA_BK - 1) / RA_BK, nqb = (n + RA_BQ - 1) / RA_BQ;
    const int nt = ra_num_threads();
    /* key blocks are split into G groups of consecutive blocks; each (problem, group)
       owns its dk/dv rows and a private dq partial, summed in group order at the end */
    int G = (int)((RA_TARGET_UNITS + B - 1) / B);
    if (G > nkb) G = nkb;
    if (G < 1) G = 1;
    const int blocks_per_group = nkb ? (nkb + G - 1) / G : 0;
    const int r = pairs->bias.data && pairs->dbias.data ? n + m - 1 : 0;
    RaArena pm = {NULL, 0}, tm = {NULL, 0};
    FN(DenseBwdPack) pk;
    FN(DenseBwdTile) tile;
    FN(dense_bwd_pack)(&pm, &pk, n, m, d, e, G, r);
    FN(dense_bwd_tile)(&tm, &tile, d, e);
    const size_t per_problem = pm.used, per_thread = tm.used;
    char *packs = ra_alloc(ra_mul(per_problem, (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!packs || !scratch) { ra_free(packs); ra_free(scratch); return RA_ERR_NOMEM; }
#define DENSE_PACK(b, pb)                                                                 \
    FN(DenseBwdPack) pb;                                                                  \
    do {                                                                                  \
        RaArena at_ = {packs + (b) * per_problem, 0};                                     \
        FN(dense_bwd_pack)(&at_, &pb, n, m, d, e, G, r);                                     \
    } while (0)

    /* 1. pack every problem; delta = rowsum(dout ∘ out); zero the dq partials */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        DENSE_PACK(b, pb);
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, b), 0);
        RaMat o = ra_mat_at(out, b), g = ra_mat_at(dout, b);
        RaVec l = ra_vec_at(lse, b);
        FN(ra_gather)(ra_mat_at(q, b), NULL, 0, n, d, sc, 0, pb.q, d);
        FN(ra_gather)(g, NULL, 0, n, e, 1, 0, pb.dout, e);
        for (int i = 0; i < n; i++) {
            pb.delta[i] = FN(ra_dot)((const char *)(pb.dout + (ptrdiff_t)i * e), sizeof(T),
                                     o.data + (ptrdiff_t)i * o.s0, o.s1, e);
            pb.lse[i] = RA_VEC_AT(T, l, i);
        }
        FN(ra_gather)(ra_mat_at(k, b), NULL, 0, m, d, 1, 0, pb.k, d);
        FN(ra_gather)(ra_mat_at(k, b), NULL, 0, m, d, 1, 1, pb.kt, m);
        FN(ra_gather)(ra_mat_at(v, b), NULL, 0, m, e, 1, 1, pb.vt, m);
        FN(dense_key_positions)(m, ra_vec_at(key_mask, b), pb.kpos);
        memset(pb.dq_part, 0, sizeof(T) * (size_t)G * n * d);
        memset(pb.dbias_part, 0, sizeof(T) * (size_t)G * r);
    }

    /* 2. every (problem, key group): dk, dv of its keys; dq partial over all queries */
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * G; unit++) {
        const ptrdiff_t b = unit / G;
        const int grp = (int)(unit % G);
        DENSE_PACK(b, pb);
        const int is_causal = RA_VEC_AT(uint8_t, ra_vec_at(causal, b), 0) != 0;
        RaArena wt = {scratch + (size_t)ra_thread_id() * per_thread, 0};
        FN(DenseBwdTile) w;
        FN(dense_bwd_tile)(&wt, &w, d, e);
        T *dqg = pb.dq_part + (size_t)grp * n * d;
        FN(RaPairs) pr;
        w.g.pairs = FN(ra_pairs_at)(pairs, b, n, r ? pb.dbias_part + (size_t)grp * r : NULL, &pr);
        RaMat dkm = ra_mat_at(dk, b), dvm = ra_mat_at(dv, b);

        const int t_end = (grp + 1) * blocks_per_group < nkb ? (grp + 1) * blocks_per_group : nkb;
        for (int t = grp * blocks_per_group; t < t_end; t++) {
            const int j0 = t * RA_BK, cols = m - j0 < RA_BK ? m - j0 : RA_BK;
            const FN(RaKeys) tile_keys = {.count = cols, .kt = pb.kt + j0, .ldkt = m,
                                          .k = pb.k + (ptrdiff_t)j0 * d, .ldk = d,
                                          .vt = pb.vt + j0, .ldvt = m, .pos = pb.kpos + j0};
            memset(w.dk, 0, sizeof(T) * (size_t)cols * d);
            memset(w.dv, 0, sizeof(T) * (size_t)cols * e);
            for (int qb = 0; qb < nqb; qb++) {
                const int i0 = qb * RA_BQ, rows = n - i0 < RA_BQ ? n - i0 : RA_BQ;
                for (int r = 0; r < rows; r++) w.qpos[r] = i0 + r;
                w.g.rows = rows;
                w.g.q = pb.q + (ptrdiff_t)i0 * d;
                w.g.dout = pb.dout + (ptrdiff_t)i0 * e;
                w.g.lse = pb.lse + i0;
                w.g.delta = pb.delta + i0;
                w.g.pos = w.qpos;
                w.g.dq = dqg + (ptrdiff_t)i0 * d;
                FN(ra_attend_backward)(K, &w.g, &tile_keys, w.dk, d, w.dv, e, d, e,
                                       is_causal ? RA_CAUSAL : 0, NULL);
            }
            /* forward: logits = (scale·q)·kᵀ, so dk = scale · dsᵀ·q = dsᵀ·qs (already) */
            for (int r = 0; r < cols; r++) {
                for (int c = 0; c < d; c++) RA_MAT_AT(T, dkm, j0 + r, c) = w.dk[(ptrdiff_t)r * d + c];
                for (int c = 0; c < e; c++) RA_MAT_AT(T, dvm, j0 + r, c) = w.dv[(ptrdiff_t)r * e + c];
            }
        }
    }

    /* 3. dq = scale · (sum of the group partials, in group order) */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * nqb; unit++) {
        const ptrdiff_t b = unit / nqb;
        const int i0 = (int)(unit % nqb) * RA_BQ, i1 = n - i0 < RA_BQ ? n : i0 + RA_BQ;
        DENSE_PACK(b, pb);
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, b), 0);
        RaMat dqm = ra_mat_at(dq, b);
        const size_t stride = (size_t)n * d;
        for (int i = i0; i < i1; i++)
            for (int c = 0; c < d; c++) {
                T acc = 0;
                for (int grp = 0; grp < G; grp++) acc += pb.dq_part[grp * stride + (size_t)i * d + c];
                RA_MAT_AT(T, dqm, i, c) = sc * acc;
            }
    }
    /* 4. the relative bias gradient: the group partials summed in group order */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        DENSE_PACK(b, pb);
        FN(ra_pairs_write_dbias)(pairs, b, r, pb.dbias_part, G);
    }
#undef DENSE_PACK
    ra_free(packs);
    ra_free(scratch);
    return RA_OK;
}
