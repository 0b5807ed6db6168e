/* dense_body.h — typed dense planner; included by dense.c per dtype. */

/* Key positions of one problem: j, or -1 where key_mask is False (the engine hides
 * those keys and skips the tiles a causal query tile cannot see). */
static void FN(dense_key_positions)(int m, RaVec key_mask, int64_t *kpos)
{
    for (int j = 0; j < m; j++)
        kpos[j] = key_mask.data == NULL || RA_VEC_AT(uint8_t, key_mask, j) ? j : -1;
}

/* q (B; n, d), k (B; m, d), v (B; m, e) -> out (B; n, e), lse (B; n) */
int FN(ra_attention_forward)(ptrdiff_t B, int n, int m, int d, int e, RaBMat q, RaBMat k,
                             RaBMat v, RaBVec key_mask, RaBVec scale, RaBVec causal,
                             RaBMat out, RaBVec lse)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nqb = (n + RA_BQ - 1) / RA_BQ;
    const int nt = ra_num_threads();
    /* shared packs, one per problem: kᵀ (d, m), v (m, e), key positions */
    const size_t kt_sz = ra_round_up(ra_mul(sizeof(T), ra_mul((size_t)d, m)));
    const size_t v_sz = ra_round_up(ra_mul(sizeof(T), ra_mul((size_t)m, e)));
    const size_t pos_sz = ra_round_up(ra_mul(sizeof(int64_t), m));
    const size_t per_problem = ra_add(ra_add(kt_sz, v_sz), pos_sz);
    /* per-thread tile scratch: q (BQ, d), acc (BQ, e), s (BQ, BK), mx, sum, qpos (BQ) */
    const size_t per_thread = ra_round_up(sizeof(T) * ((size_t)RA_BQ * d + (size_t)RA_BQ * e +
                                          (size_t)RA_BQ * RA_BK + 2 * RA_BQ) +
                                          sizeof(int64_t) * RA_BQ);
    char *packs = ra_alloc(ra_mul(per_problem, (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!packs || !scratch) { ra_free(packs); ra_free(scratch); return RA_ERR_NOMEM; }

    /* 1. pack kᵀ and v of every problem, and its key positions */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        char *base = packs + b * per_problem;
        T *kt = (T *)base, *vp = (T *)(base + kt_sz);
        int64_t *kpos = (int64_t *)(base + kt_sz + v_sz);
        FN(ra_gather)(ra_mat_at(k, b), NULL, 0, m, d, 1, 1, kt, m);
        FN(ra_gather)(ra_mat_at(v, b), NULL, 0, m, e, 1, 0, vp, e);
        FN(dense_key_positions)(m, ra_vec_at(key_mask, b), kpos);
    }

    /* 2. every (problem, query tile): online softmax over the visible key tiles */
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * nqb; unit++) {
        const ptrdiff_t b = unit / nqb;
        const int i0 = (int)(unit % nqb) * RA_BQ, rows = n - i0 < RA_BQ ? n - i0 : RA_BQ;
        const int is_causal = RA_VEC_AT(uint8_t, ra_vec_at(causal, b), 0) != 0;
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, b), 0);
        char *base = packs + b * per_problem;
        const FN(RaKeys) keys = {.count = m, .kt = (const T *)base, .ldkt = m,
                                 .v = (const T *)(base + kt_sz), .ldv = e,
                                 .pos = (const int64_t *)(base + kt_sz + v_sz)};

        T *ws = (T *)(scratch + (size_t)ra_thread_id() * per_thread);
        FN(RaQTile) qt;
        qt.lds = 0;
        T *qs = ws;
        qt.rows = rows;
        qt.q = qs;
        qt.acc = qs + RA_BQ * d;
        qt.s = qt.acc + RA_BQ * e;
        qt.mx = qt.s + RA_BQ * RA_BK;
        qt.sum = qt.mx + RA_BQ;
        int64_t *qpos = (int64_t *)(qt.sum + RA_BQ);
        for (int r = 0; r < rows; r++) qpos[r] = i0 + r;
        qt.pos = qpos;

        FN(ra_gather)(ra_mat_at(q, b), NULL, i0, rows, d, sc, 0, qs, d);
        FN(ra_fwd_init)(&qt, e);
        FN(ra_attend)(K, &qt, &keys, d, e, is_causal ? RA_CAUSAL : 0);
        RaMat o = ra_mat_at(out, b);
        RaVec l = ra_vec_at(lse, b);
        FN(ra_fwd_finish)(&qt, e, o.data + (ptrdiff_t)i0 * o.s0, o.s0, o.s1,
                          l.data + (ptrdiff_t)i0 * l.s0, l.s0);
    }
    ra_free(packs);
    ra_free(scratch);
    return RA_OK;
}

/* dout (B; n, e), q (B; n, d), k (B; m, d), v (B; m, e), out (B; n, e), lse (B; n)
 * -> dq (B; n, d), dk (B; m, d), dv (B; m, e) */
int FN(ra_attention_backward)(ptrdiff_t B, int n, int m, int d, int e, RaBMat dout, RaBMat q,
                              RaBMat k, RaBMat v, RaBVec key_mask, RaBMat out, RaBVec lse,
                              RaBVec scale, RaBVec causal, RaBMat dq, RaBMat dk, RaBMat dv)
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

    /* shared packs per problem: scaled q (n, d), dout (n, e), lse, delta (n),
       k (m, d), kᵀ (d, m), vᵀ (e, m), key positions, dq partials (G, n, d) */
    const size_t q_sz = ra_round_up(ra_mul(sizeof(T), ra_mul((size_t)n, d)));
    const size_t do_sz = ra_round_up(ra_mul(sizeof(T), ra_mul((size_t)n, e)));
    const size_t row_sz = ra_round_up(ra_mul(sizeof(T), (size_t)n));
    const size_t k_sz = ra_round_up(ra_mul(sizeof(T), ra_mul((size_t)m, d)));
    const size_t vt_sz = ra_round_up(ra_mul(sizeof(T), ra_mul((size_t)m, e)));
    const size_t pos_sz = ra_round_up(ra_mul(sizeof(int64_t), m));
    const size_t part_sz = ra_mul(q_sz, (size_t)G);
    size_t per_problem = q_sz;
    per_problem = ra_add(per_problem, do_sz);
    per_problem = ra_add(per_problem, ra_mul(row_sz, 2));
    per_problem = ra_add(per_problem, ra_mul(k_sz, 2));
    per_problem = ra_add(per_problem, vt_sz);
    per_problem = ra_add(per_problem, pos_sz);
    per_problem = ra_add(per_problem, part_sz);
    /* per-thread: dk (BK, d), dv (BK, e), s, dp (BQ, BK), qpos (BQ) */
    const size_t per_thread = ra_round_up(sizeof(T) * ((size_t)RA_BK * d + (size_t)RA_BK * e +
                                          2 * (size_t)RA_BQ * RA_BK) + sizeof(int64_t) * RA_BQ);
    char *packs = ra_alloc(ra_mul(per_problem, (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!packs || !scratch) { ra_free(packs); ra_free(scratch); return RA_ERR_NOMEM; }

#define PACK_LAYOUT(b)                                                                   \
    char *base = packs + (b) * per_problem;                                              \
    T *qs = (T *)base, *dop = (T *)(base + q_sz);                                        \
    T *lse_p = (T *)(base + q_sz + do_sz), *delta = (T *)(base + q_sz + do_sz + row_sz);  \
    T *kp = (T *)(base + q_sz + do_sz + 2 * row_sz), *ktp = (T *)((char *)kp + k_sz);     \
    T *vtp = (T *)((char *)ktp + k_sz);                                                  \
    int64_t *kpos = (int64_t *)((char *)vtp + vt_sz);                                    \
    T *dq_part = (T *)((char *)kpos + pos_sz);                                           \
    (void)qs; (void)dop; (void)lse_p; (void)delta; (void)kp; (void)ktp; (void)vtp;       \
    (void)dq_part

    /* 1. pack every problem; delta = rowsum(dout ∘ out); zero the dq partials */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        PACK_LAYOUT(b);
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, b), 0);
        RaMat o = ra_mat_at(out, b), g = ra_mat_at(dout, b);
        RaVec l = ra_vec_at(lse, b);
        FN(ra_gather)(ra_mat_at(q, b), NULL, 0, n, d, sc, 0, qs, d);
        FN(ra_gather)(g, NULL, 0, n, e, 1, 0, dop, e);
        for (int i = 0; i < n; i++) {
            delta[i] = FN(ra_dot)((const char *)(dop + (ptrdiff_t)i * e), sizeof(T),
                                  o.data + (ptrdiff_t)i * o.s0, o.s1, e);
            lse_p[i] = RA_VEC_AT(T, l, i);
        }
        FN(ra_gather)(ra_mat_at(k, b), NULL, 0, m, d, 1, 0, kp, d);
        FN(ra_gather)(ra_mat_at(k, b), NULL, 0, m, d, 1, 1, ktp, m);
        FN(ra_gather)(ra_mat_at(v, b), NULL, 0, m, e, 1, 1, vtp, m);
        FN(dense_key_positions)(m, ra_vec_at(key_mask, b), kpos);
        memset(dq_part, 0, part_sz);
    }

    /* 2. every (problem, key group): dk, dv of its keys; dq partial over all queries */
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * G; unit++) {
        const ptrdiff_t b = unit / G;
        const int grp = (int)(unit % G);
        PACK_LAYOUT(b);
        const int is_causal = RA_VEC_AT(uint8_t, ra_vec_at(causal, b), 0) != 0;
        T *ws = (T *)(scratch + (size_t)ra_thread_id() * per_thread);
        T *dk_t = ws, *dv_t = ws + RA_BK * d;
        FN(RaQGradTile) gt;
        gt.s = dv_t + RA_BK * e;
        gt.dp = gt.s + RA_BQ * RA_BK;
        int64_t *qpos = (int64_t *)(gt.dp + RA_BQ * RA_BK);
        T *dqg = dq_part + (size_t)grp * (q_sz / sizeof(T));
        RaMat dkm = ra_mat_at(dk, b), dvm = ra_mat_at(dv, b);

        const int t_end = (grp + 1) * blocks_per_group < nkb ? (grp + 1) * blocks_per_group : nkb;
        for (int t = grp * blocks_per_group; t < t_end; t++) {
            const int j0 = t * RA_BK, cols = m - j0 < RA_BK ? m - j0 : RA_BK;
            const FN(RaKeys) tile = {.count = cols, .kt = ktp + j0, .ldkt = m,
                                     .k = kp + (ptrdiff_t)j0 * d, .ldk = d, .vt = vtp + j0,
                                     .ldvt = m, .pos = kpos + j0};
            memset(dk_t, 0, sizeof(T) * (size_t)cols * d);
            memset(dv_t, 0, sizeof(T) * (size_t)cols * e);
            for (int qb = 0; qb < nqb; qb++) {
                const int i0 = qb * RA_BQ, rows = n - i0 < RA_BQ ? n - i0 : RA_BQ;
                for (int r = 0; r < rows; r++) qpos[r] = i0 + r;
                gt.rows = rows;
                gt.q = qs + (ptrdiff_t)i0 * d;
                gt.dout = dop + (ptrdiff_t)i0 * e;
                gt.lse = lse_p + i0;
                gt.delta = delta + i0;
                gt.pos = qpos;
                gt.dq = dqg + (ptrdiff_t)i0 * d;
                FN(ra_attend_backward)(K, &gt, &tile, dk_t, d, dv_t, e, d, e,
                                       is_causal ? RA_CAUSAL : 0, NULL);
            }
            /* forward: logits = (scale·q)·kᵀ, so dk = scale · dsᵀ·q = dsᵀ·qs (already) */
            for (int r = 0; r < cols; r++) {
                for (int c = 0; c < d; c++) RA_MAT_AT(T, dkm, j0 + r, c) = dk_t[(ptrdiff_t)r * d + c];
                for (int c = 0; c < e; c++) RA_MAT_AT(T, dvm, j0 + r, c) = dv_t[(ptrdiff_t)r * e + c];
            }
        }
    }

    /* 3. dq = scale · (sum of the group partials, in group order) */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * nqb; unit++) {
        const ptrdiff_t b = unit / nqb;
        const int i0 = (int)(unit % nqb) * RA_BQ, i1 = n - i0 < RA_BQ ? n : i0 + RA_BQ;
        PACK_LAYOUT(b);
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, b), 0);
        RaMat dqm = ra_mat_at(dq, b);
        const size_t stride = q_sz / sizeof(T);
        for (int i = i0; i < i1; i++)
            for (int c = 0; c < d; c++) {
                T acc = 0;
                for (int grp = 0; grp < G; grp++) acc += dq_part[grp * stride + (size_t)i * d + c];
                RA_MAT_AT(T, dqm, i, c) = sc * acc;
            }
    }
#undef PACK_LAYOUT
    ra_free(packs);
    ra_free(scratch);
    return RA_OK;
}
