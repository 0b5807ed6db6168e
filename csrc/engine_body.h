/* engine_body.h — typed body of the tile engine (see engine.h).  Included by engine.c
 * once per dtype with T, KT (kernel table type), and FN(name) = name##_<suffix>. */

/* Write -inf into the logits of every invisible (query, key) pair of the tile; skipped
 * when the positions show that every pair is visible. */
static void FN(apply_mask)(const KT *K, T *s, ptrdiff_t lds, int rows, int cols,
                           const int64_t *qpos, const int64_t *kpos, int flags)
{
    int64_t qmin = INT64_MAX, kmin = INT64_MAX, kmax = INT64_MIN;
    for (int j = 0; j < cols; j++) {
        kmin = kpos[j] < kmin ? kpos[j] : kmin;
        kmax = kpos[j] > kmax ? kpos[j] : kmax;
    }
    if (!qpos) {                       /* queries without positions: padding only */
        if (kmin >= 0) return;
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++)
                if (kpos[j] < 0) s[(ptrdiff_t)i * lds + j] = -INFINITY;
        return;
    }
    for (int i = 0; i < rows; i++) qmin = qpos[i] < qmin ? qpos[i] : qmin;
    /* every pair visible: no padding, and (if causal or exclude_self) every key
       strictly before every query, or at most at it when only causal */
    int all_visible = kmin >= 0;
    if (flags & RA_EXCLUDE_SELF) all_visible &= kmax < qmin;
    else if (flags & RA_CAUSAL) all_visible &= kmax <= qmin;
    if (all_visible) return;
    K->mask_tile(rows, cols, s, lds, qpos, kpos, (flags & RA_CAUSAL) != 0,
                 (flags & RA_EXCLUDE_SELF) != 0);
}

/* Write -inf into the logits the explicit bitmap hides (bit clear). */
static void FN(apply_vis)(T *s, ptrdiff_t lds, int rows, int cols, const uint64_t *vis,
                          ptrdiff_t ldvis)
{
    for (int i = 0; i < rows; i++) {
        T *si = s + (ptrdiff_t)i * lds;
        const uint64_t *w = vis + (ptrdiff_t)i * ldvis;
        for (int j = 0; j < cols; j++)
            if (!((w[j >> 6] >> (j & 63)) & 1)) si[j] = -INFINITY;
    }
}

/* 1 if every entry of a (rows, cols) block with leading dimension ld is finite */
static int FN(all_finite)(const T *a, int rows, int cols, ptrdiff_t ld)
{
    int ok = 1;
    for (int i = 0; i < rows; i++) {
        const T *r = a + (ptrdiff_t)i * ld;
        for (int c = 0; c < cols; c++) ok &= (r[c] - r[c]) == 0;   /* false for inf, NaN */
    }
    return ok;
}

/* acc (rows, e) += p (rows, cols) · v (cols, e), skipping the terms whose weight is 0.
 * The slow twin of the gemm, used only when v is not finite (see ra_fwd_step). */
static void FN(pv_skip_zero)(int rows, int cols, int e, const T *p, ptrdiff_t ldp,
                             const T *v, ptrdiff_t ldv, T *acc, ptrdiff_t ldacc)
{
    for (int i = 0; i < rows; i++) {
        T *a = acc + (ptrdiff_t)i * ldacc;
        for (int j = 0; j < cols; j++) {
            const T w = p[(ptrdiff_t)i * ldp + j];
            if (w == 0) continue;
            const T *vj = v + (ptrdiff_t)j * ldv;
            for (int c = 0; c < e; c++) a[c] += w * vj[c];
        }
    }
}

T *FN(ra_qtile_layout)(FN(RaQTile) *qt, RaArena *a, int rows, int d, int e)
{
    T *q = RA_TAKE(a, T, ra_mul(rows, d));
    qt->q = q;
    qt->pos = NULL;
    qt->acc = RA_TAKE(a, T, ra_mul(rows, e));
    qt->s = RA_TAKE(a, T, ra_mul(rows, RA_BK));
    qt->lds = 0;
    qt->pairs = NULL;
    qt->ids = NULL;
    qt->hints = NULL;
    qt->mx = RA_TAKE(a, T, (size_t)rows);
    qt->sum = RA_TAKE(a, T, (size_t)rows);
    return q;
}

void FN(ra_qgrad_layout)(FN(RaQGradTile) *g, RaArena *a, int rows, const FN(RaQTile) *share)
{
    g->s = share ? share->s : RA_TAKE(a, T, ra_mul(rows, RA_BK));
    g->dp = RA_TAKE(a, T, ra_mul(rows, RA_BK));
    g->pairs = NULL;
    g->ids = NULL;
    g->hints = NULL;
}

const FN(RaPairs) *FN(ra_pairs_at)(const RaBPairs *bp, ptrdiff_t b, int n, T *dbias,
                                   FN(RaPairs) *pr)
{
    const uint32_t drop = (uint32_t)RA_VEC_AT(int64_t, ra_vec_at(bp->drop, b), 0);
    pr->bias = bp->bias.data ? (const T *)ra_vec_at(bp->bias, b).data + (n - 1) : NULL;
    pr->dbias = pr->bias && dbias ? dbias + (n - 1) : NULL;
    pr->key = RA_VEC_AT(uint64_t, ra_vec_at(bp->key, b), 0);
    pr->drop = drop;
    pr->keep = (T)((double)RA_DROP_ONE / (double)(RA_DROP_ONE - drop));
    return drop || pr->bias ? pr : NULL;
}

void FN(ra_pairs_write_dbias)(const RaBPairs *bp, ptrdiff_t b, int r, const T *part, int parts)
{
    if (!bp->dbias.data) return;
    RaVec out = ra_vec_at(bp->dbias, b);
    for (int t = 0; t < r; t++) {
        T acc = 0;
        for (int g = 0; g < parts; g++) acc += part[(size_t)g * r + t];
        RA_VEC_AT(T, out, t) = acc;
    }
}

void FN(ra_fwd_init)(FN(RaQTile) *qt, int e)
{
    for (int i = 0; i < qt->rows; i++) {
        qt->mx[i] = -INFINITY;
        qt->sum[i] = 0;
    }
    memset(qt->acc, 0, sizeof(T) * (size_t)qt->rows * (size_t)e);
}

/* The leading dimension of a query tile's logits. */
static inline ptrdiff_t FN(qt_lds)(const FN(RaQTile) *qt) { return qt->lds ? qt->lds : RA_BK; }

/* The ids naming a tile's pairs for the pair terms: the planner's ids, else positions. */
static inline const int64_t *FN(row_ids)(const int64_t *ids, const int64_t *pos)
{
    return ids ? ids : pos;
}
static inline const int64_t *FN(col_ids)(const FN(RaKTile) *t) { return t->ids ? t->ids : t->pos; }

/* A tile's product: the gemm that hints the tile's lines when it has some. */
static inline void FN(hinted_gemm)(const KT *K, RaHints *hints, int M, int N, int Kd,
                                   const T *A, ptrdiff_t lda, const T *B, ptrdiff_t ldb, T *C,
                                   ptrdiff_t ldc, int accumulate)
{
    if (hints) K->gemm_hinting(M, N, Kd, A, lda, B, ldb, C, ldc, accumulate, hints);
    else K->gemm(M, N, Kd, A, lda, B, ldb, C, ldc, accumulate);
}

/* q is (rows, d), kt is (d, cols) -> s (rows, cols) masked logits */
static void FN(ra_fwd_logits)(const KT *K, FN(RaQTile) *qt, const FN(RaKTile) *kt, int d, int flags)
{
    const int rows = qt->rows, cols = kt->cols;
    const ptrdiff_t lds = FN(qt_lds)(qt);
    /* 1. logits: s = q · kᵀ [+ relative position bias] */
    FN(hinted_gemm)(K, qt->hints, rows, cols, d, qt->q, d, kt->kt, kt->ldkt, qt->s, lds, 0);
    if (qt->pairs && qt->pairs->bias)
        K->bias_tile(rows, cols, qt->s, lds, FN(row_ids)(qt->ids, qt->pos), FN(col_ids)(kt),
                     qt->pairs->bias);
    /* 2. position mask */
    if (flags & RA_MASKED) FN(apply_mask)(K, qt->s, lds, rows, cols, qt->pos, kt->pos, flags);
    if (kt->vis) FN(apply_vis)(qt->s, lds, rows, cols, kt->vis, kt->ldvis);
}

/* s (rows, cols) masked logits, v is (cols, e) -> acc (rows, e), mx, sum updated */
static void FN(ra_fwd_accumulate)(const KT *K, FN(RaQTile) *qt, const FN(RaKTile) *kt, int e,
                           int flags)
{
    const int rows = qt->rows, cols = kt->cols;
    const ptrdiff_t lds = FN(qt_lds)(qt);
    /* 3. online softmax: s <- p, acc rescaled to the new row maxima */
    K->softmax_step(rows, cols, qt->s, lds, qt->mx, qt->sum, qt->acc, e, e);
    /* 3b. dropout after the softmax: sum above counts every weight, acc only the kept */
    const FN(RaPairs) *pr = qt->pairs;
    const int dropping = pr && pr->drop;
    if (dropping)
        K->dropout_tile(rows, cols, qt->s, lds, FN(row_ids)(qt->ids, qt->pos), FN(col_ids)(kt),
                        pr->key, pr->drop, pr->keep);
    /* 4. acc += p · v.  A hidden key has p == 0 exactly, but 0·NaN = NaN in the gemm:
     * when a masked tile's v holds a non-finite value, weights of 0 are skipped so that
     * value reaches only the queries that see its key (NaN locality: README, Reliability). */
    if (((flags & RA_MASKED) || kt->vis || dropping) && !FN(all_finite)(kt->v, cols, e, kt->ldv))
        FN(pv_skip_zero)(rows, cols, e, qt->s, lds, kt->v, kt->ldv, qt->acc, e);
    else
        FN(hinted_gemm)(K, qt->hints, rows, e, cols, qt->s, lds, kt->v, kt->ldv, qt->acc, e, 1);
}

/* q is (rows, d), kt is (d, cols), v is (cols, e), acc is (rows, e) */
static void FN(ra_fwd_step)(const KT *K, FN(RaQTile) *qt, const FN(RaKTile) *kt, int d, int e,
                     int flags)
{
    FN(ra_fwd_logits)(K, qt, kt, d, flags);
    FN(ra_fwd_accumulate)(K, qt, kt, e, flags);
}

void FN(ra_fwd_finish_row)(const FN(RaQTile) *qt, int i, int e, char *o, ptrdiff_t os1, T *lse)
{
    const T sum = qt->sum[i];
    /* a row that saw no key: output 0, lse -inf (sum is 0 only then) */
    const T inv = sum == 0 ? 0 : 1 / sum;
    const T *a = qt->acc + (ptrdiff_t)i * e;
    if (os1 == (ptrdiff_t)sizeof(T))
        for (int c = 0; c < e; c++) ((T *)o)[c] = a[c] * inv;     /* vectorised */
    else
        for (int c = 0; c < e; c++) *(T *)(o + (ptrdiff_t)c * os1) = a[c] * inv;
    if (lse) *lse = sum == 0 ? -INFINITY : qt->mx[i] + log(sum);
}

void FN(ra_fwd_finish)(const FN(RaQTile) *qt, int e, char *out, ptrdiff_t os0,
                       ptrdiff_t os1, char *lse, ptrdiff_t ls0)
{
    for (int i = 0; i < qt->rows; i++)
        FN(ra_fwd_finish_row)(qt, i, e, out + (ptrdiff_t)i * os0, os1,
                              lse ? (T *)(lse + (ptrdiff_t)i * ls0) : NULL);
}

/* dbias[kpos[j] - qpos[i]] += ds[i, j] over the tile's pairs (padding keys skipped). */
static void FN(bias_grad)(const T *ds, ptrdiff_t ld, int rows, int cols, const int64_t *qpos,
                          const int64_t *kpos, T *dbias)
{
    const int run = cols > 0 && ra_positions_run(kpos, cols);
    for (int i = 0; i < rows; i++) {
        T *row = dbias - qpos[i];
        const T *dsi = ds + (ptrdiff_t)i * ld;
        if (run) {                          /* consecutive keys: one contiguous row */
            T *dst = row + kpos[0];
            for (int j = 0; j < cols; j++) dst[j] += dsi[j];
            continue;
        }
        for (int j = 0; j < cols; j++)
            if (kpos[j] >= 0) row[kpos[j]] += dsi[j];
    }
}

/* RA_OWN_STATS: logits s (rows, cols; ld RA_BK) of a whole list -> p = softmax(s) in
 * place, lse (rows) = log-sum-exp (-inf for a row that sees no key, whose p is 0); sum
 * (rows) is scratch. */
static void FN(own_softmax)(const KT *K, int rows, int cols, T *s, T *lse, T *sum)
{
    for (int i = 0; i < rows; i++) {
        lse[i] = -INFINITY;   /* the running maximum, until the end */
        sum[i] = 0;
    }
    K->softmax_step(rows, cols, s, RA_BK, lse, sum, NULL, 0, 0);   /* s = exp(s - max) */
    for (int i = 0; i < rows; i++) {
        const T inv = sum[i] == 0 ? 0 : 1 / sum[i];
        T *p = s + (ptrdiff_t)i * RA_BK;
        for (int j = 0; j < cols; j++) p[j] *= inv;
        lse[i] = sum[i] == 0 ? -INFINITY : lse[i] + log(sum[i]);
    }
}

/* q (rows, d), dout (rows, e); k (cols, d), kt (d, cols), vt (e, cols);
 * dq (rows, d), dk (cols, d), dv (cols, e) accumulate */
static void FN(ra_bwd_step)(const KT *K, FN(RaQGradTile) *g, const FN(RaKTile) *kt, T *dk,
                     ptrdiff_t lddk, T *dv, ptrdiff_t lddv, int d, int e, int flags)
{
    const int rows = g->rows, cols = kt->cols;
    const FN(RaPairs) *pr = g->pairs;
    const int64_t *rid = FN(row_ids)(g->ids, g->pos), *cid = FN(col_ids)(kt);
    /* forward pass 1-3 recomputed: s = q·kᵀ [+ bias], masked, p = exp(s - lse) */
    FN(hinted_gemm)(K, g->hints, rows, cols, d, g->q, d, kt->kt, kt->ldkt, g->s, RA_BK, 0);
    if (pr && pr->bias) K->bias_tile(rows, cols, g->s, RA_BK, rid, cid, pr->bias);
    if (flags & RA_MASKED) FN(apply_mask)(K, g->s, RA_BK, rows, cols, g->pos, kt->pos, flags);
    if (kt->vis) FN(apply_vis)(g->s, RA_BK, rows, cols, kt->vis, kt->ldvis);
    if (flags & RA_OWN_STATS) FN(own_softmax)(K, rows, cols, g->s, g->lse, g->delta);
    else K->exp_shift(rows, cols, g->s, RA_BK, g->lse);
    if (pr && pr->drop) {
        /* forward: acc += (p∘f)·v with the dropout factor f (0 or keep), so
           dv += (p∘f)ᵀ·dout (p∘f built in dp) and dp = f∘(dout·vᵀ) */
        for (int i = 0; i < rows; i++)
            memcpy(g->dp + (ptrdiff_t)i * RA_BK, g->s + (ptrdiff_t)i * RA_BK, sizeof(T) * (size_t)cols);
        K->dropout_tile(rows, cols, g->dp, RA_BK, rid, cid, pr->key, pr->drop, pr->keep);
        K->gemm_tn(cols, e, rows, g->dp, RA_BK, g->dout, e, dv, lddv, 1);
        FN(hinted_gemm)(K, g->hints, rows, cols, e, g->dout, e, kt->vt, kt->ldvt, g->dp, RA_BK,
                        0);
        K->dropout_tile(rows, cols, g->dp, RA_BK, rid, cid, pr->key, pr->drop, pr->keep);
    } else {
        /* forward: acc += p·v, so dv += pᵀ·dout and dp = dout·vᵀ */
        K->gemm_tn(cols, e, rows, g->s, RA_BK, g->dout, e, dv, lddv, 1);
        FN(hinted_gemm)(K, g->hints, rows, cols, e, g->dout, e, kt->vt, kt->ldvt, g->dp, RA_BK,
                        0);
    }
    /* the forward's out = (p [∘ f])·v, so delta = rowsum(dout ∘ out) = rowsum(p ∘ dp) */
    if (flags & RA_OWN_STATS)
        for (int i = 0; i < rows; i++)
            g->delta[i] = FN(ra_dot)((const char *)(g->s + (ptrdiff_t)i * RA_BK), sizeof(T),
                                     (const char *)(g->dp + (ptrdiff_t)i * RA_BK), sizeof(T), cols);
    /* forward: p = softmax(s), so ds = p ∘ (dp - delta) with delta = rowsum(dout∘out) */
    K->softmax_grad(rows, cols, g->s, g->dp, RA_BK, g->delta, 1);
    if (pr && pr->dbias) FN(bias_grad)(g->dp, RA_BK, rows, cols, rid, cid, pr->dbias);
    /* forward: s = q·kᵀ, so dq += ds·k and dk += dsᵀ·q */
    FN(hinted_gemm)(K, g->hints, rows, d, cols, g->dp, RA_BK, kt->k, kt->ldk, g->dq, d, 1);
    K->gemm_tn(cols, d, rows, g->dp, RA_BK, g->q, d, dk, lddk, 1);
}

/* ------------------------------------------------------------------ key lists */
/* The step flags of a query tile (qpos, rows) against a key tile (kpos, cols) under the
 * rule `flags` (RA_CAUSAL, RA_EXCLUDE_SELF): RA_MASKED added when the rule may hide a
 * pair, -1 when it hides every pair (the tile is skipped; folding it in would change
 * nothing).  Padding (kpos < 0) is always hidden; without positions nothing is. */
static int FN(tile_flags)(const int64_t *qpos, int rows, const int64_t *kpos, int cols,
                          int flags)
{
    flags &= RA_CAUSAL | RA_EXCLUDE_SELF;
    if (!kpos) return flags;
    int64_t kmin = INT64_MAX, kmax = INT64_MIN;
    int padding = 0;
    for (int j = 0; j < cols; j++) {
        if (kpos[j] < 0) { padding = 1; continue; }
        kmin = kpos[j] < kmin ? kpos[j] : kmin;
        kmax = kpos[j] > kmax ? kpos[j] : kmax;
    }
    if (kmin == INT64_MAX) return -1;                       /* nothing but padding */
    if (!qpos) return padding ? flags | RA_MASKED : flags;
    int64_t qmin = INT64_MAX, qmax = INT64_MIN;
    for (int i = 0; i < rows; i++) {
        qmin = qpos[i] < qmin ? qpos[i] : qmin;
        qmax = qpos[i] > qmax ? qpos[i] : qmax;
    }
    if ((flags & RA_CAUSAL) && kmin > qmax) return -1;      /* every key after every query */
    int clear = !padding;
    if (flags & RA_EXCLUDE_SELF) clear &= kmax < qmin;
    else if (flags & RA_CAUSAL) clear &= kmax <= qmin;
    return clear ? flags : flags | RA_MASKED;
}

/* Tile [j0, j0 + RA_BK) of a list from its pointers, then its load hook (need: what
 * the step reads), for `rows` query rows. */
static FN(RaKTile) FN(keys_tile)(const FN(RaKeys) *keys, int j0, int rows, int need)
{
    FN(RaKTile) t = {0};
    t.cols = keys->count - j0 < RA_BK ? keys->count - j0 : RA_BK;
    if (keys->kt) { t.kt = keys->kt + j0; t.ldkt = keys->ldkt; }
    if (keys->v) { t.v = keys->v + (ptrdiff_t)j0 * keys->ldv; t.ldv = keys->ldv; }
    if (keys->k) { t.k = keys->k + (ptrdiff_t)j0 * keys->ldk; t.ldk = keys->ldk; }
    if (keys->vt) { t.vt = keys->vt + j0; t.ldvt = keys->ldvt; }
    t.pos = keys->pos ? keys->pos + j0 : NULL;
    t.ids = keys->ids ? keys->ids + j0 : NULL;
    if (keys->load) keys->load(keys->ctx, j0, rows, need, &t);
    return t;
}

/* The step flags of tile t for query rows (qpos, rows); its bitmap attached if the tile
 * is attended (see tile_flags). */
static int FN(tile_prepare)(const FN(RaKeys) *keys, FN(RaKTile) *t, int j0, const int64_t *qpos,
                            int rows, int flags)
{
    const int f = FN(tile_flags)(qpos, rows, t->pos, t->cols, flags);
    if (f >= 0 && keys->tile_vis) t->vis = keys->tile_vis(keys->ctx, rows, j0, t->cols, &t->ldvis);
    return f;
}

/* ra_attend with spans wider than a tile (see RaKeys.span). */
static void FN(attend_spans)(const KT *K, FN(RaQTile) *qt, const FN(RaKeys) *keys, int d,
                             int e, int flags)
{
    const int span = keys->span;
    T *const own_s = qt->s;
    const ptrdiff_t own_lds = qt->lds;
    qt->lds = span;
    for (int a = 0; a < keys->count; a += span) {
        const int width = keys->count - a < span ? keys->count - a : span;
        int any_masked = 0;
        for (int j0 = a, cols; j0 < a + width; j0 += cols) {       /* 1. logits */
            FN(RaKTile) t = FN(keys_tile)(keys, j0, qt->rows, RA_NEED_KT);
            cols = t.cols;
            int f = FN(tile_prepare)(keys, &t, j0, qt->pos, qt->rows, flags);
            if (f < 0) f = (flags & (RA_CAUSAL | RA_EXCLUDE_SELF)) | RA_MASKED;
            any_masked |= f & RA_MASKED;
            if (t.pos) memcpy(keys->span_pos + (j0 - a), t.pos, sizeof(int64_t) * (size_t)cols);
            qt->s = keys->span_s + (j0 - a);
            FN(ra_fwd_logits)(K, qt, &t, d, f);
        }
        if (keys->observe)                                          /* 2. shown */
            keys->observe(keys->ctx, keys->span_s, span, qt->rows, width, keys->span_pos);
        if (keys->v) {                                              /* 3. one step */
            FN(RaKTile) t = {0};
            t.cols = width;
            t.v = keys->v + (ptrdiff_t)a * keys->ldv;
            t.ldv = keys->ldv;
            t.pos = keys->span_pos;
            qt->s = keys->span_s;
            FN(ra_fwd_accumulate)(K, qt, &t, e, any_masked);
            continue;
        }
        for (int j0 = a, cols; j0 < a + width; j0 += cols) {       /* 3. tile by tile */
            FN(RaKTile) t = FN(keys_tile)(keys, j0, qt->rows, RA_NEED_V);
            cols = t.cols;
            int f = FN(tile_flags)(qt->pos, qt->rows, t.pos, cols, flags);
            if (f < 0) f = RA_MASKED;
            qt->s = keys->span_s + (j0 - a);
            FN(ra_fwd_accumulate)(K, qt, &t, e, f & RA_MASKED);
        }
    }
    qt->s = own_s;
    qt->lds = own_lds;
}

void FN(ra_attend)(const KT *K, FN(RaQTile) *qt, const FN(RaKeys) *keys, int d, int e,
                   int flags)
{
    if (keys->span > RA_BK) {
        FN(attend_spans)(K, qt, keys, d, e, flags);
        return;
    }
    for (int j0 = 0, cols; j0 < keys->count; j0 += cols) {
        FN(RaKTile) t = FN(keys_tile)(keys, j0, qt->rows, RA_NEED_KT | RA_NEED_V);
        cols = t.cols;
        const int f = FN(tile_prepare)(keys, &t, j0, qt->pos, qt->rows, flags);
        if (f >= 0) FN(ra_fwd_step)(K, qt, &t, d, e, f);
    }
}

void FN(ra_attend_self_fallback)(FN(RaQTile) *qt, const FN(RaKeys) *keys, int d, int e,
                                 uint8_t *self_only)
{
    for (int r = 0; r < qt->rows; r++) {
        self_only[r] = 0;
        if (qt->sum[r] != 0) continue;
        for (int j = 0; j < keys->count; j++) {
            if (keys->pos[j] != qt->pos[r]) continue;
            T s = qt->pairs && qt->pairs->bias ? qt->pairs->bias[0] : 0;
            for (int c = 0; c < d; c++)
                s += qt->q[(ptrdiff_t)r * d + c] * keys->kt[(ptrdiff_t)c * keys->ldkt + j];
            if (s == -INFINITY) break;  /* a key of logit −inf is not seen: the row stays empty */
            qt->mx[r] = s;
            qt->sum[r] = 1;
            /* weight exp(s − s): 1 (times the dropout factor) for a finite logit, NaN for a
               NaN or +inf one, as the softmax of one logit is */
            const T f = s - s == 0 ? FN(ra_drop_factor)(qt->pairs, qt->pos[r], qt->pos[r])
                                   : s - s;
            for (int c = 0; c < e; c++)
                qt->acc[(ptrdiff_t)r * e + c] = f * keys->v[(ptrdiff_t)j * keys->ldv + c];
            self_only[r] = 1;
            break;
        }
    }
}

void FN(ra_attend_save)(const FN(RaQTile) *qt, int e, const int64_t *at, T *mx, T *sum, T *acc)
{
    for (int r = 0; r < qt->rows; r++) {
        memcpy(acc + at[r] * e, qt->acc + (ptrdiff_t)r * e, sizeof(T) * (size_t)e);
        mx[at[r]] = qt->mx[r];
        sum[at[r]] = qt->sum[r];
    }
}

void FN(ra_attend_restore)(FN(RaQTile) *qt, int e, const int64_t *at, const T *mx,
                           const T *sum, const T *acc)
{
    for (int r = 0; r < qt->rows; r++) {
        memcpy(qt->acc + (ptrdiff_t)r * e, acc + at[r] * e, sizeof(T) * (size_t)e);
        qt->mx[r] = mx[at[r]];
        qt->sum[r] = sum[at[r]];
    }
}

/* The one term of an exclude_self fallback row r (its own key j, weight p = exp(s - lse),
 * dropout factor f): forward out = p·f·v_j, so dv_j += p·f·dout, ds = p·(f·dp - delta),
 * dq += ds·k_j, dk_j += ds·q (and dbias at offset 0 += ds). */
static void FN(self_fallback_backward)(const FN(RaQGradTile) *g, const FN(RaKeys) *keys, int r,
                                       T *dk, ptrdiff_t lddk, T *dv, ptrdiff_t lddv, int d, int e)
{
    int j = 0;
    while (keys->pos[j] != g->pos[r]) j++;        /* present: the forward found it */
    const T *qr = g->q + (ptrdiff_t)r * d, *dr = g->dout + (ptrdiff_t)r * e;
    const T *kj = keys->k + (ptrdiff_t)j * keys->ldk;
    const FN(RaPairs) *pr = g->pairs;
    T s = pr && pr->bias ? pr->bias[0] : 0, dp = 0;
    for (int c = 0; c < d; c++) s += qr[c] * kj[c];
    for (int c = 0; c < e; c++) dp += dr[c] * keys->vt[(ptrdiff_t)c * keys->ldvt + j];
    const T f = FN(ra_drop_factor)(pr, g->pos[r], g->pos[r]);
    const T p = exp(s - g->lse[r]), ds = p * (f * dp - g->delta[r]);
    if (pr && pr->dbias) pr->dbias[0] += ds;
    for (int c = 0; c < e; c++) dv[(ptrdiff_t)j * lddv + c] += p * f * dr[c];
    for (int c = 0; c < d; c++) {
        g->dq[(ptrdiff_t)r * d + c] += ds * kj[c];
        dk[(ptrdiff_t)j * lddk + c] += ds * qr[c];
    }
}

void FN(ra_attend_backward)(const KT *K, FN(RaQGradTile) *g, const FN(RaKeys) *keys, T *dk,
                            ptrdiff_t lddk, T *dv, ptrdiff_t lddv, int d, int e, int flags,
                            const uint8_t *self_only)
{
    const int own = flags & RA_OWN_STATS;
    const int one_tile = keys->count <= RA_BK;
    for (int r = 0; own && r < g->rows; r++) {
        /* what a row that sees no key gets; a longer list breaks the flag's contract and
           gets NaN statistics, so NaN gradients rather than quietly wrong ones */
        g->lse[r] = one_tile ? -INFINITY : (T)NAN;
        g->delta[r] = one_tile ? 0 : (T)NAN;
    }
    for (int j0 = 0, cols; j0 < keys->count; j0 += cols) {
        FN(RaKTile) t = FN(keys_tile)(keys, j0, g->rows, RA_NEED_KT | RA_NEED_BACKWARD);
        cols = t.cols;
        const int f = FN(tile_prepare)(keys, &t, j0, g->pos, g->rows, flags);
        if (f >= 0)
            FN(ra_bwd_step)(K, g, &t, t.dk ? t.dk : dk + (ptrdiff_t)j0 * lddk, lddk,
                            t.dv ? t.dv : dv + (ptrdiff_t)j0 * lddv, lddv, d, e,
                            f | (one_tile ? own : 0));
    }
    for (int r = 0; self_only && r < g->rows; r++)
        if (self_only[r]) FN(self_fallback_backward)(g, keys, r, dk, lddk, dv, lddv, d, e);
}

T FN(ra_lse_merge)(int count, const int64_t *at, const T *lse, const T *o, int e, char *out,
                   ptrdiff_t os)
{
    T mx = -INFINITY, total = 0;
    int nan = 0;
    for (int t = 0; t < count; t++) {
        const T l = lse[at ? at[t] : t];
        nan |= l != l;
        if (l > mx) mx = l;
    }
    const int contiguous = os == (ptrdiff_t)sizeof(T);
    if (o) {
        if (contiguous) memset(out, 0, sizeof(T) * (size_t)e);
        else for (int f = 0; f < e; f++) *(T *)(out + f * os) = 0;
    }
    if (mx == -INFINITY && !nan) return -INFINITY;
    for (int t = 0; t < count; t++) {
        const int64_t row = at ? at[t] : t;
        const T w = (T)exp(lse[row] - mx);
        total += w;
        if (!o) continue;
        const T *ot = o + row * e;
        if (contiguous) for (int f = 0; f < e; f++) ((T *)out)[f] += w * ot[f];
        else for (int f = 0; f < e; f++) *(T *)(out + f * os) += w * ot[f];
    }
    if (o) {
        if (contiguous) for (int f = 0; f < e; f++) ((T *)out)[f] /= total;
        else for (int f = 0; f < e; f++) *(T *)(out + f * os) /= total;
    }
    return mx + (T)log(total);
}
