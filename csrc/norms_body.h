/* norms_body.h — rows scaled to unit L2 norm without overflow or underflow: the safe
 * sum of squares spherical k-means and update_centroids normalise with, and
 * normalize_rows (the layer's routing rows).  Included by clustering_body.h (once per
 * type, with its macros). */

/* ------------------------------------------------------------------ safe row norms */
/* A row's plain sum of squares s = Σ x_u² is accurate unless squares overflowed (s = inf
 * for a finite row) or underflowed (s below min normal / epsilon, where the lost
 * subnormal squares could reach s's last bit).  Such a row is scaled by 2^-e, the power
 * of two that brings its largest |x_u| into [0.5, 1), and summed again.  Scaling by a
 * power of two is exact, so the scaled route gives the plain route's bits wherever both
 * are accurate; rows of ordinary size take the plain route alone.  FE_OVERFLOW is kept as
 * it was before the plain sums (the callers save and restore it): an overflow there is
 * rescued (a finite row) or no news (a row holding an infinity). */

/* s is accurate as it is (false for NaN) */
static inline int FN(plain_sq)(T s)
{
    const T low = RA_IS_F32 ? 0x1p-104f : 0x1p-970;     /* min normal / eps, or below */
    return s >= low && s < (T)INFINITY;
}

/* e such that 2^-e brings the row x's (d entries, byte stride) largest |x_u| into
 * [0.5, 1); 0 for an all-zero row and for a row with a NaN or an infinity (nothing to
 * rescue: its sum stays non-finite, as the callers expect) */
static int FN(norm_exponent)(const char *x, ptrdiff_t stride, int d)
{
    T m = 0;
    for (int u = 0; u < d; u++) {
        const T a = (T)fabs(*(const T *)(x + (ptrdiff_t)u * stride));
        if (!(a < (T)INFINITY)) return 0;
        if (a > m) m = a;
    }
    int e = 0;
    if (m > 0) frexp(m, &e);
    return e;
}

/* Σ x_u² of the contiguous row x (d) whose plain sum is s: s when accurate; else x is
 * scaled in place by 2^-e (norm_exponent) and summed again.  x / sqrt(result) is the
 * unit row either way. */
static T FN(safe_sq)(T *x, int d, T s)
{
    const int e = FN(plain_sq)(s) ? 0 : FN(norm_exponent)((const char *)x, sizeof(T), d);
    if (e == 0) return s;
    T sq = 0;
    for (int u = 0; u < d; u++) {
        x[u] = (T)ldexp(x[u], -e);
        sq += x[u] * x[u];
    }
    return sq;
}

/* ------------------------------------------------------------------ normalize_rows */
/* The row x (d entries, byte stride sx) / its norm into out (stride so; may be x itself),
 * its norm and |out|²: unit strides through the SIMD kernel, others element by element
 * (which path a row takes depends on the layout only, never on the thread count). */
static void FN(normalize_one)(const KT *K, int unit, const char *x, ptrdiff_t sx, char *out,
                              ptrdiff_t so, int d, T *norm, T *sq)
{
    if (unit) {
        K->normalize_row((const T *)x, d, (T *)out, norm, sq);
        return;
    }
    const T nrm = (T)sqrt(FN(ra_dot)(x, sx, x, sx, d));
    const T div = nrm > 0 ? nrm : 1;
    for (int f = 0; f < d; f++)
        *(T *)(out + (ptrdiff_t)f * so) = *(const T *)(x + (ptrdiff_t)f * sx) / div;
    *norm = nrm;
    *sq = FN(ra_dot)(out, so, out, so, d);
}

/* x (B; n, d) -> xhat (B; n, d), norm, sq (B; n); rows in parallel (each on its own).
 * A finite row whose squares overflow or underflow is normalised again scaled by 2^-e
 * (see "safe row norms"), its norm scaled back: inf where it exceeds the dtype, the one
 * overflow reported. */
int FN(ra_normalize_rows)(ptrdiff_t B, int n, int d, RaBMat x, RaBMat xhat, RaBVec norm,
                          RaBVec sq)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    const ptrdiff_t total = B * (ptrdiff_t)n;
    const int unit = x.s1 == (ptrdiff_t)sizeof(T) && xhat.s1 == (ptrdiff_t)sizeof(T);
    fexcept_t fe_saved;
    fegetexceptflag(&fe_saved, FE_OVERFLOW);
    int huge = 0;                             /* a norm beyond the dtype */
    #pragma omp parallel for num_threads(nt) schedule(static) if (total * d > 32768) \
        reduction(|:huge)
    for (ptrdiff_t u = 0; u < total; u++) {
        const ptrdiff_t b = u / n;
        const int i = (int)(u % n);
        const RaMat xb = ra_mat_at(x, b), ob = ra_mat_at(xhat, b);
        const char *row = xb.data + (ptrdiff_t)i * xb.s0;
        char *out = ob.data + (ptrdiff_t)i * ob.s0;
        T *nrm_i = &RA_VEC_AT(T, ra_vec_at(norm, b), i), *sq_i = &RA_VEC_AT(T, ra_vec_at(sq, b), i);
        FN(normalize_one)(K, unit, row, xb.s1, out, ob.s1, d, nrm_i, sq_i);
        const int e = FN(plain_sq)(*nrm_i * *nrm_i) ? 0 : FN(norm_exponent)(row, xb.s1, d);
        if (e == 0) continue;
        for (int f = 0; f < d; f++) {
            const T xf = *(const T *)(row + (ptrdiff_t)f * xb.s1);
            *(T *)(out + (ptrdiff_t)f * ob.s1) = (T)ldexp(xf, -e);
        }
        FN(normalize_one)(K, unit, out, ob.s1, out, ob.s1, d, nrm_i, sq_i);
        *nrm_i = (T)ldexp(*nrm_i, e);
        huge |= isinf(*nrm_i);
    }
    (void)ra_worker_flags(nt, FE_OVERFLOW);
    fesetexceptflag(&fe_saved, FE_OVERFLOW);
    if (huge) feraiseexcept(FE_OVERFLOW);
    return RA_OK;
}
