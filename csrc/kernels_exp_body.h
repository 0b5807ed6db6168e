/* kernels_exp_body.h — the exponential, lane-wise and scalar, of the softmax pieces.
 * Included by kernels_body.h (once per type, with its macros). */

/* ------------------------------------------------------------------ exp */
/* exp(x) lane-wise, accurate to a few ulp: x = n·ln2 + r with |r| ≤ ln2/2, 2^n built
 * in the exponent field, e^r by polynomial.  Underflow gives exactly 0 (also for -inf),
 * NaN stays NaN.  Used for softmax arguments, which are ≤ 0 up to rounding. */
static inline vec FN(vexp)(vec x)
{
#if RA_IS_F32
    const T lo = -87.33f, hi = 88.37f, magic = 12582912.0f;   /* 1.5·2^23 */
    const T ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    const UT bias = 127, mant = 23;
#else
    const T lo = -708.39, hi = 709.78, magic = 6755399441055744.0; /* 1.5·2^52 */
    const T ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    const UT bias = 1023, mant = 52;
#endif
    const T log2e = (T)1.44269504088896340736;
    uvec under = (uvec)(x < lo);
#if defined(RA_X86) && VEC_BYTES == 64
    /* AVX-512: x clamped to [lo, hi] by min / max (a NaN x passes: the second operand
       wins), n rounded by VRNDSCALE and 2^n applied by VSCALEF instead of the exponent-
       field arithmetic */
    (void)magic; (void)bias; (void)mant;
#if RA_IS_F32
    x = (vec)_mm512_max_ps((__m512)FN(vsplat)(lo), (__m512)x);
    x = (vec)_mm512_min_ps((__m512)FN(vsplat)(hi), (__m512)x);
    const vec n = (vec)_mm512_roundscale_ps((__m512)(x * log2e), _MM_FROUND_TO_NEAREST_INT);
#else
    x = (vec)_mm512_max_pd((__m512d)FN(vsplat)(lo), (__m512d)x);
    x = (vec)_mm512_min_pd((__m512d)FN(vsplat)(hi), (__m512d)x);
    const vec n = (vec)_mm512_roundscale_pd((__m512d)(x * log2e), _MM_FROUND_TO_NEAREST_INT);
#endif
#else
    x = FN(vmin_skip_nan)(FN(vsplat)(hi), x);   /* a NaN x passes, as above */
    x = FN(vmax_skip_nan)(FN(vsplat)(lo), x);
    vec t = x * log2e + magic;          /* round(x·log2e) sits in the low mantissa bits */
    vec n = t - magic;
#endif
    vec r = x - n * ln2_hi;
    r = r - n * ln2_lo;
#if RA_IS_F32
    vec p = FN(vsplat)(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
#else
    /* Taylor series to r^13/13!: truncation < 1e-17 for |r| ≤ ln2/2. */
    vec p = FN(vsplat)(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
#endif
#if defined(RA_X86) && VEC_BYTES == 64
#if RA_IS_F32
    const vec e = (vec)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    const vec e = (vec)_mm512_scalef_pd((__m512d)p, (__m512d)n);
#endif
    return FN(vsel)(under, FN(vsplat)(0), e);
#else
    vec scale2n = (vec)(((uvec)t + bias) << mant);
    return FN(vsel)(under, FN(vsplat)(0), p * scale2n);
#endif
}

static inline T FN(sexp)(T x)
{
    vec v = FN(vexp)(FN(vsplat)(x));
    return v[0];
}
