/* masked_check_body.h — typed body of masked_check.c (T, KT, KSEL, FN defined). */

/* RaKeys.tile_vis: the bitmap of mask rows [i0, i0+rows) × columns [j0, j0+cols) */
typedef struct { RaMat mask; int i0; uint64_t *vis; } FN(McVis);

static const uint64_t *FN(mc_vis)(void *ctx, int rows, int j0, int cols, ptrdiff_t *ldvis)
{
    const FN(McVis) *c = ctx;
    memset(c->vis, 0, sizeof(uint64_t) * (size_t)rows * (RA_BK / 64));
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++)
            if (RA_MAT_AT(uint8_t, c->mask, c->i0 + i, j0 + j))
                c->vis[i * (RA_BK / 64) + (j >> 6)] |= (uint64_t)1 << (j & 63);
    *ldvis = RA_BK / 64;
    return c->vis;
}

/* q (n, d), k (m, d), v (m, e), mask (n, m) bool, dout (n, e) -> out (n, e), lse (n),
 * dq (n, d), dk (m, d), dv (m, e); logits q·k (no scale) */
int FN(ra_engine_masked)(int n, int m, int d, int e, RaMat q, RaMat k, RaMat v, RaMat mask,
                         RaMat dout, RaMat out, RaVec lse, RaMat dq, RaMat dk, RaMat dv)
{
    const KT *K = &ra_kernels()->KSEL;
    const size_t S = sizeof(T), nm = (size_t)(m > 0 ? m : 1);
    T *kt = ra_alloc(nm * d * S), *kr = ra_alloc(nm * d * S), *vr = ra_alloc(nm * e * S);
    T *vt = ra_alloc(nm * e * S), *dkr = ra_alloc(nm * d * S), *dvr = ra_alloc(nm * e * S);
    T *qs = ra_alloc(RA_BQ * (size_t)d * S), *acc = ra_alloc(RA_BQ * (size_t)e * S);
    T *s = ra_alloc(RA_BQ * RA_BK * S), *dp = ra_alloc(RA_BQ * RA_BK * S);
    T *mx = ra_alloc(RA_BQ * S), *sum = ra_alloc(RA_BQ * S), *lt = ra_alloc(RA_BQ * S);
    T *dl = ra_alloc(RA_BQ * S), *go = ra_alloc(RA_BQ * (size_t)e * S);
    T *dqt = ra_alloc(RA_BQ * (size_t)d * S);
    uint64_t *vis = ra_alloc(RA_BQ * (RA_BK / 64) * sizeof(uint64_t));
    int st = RA_OK;
    if (!kt || !kr || !vr || !vt || !dkr || !dvr || !qs || !acc || !s || !dp || !mx || !sum ||
        !lt || !dl || !go || !dqt || !vis) { st = RA_ERR_NOMEM; goto done; }
    FN(ra_gather)(k, NULL, 0, m, d, 1, 1, kt, m);
    FN(ra_gather)(k, NULL, 0, m, d, 1, 0, kr, d);
    FN(ra_gather)(v, NULL, 0, m, e, 1, 0, vr, e);
    FN(ra_gather)(v, NULL, 0, m, e, 1, 1, vt, m);
    memset(dkr, 0, nm * d * S);
    memset(dvr, 0, nm * e * S);
    FN(McVis) mv = {mask, 0, vis};
    const FN(RaKeys) keys = {.count = m, .kt = kt, .ldkt = m, .v = vr, .ldv = e, .k = kr,
                             .ldk = d, .vt = vt, .ldvt = m, .tile_vis = FN(mc_vis), .ctx = &mv};
    for (int i0 = 0; i0 < n; i0 += RA_BQ) {
        const int rows = n - i0 < RA_BQ ? n - i0 : RA_BQ;
        FN(ra_gather)(q, NULL, i0, rows, d, 1, 0, qs, d);
        FN(RaQTile) qt = {rows, qs, NULL, mx, sum, acc, s};
        mv.i0 = i0;
        FN(ra_fwd_init)(&qt, e);
        FN(ra_attend)(K, &qt, &keys, d, e, 0);
        FN(ra_fwd_finish)(&qt, e, out.data + i0 * out.s0, out.s0, out.s1, (char *)lt, S);
        FN(ra_gather)(dout, NULL, i0, rows, e, 1, 0, go, e);
        for (int i = 0; i < rows; i++) {
            T a = 0;
            for (int c = 0; c < e; c++) a += go[i * e + c] * RA_MAT_AT(T, out, i0 + i, c);
            dl[i] = a;
            *(T *)(lse.data + (i0 + i) * lse.s0) = lt[i];
        }
        memset(dqt, 0, RA_BQ * (size_t)d * S);
        FN(RaQGradTile) g = {rows, qs, go, lt, dl, NULL, dqt, s, dp};
        FN(ra_attend_backward)(K, &g, &keys, dkr, d, dvr, e, d, e, 0, NULL);
        for (int i = 0; i < rows; i++)
            for (int c = 0; c < d; c++) RA_MAT_AT(T, dq, i0 + i, c) = dqt[i * d + c];
    }
    for (int j = 0; j < m; j++) {
        for (int c = 0; c < d; c++) RA_MAT_AT(T, dk, j, c) = dkr[(ptrdiff_t)j * d + c];
        for (int c = 0; c < e; c++) RA_MAT_AT(T, dv, j, c) = dvr[(ptrdiff_t)j * e + c];
    }
done:
    ra_free(kt); ra_free(kr); ra_free(vr); ra_free(vt); ra_free(dkr); ra_free(dvr);
    ra_free(qs); ra_free(acc); ra_free(s); ra_free(dp); ra_free(mx); ra_free(sum);
    ra_free(lt); ra_free(dl); ra_free(go); ra_free(dqt); ra_free(vis);
    return st;
}
