/* rows_body.h — typed row movement the planners share (declared in engine.h): a row
 * scaled and added, a dot product, gathers of rows (plain or transposed), a key list's
 * packing.  Included by engine.c once per dtype with T, KT and FN(name). */

void FN(ra_add_row)(T *dst, T a, RaMat m, int64_t i, int n)
{
    const char *row = m.data + (ptrdiff_t)i * m.s0;
    if (m.s1 == (ptrdiff_t)sizeof(T)) {
        const T *x = (const T *)row;
        for (int f = 0; f < n; f++) dst[f] += a * x[f];
    } else {
        for (int f = 0; f < n; f++) dst[f] += a * *(const T *)(row + (ptrdiff_t)f * m.s1);
    }
}

T FN(ra_dot)(const char *a, ptrdiff_t sa, const char *b, ptrdiff_t sb, int n)
{
    T part[8] = {0}, s = 0;
    int f = 0;
    if (sa == (ptrdiff_t)sizeof(T) && sb == (ptrdiff_t)sizeof(T)) {
        /* the same eight partial sums, held in 16-byte vectors (the baseline SSE2
           width, so the compiler keeps them in registers) */
        typedef T v16 __attribute__((vector_size(16)));
        enum { NV = 8 * sizeof(T) / 16, PER = 16 / sizeof(T) };
        v16 acc[NV] = {{0}}, x, y;
        for (; f + 8 <= n; f += 8)
            for (int u = 0; u < NV; u++) {
                memcpy(&x, a + (ptrdiff_t)(f + u * PER) * sa, sizeof x);
                memcpy(&y, b + (ptrdiff_t)(f + u * PER) * sb, sizeof y);
                acc[u] += x * y;
            }
        memcpy(part, acc, sizeof acc);
    } else {
        for (; f + 8 <= n; f += 8)
            for (int l = 0; l < 8; l++)
                part[l] += *(const T *)(a + (f + l) * sa) * *(const T *)(b + (f + l) * sb);
    }
    for (; f < n; f++) s += *(const T *)(a + f * sa) * *(const T *)(b + f * sb);
    for (int l = 0; l < 8; l++) s += part[l];
    return s;
}

void FN(ra_gather)(RaMat src, const int64_t *idx, int64_t first, int rows, int cols, T mul,
                   int transposed, T *dst, ptrdiff_t ld)
{
    if (!transposed) {
        for (int r = 0; r < rows; r++) {
            const int64_t row = idx ? idx[r] : first + r;
            const char *p = src.data + (ptrdiff_t)row * src.s0;
            T *o = dst + (ptrdiff_t)r * ld;
            if (idx && r + RA_PREFETCH_ROWS < rows && idx[r + RA_PREFETCH_ROWS] >= 0 &&
                src.s1 == (ptrdiff_t)sizeof(T)) {
                /* scattered rows: fetch a later row's cache lines while copying this one */
                RA_PREFETCH_ROW(src, idx[r + RA_PREFETCH_ROWS], cols, sizeof(T), 3);
            }
            if (row < 0) memset(o, 0, sizeof(T) * (size_t)cols);
            else if (src.s1 == (ptrdiff_t)sizeof(T) && mul == 1)
                memcpy(o, p, sizeof(T) * (size_t)cols);   /* x·1 = x exactly: a plain copy */
            else if (src.s1 == (ptrdiff_t)sizeof(T))
                for (int c = 0; c < cols; c++) o[c] = ((const T *)p)[c] * mul;
            else
                for (int c = 0; c < cols; c++) o[c] = *(const T *)(p + (ptrdiff_t)c * src.s1) * mul;
        }
        return;
    }
    /* transposed, 64 rows at a time: the SIMD gather when the rows are contiguous and all
       present, else 16-row blocks so each output row is written in short runs */
    const int simd = src.s1 == (ptrdiff_t)sizeof(T) && src.s0 % (ptrdiff_t)sizeof(T) == 0;
    for (int r0 = 0; r0 < rows; r0 += 64) {
        const int r1 = r0 + 64 < rows ? r0 + 64 : rows;
        int64_t off[64];
        int present = simd;
        for (int r = r0; r < r1 && present; r++) {
            const int64_t row = idx ? idx[r] : first + r;
            present = row >= 0;
            off[r - r0] = row * (src.s0 / (ptrdiff_t)sizeof(T));
        }
        if (present) {
            ra_kernels()->KSEL.gather_t(r1 - r0, cols, (const T *)src.data, off, mul, dst + r0, ld);
            continue;
        }
        for (int b0 = r0; b0 < r1; b0 += 16) {
            const int b1 = b0 + 16 < r1 ? b0 + 16 : r1;
            for (int c = 0; c < cols; c++) {
                T *o = dst + (ptrdiff_t)c * ld;
                for (int r = b0; r < b1; r++) {
                    const int64_t row = idx ? idx[r] : first + r;
                    o[r] = row < 0 ? 0 : *(const T *)(src.data + (ptrdiff_t)row * src.s0 +
                                                       (ptrdiff_t)c * src.s1) * mul;
                }
            }
        }
    }
}

const T *FN(ra_rows)(RaMat src, int64_t first, int rows, int cols, T *dst, ptrdiff_t *ld)
{
    if (src.s1 == (ptrdiff_t)sizeof(T) && src.s0 > 0 && src.s0 % (ptrdiff_t)sizeof(T) == 0) {
        *ld = src.s0 / (ptrdiff_t)sizeof(T);
        return (const T *)(src.data + first * src.s0);
    }
    FN(ra_gather)(src, NULL, first, rows, cols, 1, 0, dst, cols);
    *ld = cols;
    return dst;
}

FN(RaKeys) FN(ra_pack_keys)(RaMat k, const int64_t *kidx, RaMat v, const int64_t *vidx,
                            int rows, int d, int e, T kt_mul, T *kp, T *kt, T *vp, T *vt)
{
    const int ldt = ra_spread_ld(rows, sizeof(T));
    FN(RaKeys) keys = {.count = rows};
    if (kt) {
        FN(ra_gather)(k, kidx, 0, rows, d, kt_mul, 1, kt, ldt);
        keys.kt = kt;
        keys.ldkt = ldt;
    }
    if (vt) {
        FN(ra_gather)(v, vidx, 0, rows, e, 1, 1, vt, ldt);
        keys.vt = vt;
        keys.ldvt = ldt;
    }
    if (kp) {
        keys.ldk = ra_spread_ld(d, sizeof(T));
        FN(ra_gather)(k, kidx, 0, rows, d, 1, 0, kp, keys.ldk);
        keys.k = kp;
    }
    if (vp) {
        keys.ldv = ra_spread_ld(e, sizeof(T));
        FN(ra_gather)(v, vidx, 0, rows, e, 1, 0, vp, keys.ldv);
        keys.v = vp;
    }
    return keys;
}
