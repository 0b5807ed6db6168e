/* engine_body.h — typed body of the tile engine (see engine.h).  Included by engine.c
 * once per dtype with T, KT (kernel table type), and FN(name) = name##_<suffix>. */

/* Write -inf into the logits of every invisible (query, key) pair of the tile. */
static void FN(apply_mask)(T *s, int rows, int cols, const int64_t *qpos,
                           const int64_t *kpos, int flags)
{
    for (int i = 0; i < rows; i++) {
        const int64_t qi = qpos ? qpos[i] : 0;
        T *si = s + (ptrdiff_t)i * RA_BK;
        for (int j = 0; j < cols; j++) {
            const int64_t kj = kpos[j];
            const int hidden = kj < 0 || ((flags & RA_CAUSAL) && kj > qi) ||
                               ((flags & RA_EXCLUDE_SELF) && kj == qi);
            if (hidden) si[j] = -INFINITY;
        }
    }
}

/* Write -inf into the logits the explicit bitmap hides (bit clear). */
static void FN(apply_vis)(T *s, int rows, int cols, const uint64_t *vis, ptrdiff_t ldvis)
{
    for (int i = 0; i < rows; i++) {
        T *si = s + (ptrdiff_t)i * RA_BK;
        const uint64_t *w = vis + (ptrdiff_t)i * ldvis;
        for (int j = 0; j < cols; j++)
            if (!((w[j >> 6] >> (j & 63)) & 1)) si[j] = -INFINITY;
    }
}

void FN(ra_gather)(RaMat src, const int64_t *idx, int64_t first, int rows, int cols, T mul,
                   int transposed, T *dst, ptrdiff_t ld)
{
    if (!transposed) {
        for (int r = 0; r < rows; r++) {
            const int64_t row = idx ? idx[r] : first + r;
            const char *p = src.data + (ptrdiff_t)row * src.s0;
            T *o = dst + (ptrdiff_t)r * ld;
            if (row < 0) memset(o, 0, sizeof(T) * (size_t)cols);
            else if (src.s1 == (ptrdiff_t)sizeof(T))
                for (int c = 0; c < cols; c++) o[c] = ((const T *)p)[c] * mul;
            else
                for (int c = 0; c < cols; c++) o[c] = *(const T *)(p + (ptrdiff_t)c * src.s1) * mul;
        }
        return;
    }
    /* transposed: 16 rows at a time, so each output row is written in short runs */
    for (int r0 = 0; r0 < rows; r0 += 16) {
        const int r1 = r0 + 16 < rows ? r0 + 16 : rows;
        for (int c = 0; c < cols; c++) {
            T *o = dst + (ptrdiff_t)c * ld;
            for (int r = r0; r < r1; r++) {
                const int64_t row = idx ? idx[r] : first + r;
                o[r] = row < 0 ? 0 : *(const T *)(src.data + (ptrdiff_t)row * src.s0 +
                                                   (ptrdiff_t)c * src.s1) * mul;
            }
        }
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

/* q is (rows, d), kt is (d, cols), v is (cols, e), acc is (rows, e) */
void FN(ra_fwd_step)(const KT *K, FN(RaQTile) *qt, const FN(RaKTile) *kt, int d, int e,
                     int flags)
{
    const int rows = qt->rows, cols = kt->cols;
    /* 1. logits: s = q · kᵀ */
    K->gemm(rows, cols, d, qt->q, d, kt->kt, kt->ldkt, qt->s, RA_BK, 0);
    /* 2. position mask */
    if (flags & RA_MASKED) FN(apply_mask)(qt->s, rows, cols, qt->pos, kt->pos, flags);
    if (kt->vis) FN(apply_vis)(qt->s, rows, cols, kt->vis, kt->ldvis);
    /* 3. online softmax: s <- p, acc rescaled to the new row maxima */
    K->softmax_step(rows, cols, qt->s, RA_BK, qt->mx, qt->sum, qt->acc, e, e);
    /* 4. acc += p · v */
    K->gemm(rows, e, cols, qt->s, RA_BK, kt->v, kt->ldv, qt->acc, e, 1);
}

void FN(ra_fwd_finish)(const FN(RaQTile) *qt, int e, char *out, ptrdiff_t os0,
                       ptrdiff_t os1, char *lse, ptrdiff_t ls0)
{
    for (int i = 0; i < qt->rows; i++) {
        const T sum = qt->sum[i];
        /* a row that saw no key: output 0, lse -inf (sum is 0 only then) */
        const T inv = sum == 0 ? 0 : 1 / sum;
        const T *a = qt->acc + (ptrdiff_t)i * e;
        char *o = out + (ptrdiff_t)i * os0;
        for (int c = 0; c < e; c++) *(T *)(o + (ptrdiff_t)c * os1) = a[c] * inv;
        if (lse) *(T *)(lse + (ptrdiff_t)i * ls0) = sum == 0 ? -INFINITY : qt->mx[i] + log(sum);
    }
}

/* q (rows, d), dout (rows, e); k (cols, d), kt (d, cols), vt (e, cols);
 * dq (rows, d), dk (cols, d), dv (cols, e) accumulate */
void FN(ra_bwd_step)(const KT *K, FN(RaQGradTile) *g, const FN(RaKTile) *kt, T *dk,
                     ptrdiff_t lddk, T *dv, ptrdiff_t lddv, int d, int e, int flags)
{
    const int rows = g->rows, cols = kt->cols;
    /* forward pass 1-3 recomputed: s = q·kᵀ, masked, p = exp(s - lse) */
    K->gemm(rows, cols, d, g->q, d, kt->kt, kt->ldkt, g->s, RA_BK, 0);
    if (flags & RA_MASKED) FN(apply_mask)(g->s, rows, cols, g->pos, kt->pos, flags);
    if (kt->vis) FN(apply_vis)(g->s, rows, cols, kt->vis, kt->ldvis);
    K->exp_shift(rows, cols, g->s, RA_BK, g->lse);
    /* forward: acc += p·v, so dv += pᵀ·dout and dp = dout·vᵀ */
    K->gemm_tn(cols, e, rows, g->s, RA_BK, g->dout, e, dv, lddv, 1);
    K->gemm(rows, cols, e, g->dout, e, kt->vt, kt->ldvt, g->dp, RA_BK, 0);
    /* forward: p = softmax(s), so ds = p ∘ (dp - delta) with delta = rowsum(dout∘out) */
    K->softmax_grad(rows, cols, g->s, g->dp, RA_BK, g->delta, 1);
    /* forward: s = q·kᵀ, so dq += ds·k and dk += dsᵀ·q */
    K->gemm(rows, d, cols, g->dp, RA_BK, kt->k, kt->ldk, g->dq, d, 1);
    K->gemm_tn(cols, d, rows, g->dp, RA_BK, g->q, d, dk, lddk, 1);
}
