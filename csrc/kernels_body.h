/* kernels_body.h — typed body of the SIMD kernels; see kernels.h for the contracts.
 *
 * Included once per (instruction set, dtype) with these macros defined:
 *   T          float or double
 *   UT         matching unsigned integer (uint32_t / uint64_t)
 *   FN(name)   name mangling, e.g. name##_f32_avx2
 *   VEC_BYTES  vector register width in bytes (64, 32, 16)
 *   GEMM_MR    rows of the gemm micro-tile
 *   GEMM_NV    vectors per row of the gemm micro-tile
 * Written with GCC vector extensions so one source serves every width; the target
 * pragma of the including file decides which instructions they become.
 */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RA_X86 1
#endif

#define VL ((int)(VEC_BYTES / sizeof(T)))
typedef T FN(vec) __attribute__((vector_size(VEC_BYTES), aligned(sizeof(T))));
typedef UT FN(uvec) __attribute__((vector_size(VEC_BYTES), aligned(sizeof(T))));
#define vec FN(vec)
#define uvec FN(uvec)

/* RA_SHUFFLE2(a, b, m): lane l takes lane m[l] of the concatenation (a, b), indices in
 * [0, 2·VL).  GCC's __builtin_shuffle takes a run-time mask; clang's shufflevector wants
 * constants, so clang gets the same permutation lane by lane (exact either way). */
#ifndef RA_SHUFFLE2
#if defined(__clang__)
#define RA_SHUFFLE2(a, b, m) __extension__({                                             \
        __typeof__((a) + (a)) ra_a_ = (a), ra_b_ = (b), ra_r_;   /* (a) + (a): not const */ \
        for (int ra_l_ = 0; ra_l_ < (int)(sizeof(ra_a_) / sizeof(ra_a_[0])); ra_l_++) {   \
            const int ra_i_ = (int)(m)[ra_l_];                                           \
            const int ra_n_ = (int)(sizeof(ra_a_) / sizeof(ra_a_[0]));                    \
            ra_r_[ra_l_] = ra_i_ < ra_n_ ? ra_a_[ra_i_] : ra_b_[ra_i_ - ra_n_];            \
        }                                                                                \
        ra_r_; })
#else
#define RA_SHUFFLE2(a, b, m) __builtin_shuffle(a, b, m)
#endif
#endif

static inline vec FN(vload)(const T *p) { return *(const vec *)p; }
static inline void FN(vstore)(T *p, vec x) { *(vec *)p = x; }
static inline vec FN(vsplat)(T x) { return (vec){0} + x; }
/* Lane-wise (m ? a : b) for a comparison mask m (every bit of a lane set or none: AVX2's
 * blend, which reads a lane's top bit, is one instruction where the masks take three). */
static inline vec FN(vsel)(uvec m, vec a, vec b)
{
#if defined(RA_X86) && VEC_BYTES == 32 && RA_IS_F32
    return (vec)_mm256_blendv_ps((__m256)b, (__m256)a, (__m256)m);
#elif defined(RA_X86) && VEC_BYTES == 32
    return (vec)_mm256_blendv_pd((__m256d)b, (__m256d)a, (__m256d)m);
#else
    return (vec)(((uvec)a & m) | ((uvec)b & ~m));
#endif
}

static inline T FN(hsum)(vec x)
{
    T s = 0;
    for (int l = 0; l < VL; l++) s += x[l];
    return s;
}

static inline T FN(hmax)(vec x)
{
    T m = x[0];
    for (int l = 1; l < VL; l++) m = x[l] > m ? x[l] : m;
    return m;
}

/* Lane-wise (x > m ? x : m): a NaN lane of x loses to m.  On x86 that is exactly MAXPS /
 * MAXPD with x first (their result is the second operand unless the first is greater),
 * one instruction where the compare-and-select takes three. */
static inline vec FN(vmax_skip_nan)(vec x, vec m)
{
#if defined(RA_X86) && VEC_BYTES == 64 && RA_IS_F32
    return (vec)_mm512_max_ps((__m512)x, (__m512)m);
#elif defined(RA_X86) && VEC_BYTES == 64
    return (vec)_mm512_max_pd((__m512d)x, (__m512d)m);
#elif defined(RA_X86) && VEC_BYTES == 32 && RA_IS_F32
    return (vec)_mm256_max_ps((__m256)x, (__m256)m);
#elif defined(RA_X86) && VEC_BYTES == 32
    return (vec)_mm256_max_pd((__m256d)x, (__m256d)m);
#else
    return FN(vsel)((uvec)(x > m), x, m);
#endif
}

/* Lane-wise (x < m ? x : m): a NaN lane of x loses to m; MINPS / MINPD with x first. */
static inline vec FN(vmin_skip_nan)(vec x, vec m)
{
#if defined(RA_X86) && VEC_BYTES == 64 && RA_IS_F32
    return (vec)_mm512_min_ps((__m512)x, (__m512)m);
#elif defined(RA_X86) && VEC_BYTES == 64
    return (vec)_mm512_min_pd((__m512d)x, (__m512d)m);
#elif defined(RA_X86) && VEC_BYTES == 32 && RA_IS_F32
    return (vec)_mm256_min_ps((__m256)x, (__m256)m);
#elif defined(RA_X86) && VEC_BYTES == 32
    return (vec)_mm256_min_pd((__m256d)x, (__m256d)m);
#else
    return FN(vsel)((uvec)(x < m), x, m);
#endif
}

/* Lane l takes lane l ^ h (h a power of two below VL, known at compile time). */
static inline vec FN(swap_lanes)(vec x, int h)
{
#if defined(RA_X86) && VEC_BYTES == 64 && RA_IS_F32
    switch (h) {
    case 8: return (vec)_mm512_shuffle_f32x4((__m512)x, (__m512)x, 0x4E);
    case 4: return (vec)_mm512_shuffle_f32x4((__m512)x, (__m512)x, 0xB1);
    case 2: return (vec)_mm512_permute_ps((__m512)x, 0x4E);
    default: return (vec)_mm512_permute_ps((__m512)x, 0xB1);
    }
#elif defined(RA_X86) && VEC_BYTES == 64
    switch (h) {
    case 4: return (vec)_mm512_shuffle_f64x2((__m512d)x, (__m512d)x, 0x4E);
    case 2: return (vec)_mm512_shuffle_f64x2((__m512d)x, (__m512d)x, 0xB1);
    default: return (vec)_mm512_permute_pd((__m512d)x, 0x55);
    }
#elif defined(RA_X86) && VEC_BYTES == 32 && RA_IS_F32
    switch (h) {
    case 4: return (vec)_mm256_permute2f128_ps((__m256)x, (__m256)x, 0x01);
    case 2: return (vec)_mm256_permute_ps((__m256)x, 0x4E);
    default: return (vec)_mm256_permute_ps((__m256)x, 0xB1);
    }
#elif defined(RA_X86) && VEC_BYTES == 32
    switch (h) {
    case 2: return (vec)_mm256_permute2f128_pd((__m256d)x, (__m256d)x, 0x01);
    default: return (vec)_mm256_permute_pd((__m256d)x, 0x5);
    }
#else
    T a[VL], b[VL];
    memcpy(a, &x, sizeof x);
    for (int l = 0; l < VL; l++) b[l] = a[l ^ h];
    memcpy(&x, b, sizeof x);
    return x;
#endif
}

/* Tree reductions for the softmax rows: lane l combined with lane l ^ h for h = VL/2,
 * ..., 1, so a row's reduction waits log2(VL) operations, not a chain of VL − 1.  The
 * order is fixed, so are the bits; hsum / hmax above keep their lane order for callers
 * whose sums feed discrete decisions (normalised rows). */
static inline T FN(hsum_tree)(vec x)
{
    #pragma GCC unroll 8
    for (int h = VL / 2; h >= 1; h /= 2) x += FN(swap_lanes)(x, h);
    return x[0];
}

static inline T FN(hmax_tree)(vec x)
{
    #pragma GCC unroll 8
    for (int h = VL / 2; h >= 1; h /= 2) x = FN(vmax_skip_nan)(FN(swap_lanes)(x, h), x);
    return x[0];
}

#include "kernels_exp_body.h"

/* ------------------------------------------------------------------ gemm */
/* Micro-tile: C[0:mr, 0:nv·VL] (+)= A[0:mr, 0:K] · B[0:K, 0:nv·VL], where A[r, k] sits at
 * A[r·a_rs + k·a_ks] (so A may be stored transposed).  mr, nv are compile-time constants
 * at every call site, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void
FN(gemm_micro)(const int mr, const int nv, int K, const T *A, ptrdiff_t a_rs, ptrdiff_t a_ks,
               const T *B, ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate)
{
    vec acc[GEMM_MR][GEMM_NV];
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nv; c++)
            acc[r][c] = accumulate ? FN(vload)(C + r * ldc + c * VL) : FN(vsplat)(0);
    for (int k = 0; k < K; k++) {
        vec b[GEMM_NV];
        for (int c = 0; c < nv; c++) b[c] = FN(vload)(B + k * ldb + c * VL);
        for (int r = 0; r < mr; r++) {
            const T a = A[r * a_rs + k * a_ks];
            for (int c = 0; c < nv; c++) acc[r][c] += b[c] * a;
        }
    }
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < nv; c++) FN(vstore)(C + r * ldc + c * VL, acc[r][c]);
}

/* Rows in panels of GEMM_MR (the remainder as one smaller micro-tile). */
static inline __attribute__((always_inline)) void
FN(gemm_rows)(const int nv, int M, int K, const T *A, ptrdiff_t a_rs, ptrdiff_t a_ks,
              const T *B, ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate, RaHints *hints)
{
    int i = 0;
    for (; i + GEMM_MR <= M; i += GEMM_MR) {
        FN(gemm_micro)(GEMM_MR, nv, K, A + i * a_rs, a_rs, a_ks, B, ldb, C + i * ldc, ldc,
                       accumulate);
        ra_hints_after(hints, (double)GEMM_MR * nv * VL * K);
    }
    A += i * a_rs;
    C += i * ldc;
    switch (M - i) {
#define RA_REMAINDER_ROWS(r) \
    case r: if (r < GEMM_MR) FN(gemm_micro)(r < GEMM_MR ? r : 1, nv, K, A, a_rs, a_ks, B, ldb, \
                                            C, ldc, accumulate); break;
    RA_REMAINDER_ROWS(1) RA_REMAINDER_ROWS(2) RA_REMAINDER_ROWS(3)
    RA_REMAINDER_ROWS(4) RA_REMAINDER_ROWS(5) RA_REMAINDER_ROWS(6) RA_REMAINDER_ROWS(7)
#undef RA_REMAINDER_ROWS
    default: break;
    }
    ra_hints_after(hints, (double)(M - i) * nv * VL * K);   /* the remainder rows' share */
}

/* The last w < VL columns of C (M×w) (+)= op(A) · B (K×w): their B and C columns copied
 * into whole vectors, rows and depth in blocks so the copies stay small.  Each lane sees
 * the operations of a full vector's lane in the same order (the partial sums only pass
 * through memory), so a column's result does not depend on whether it is left over.  The
 * lanes from w on repeat column 0, so they raise no floating-point flag it does not. */
static void FN(gemm_tail)(int M, int w, int K, const T *A, ptrdiff_t a_rs, ptrdiff_t a_ks,
                          const T *B, ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate)
{
    enum { MB = 64, KB = 64 };
    T bt[KB * VL], ct[MB * VL];
    for (int i0 = 0; i0 < M; i0 += MB) {
        const int mb = M - i0 < MB ? M - i0 : MB;
        for (int i = 0; i < mb; i++)
            for (int l = 0; l < VL; l++)
                ct[i * VL + l] = accumulate ? C[(ptrdiff_t)(i0 + i) * ldc + (l < w ? l : 0)] : 0;
        for (int k0 = 0; k0 < K; k0 += KB) {
            const int kb = K - k0 < KB ? K - k0 : KB;
            for (int k = 0; k < kb; k++)
                for (int l = 0; l < VL; l++) bt[k * VL + l] = B[(ptrdiff_t)(k0 + k) * ldb + (l < w ? l : 0)];
            FN(gemm_rows)(1, mb, kb, A + i0 * a_rs + k0 * a_ks, a_rs, a_ks, bt, VL, ct, VL, 1,
                          NULL);
        }
        for (int i = 0; i < mb; i++)
            for (int l = 0; l < w; l++) C[(ptrdiff_t)(i0 + i) * ldc + l] = ct[i * VL + l];
    }
}

/* C (M×N) (+)= op(A) · B, op(A)[r, k] = A[r·a_rs + k·a_ks]; hints: see gemm_hinting. */
static inline __attribute__((always_inline)) void
FN(gemm_strided)(int M, int N, int K, const T *A, ptrdiff_t a_rs, ptrdiff_t a_ks, const T *B,
                 ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate, RaHints *hints)
{
#define RA_GEMM_PANEL(nv) \
    FN(gemm_rows)(nv, M, K, A, a_rs, a_ks, B + j, ldb, C + j, ldc, accumulate, hints)
    int j = 0;
    for (; j + GEMM_NV * VL <= N; j += GEMM_NV * VL) RA_GEMM_PANEL(GEMM_NV);
    /* whole vectors left: one panel as wide as they allow (every lane sees the same
       operations whatever the panel's width, so the result does not depend on it) */
    if (GEMM_NV > 3 && j + 3 * VL <= N) { RA_GEMM_PANEL(GEMM_NV > 3 ? 3 : 1); j += 3 * VL; }
    else if (GEMM_NV > 2 && j + 2 * VL <= N) { RA_GEMM_PANEL(GEMM_NV > 2 ? 2 : 1); j += 2 * VL; }
    for (; j + VL <= N; j += VL) RA_GEMM_PANEL(1);
#undef RA_GEMM_PANEL
    if (j < N) FN(gemm_tail)(M, N - j, K, A, a_rs, a_ks, B + j, ldb, C + j, ldc, accumulate);
}

static void FN(gemm)(int M, int N, int K, const T *A, ptrdiff_t lda, const T *B,
                     ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate)
{
    FN(gemm_strided)(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate, NULL);
}

static void FN(gemm_hinting)(int M, int N, int K, const T *A, ptrdiff_t lda, const T *B,
                             ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate, RaHints *hints)
{
    FN(gemm_strided)(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate, hints);
}

static void FN(gemm_tn)(int M, int N, int K, const T *A, ptrdiff_t lda, const T *B,
                        ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate)
{
    FN(gemm_strided)(M, N, K, A, 1, lda, B, ldb, C, ldc, accumulate, NULL);
}

/* ------------------------------------------------------------------ softmax pieces */
/* The maximum of s[0 .. bk) (-inf for none), NaN entries skipped (they poison the row sum
 * instead; the comparison raises the FP invalid flag for them, which NumPy reports as a
 * RuntimeWarning — a quiet compare costs ~5% of the forward). */
static inline T FN(row_max)(const T *s, int bk)
{
    enum { U = 4 };                  /* independent accumulators */
    const int bkv = bk / VL * VL, bku = bk / (U * VL) * (U * VL);
    vec vm[U];
    for (int u = 0; u < U; u++) vm[u] = FN(vsplat)(-INFINITY);
    for (int j = 0; j < bku; j += U * VL)
        #pragma GCC unroll 4
        for (int u = 0; u < U; u++) vm[u] = FN(vmax_skip_nan)(FN(vload)(s + j + u * VL), vm[u]);
    for (int j = bku; j < bkv; j += VL) vm[0] = FN(vmax_skip_nan)(FN(vload)(s + j), vm[0]);
    T m = FN(hmax_tree)(FN(vmax_skip_nan)(FN(vmax_skip_nan)(vm[0], vm[1]),
                                          FN(vmax_skip_nan)(vm[2], vm[3])));
    for (int j = bkv; j < bk; j++) m = s[j] > m ? s[j] : m;
    return m;
}

static void FN(softmax_step)(int bq, int bk, T *S, ptrdiff_t lds, T *mx, T *sum, T *acc,
                             int e, ptrdiff_t ldacc)
{
    /* U independent accumulators per row sum; the maxima of ROWS rows at a time first, so
       that their reductions overlap instead of each row's exponentials waiting on its own
       (the routing forward ~1 % faster, the same bits) */
    enum { U = 4, ROWS = 32 };
    const int bkv = bk / VL * VL, bku = bk / (U * VL) * (U * VL);
    T maxima[ROWS];
    for (int i = 0; i < bq; i++) {
        if (i % ROWS == 0)                          /* 1. row maxima */
            for (int r = i; r < bq && r < i + ROWS; r++)
                maxima[r - i] = FN(row_max)(S + r * lds, bk);
        T *s = S + i * lds;
        const T m = maxima[i % ROWS];
        T m_new = mx[i] > m ? mx[i] : m;
        if (mx[i] != mx[i]) m_new = mx[i];    /* a row already NaN stays NaN */
        if (m_new == -INFINITY) {
            /* nothing visible so far: p = 0, unless a NaN logit must make the row NaN */
            int has_nan = 0;
            for (int j = 0; j < bk; j++) has_nan |= s[j] != s[j];
            for (int j = 0; j < bk; j++) s[j] = has_nan ? (T)NAN : 0;
            if (has_nan) { mx[i] = NAN; sum[i] = NAN; }
            continue;
        }
        /* 2. p = exp(s - m_new) and its row sum (U partial sums, added in a fixed order) */
        vec vs[U];
        for (int u = 0; u < U; u++) vs[u] = FN(vsplat)(0);
        for (int j = 0; j < bku; j += U * VL)
            #pragma GCC unroll 4
            for (int u = 0; u < U; u++) {
                const vec p = FN(vexp)(FN(vload)(s + j + u * VL) - m_new);
                FN(vstore)(s + j + u * VL, p);
                vs[u] += p;
            }
        for (int j = bku; j < bkv; j += VL) {
            const vec p = FN(vexp)(FN(vload)(s + j) - m_new);
            FN(vstore)(s + j, p);
            vs[0] += p;
        }
        T rowsum = FN(hsum_tree)((vs[0] + vs[1]) + (vs[2] + vs[3]));
        for (int j = bkv; j < bk; j++) {
            s[j] = FN(sexp)(s[j] - m_new);
            rowsum += s[j];
        }
        /* 3. rescale the running sum and accumulator to the new maximum.  Shortcuts with
              the same results: an unchanged maximum has exp(0) = 1 exactly (a maximum
              of +inf, where exp(inf - inf) was NaN, leaves the row NaN through its sum
              either way); a row's first visible key (mx was -inf) has sum 0 and acc 0
              (or NaN, which · 0 keeps) */
        if (mx[i] == -INFINITY) {
            sum[i] = rowsum;
            mx[i] = m_new;
            continue;
        }
        const T alpha = mx[i] == m_new ? 1 : FN(sexp)(mx[i] - m_new);
        sum[i] = sum[i] * alpha + rowsum;
        mx[i] = m_new;
        if (alpha != 1) {
            T *a = acc + i * ldacc;
            for (int c = 0; c < e; c++) a[c] *= alpha;
        }
    }
}

static void FN(exp_shift)(int bq, int bk, T *S, ptrdiff_t lds, const T *lse)
{
    const int bkv = bk / VL * VL;
    for (int i = 0; i < bq; i++) {
        T *s = S + i * lds;
        const T l = lse[i];
        if (l == -INFINITY) {
            for (int j = 0; j < bk; j++) s[j] = 0;
            continue;
        }
        for (int j = 0; j < bkv; j += VL) FN(vstore)(s + j, FN(vexp)(FN(vload)(s + j) - l));
        for (int j = bkv; j < bk; j++) s[j] = FN(sexp)(s[j] - l);
    }
}

static void FN(mask_tile)(int bq, int bk, T *S, ptrdiff_t lds, const int64_t *qpos,
                          const int64_t *kpos, int causal, int exclude_self)
{
    const int64_t c = causal ? 1 : 0, x = exclude_self ? 1 : 0;
    for (int i = 0; i < bq; i++) {
        const int64_t qi = qpos[i];
        T *s = S + i * lds;
        for (int j = 0; j < bk; j++) {   /* branch-free so it vectorises */
            const int64_t kj = kpos[j];
            const int64_t hidden = (kj < 0) | ((kj > qi) & c) | ((kj == qi) & x);
            s[j] = hidden ? (T)-INFINITY : s[j];
        }
    }
}

static void FN(bias_tile)(int bq, int bk, T *S, ptrdiff_t lds, const int64_t *qpos,
                          const int64_t *kpos, const T *bias)
{
    if (bk > 0 && ra_positions_run(kpos, bk)) {      /* consecutive keys: contiguous bias rows */
        for (int i = 0; i < bq; i++) {
            const T *b = bias + (kpos[0] - qpos[i]);
            T *s = S + i * lds;
            for (int j = 0; j < bk; j++) s[j] += b[j];
        }
        return;
    }
    for (int i = 0; i < bq; i++) {
        const int64_t qi = qpos[i];
        T *s = S + i * lds;
        for (int j = 0; j < bk; j++) {   /* padding reads offset 0 and adds nothing */
            const int64_t kj = kpos[j];
            const T b = bias[(kj >= 0 ? kj : qi) - qi];
            s[j] += kj >= 0 ? b : 0;
        }
    }
}

static void FN(dropout_tile)(int bq, int bk, T *S, ptrdiff_t lds, const int64_t *qpos,
                             const int64_t *kpos, uint64_t key, uint32_t drop, T keep)
{
    for (int i = 0; i < bq; i++) {
        const int64_t qi = qpos[i];
        T *s = S + i * lds;
        for (int j = 0; j < bk; j++)     /* branch-free so it vectorises */
            s[j] = ra_pair_bits(key, qi, kpos[j]) >= drop ? s[j] * keep : 0;
    }
}

/* Transpose the VL×VL block x in registers: afterwards x[i][l] is the old x[l][i].
 * Stage h exchanges, between rows r and r + h (bit h of r clear), the lanes whose bit h
 * differs from the row's: log2(VL) stages of two-input shuffles.  AVX2 spells the same
 * exchange in its own shuffles: GCC 12 builds the generic form's masks at run time for
 * 256-bit vectors (vpinsrd, vpermps, vblendvps), which made the routing forward's key
 * transposes 14 % of its time on a Zen 3. */
static inline void FN(transpose_block)(vec x[VL])
{
#if defined(RA_X86) && VEC_BYTES == 32 && RA_IS_F32
    /* rows interleaved in pairs, then pairs of pairs, then the 128-bit halves swapped */
    __m256 t[8], u[8];
    for (int r = 0; r < 8; r += 2) {
        t[r] = _mm256_unpacklo_ps((__m256)x[r], (__m256)x[r + 1]);
        t[r + 1] = _mm256_unpackhi_ps((__m256)x[r], (__m256)x[r + 1]);
    }
    for (int r = 0; r < 8; r += 4) {
        u[r] = _mm256_shuffle_ps(t[r], t[r + 2], 0x44);
        u[r + 1] = _mm256_shuffle_ps(t[r], t[r + 2], 0xEE);
        u[r + 2] = _mm256_shuffle_ps(t[r + 1], t[r + 3], 0x44);
        u[r + 3] = _mm256_shuffle_ps(t[r + 1], t[r + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        x[c] = (vec)_mm256_permute2f128_ps(u[c], u[c + 4], 0x20);
        x[c + 4] = (vec)_mm256_permute2f128_ps(u[c], u[c + 4], 0x31);
    }
#elif defined(RA_X86) && VEC_BYTES == 32
    const __m256d t0 = _mm256_unpacklo_pd((__m256d)x[0], (__m256d)x[1]);
    const __m256d t1 = _mm256_unpackhi_pd((__m256d)x[0], (__m256d)x[1]);
    const __m256d t2 = _mm256_unpacklo_pd((__m256d)x[2], (__m256d)x[3]);
    const __m256d t3 = _mm256_unpackhi_pd((__m256d)x[2], (__m256d)x[3]);
    x[0] = (vec)_mm256_permute2f128_pd(t0, t2, 0x20);
    x[1] = (vec)_mm256_permute2f128_pd(t1, t3, 0x20);
    x[2] = (vec)_mm256_permute2f128_pd(t0, t2, 0x31);
    x[3] = (vec)_mm256_permute2f128_pd(t1, t3, 0x31);
#else
    #pragma GCC unroll 8
    for (int h = VL / 2; h >= 1; h /= 2) {
        uvec lo, hi;
        #pragma GCC unroll 16
        for (int l = 0; l < VL; l++) {
            lo[l] = (UT)((l & h) ? VL + l - h : l);   /* row r keeps its lanes with bit h clear */
            hi[l] = (UT)((l & h) ? VL + l : l + h);   /* row r + h keeps those with it set */
        }
        #pragma GCC unroll 16
        for (int r = 0; r < VL; r++) {
            if (r & h) continue;
            const vec a = x[r], b = x[r + h];
            x[r] = RA_SHUFFLE2(a, b, lo);
            x[r + h] = RA_SHUFFLE2(a, b, hi);
        }
    }
#endif
}

/* dst (cols, rows) with leading dimension ld: dst[c, r] = mul · src[off[r] + c], by whole
 * VL×VL blocks loaded as rows and transposed in registers, for rows anywhere in memory
 * (measured on the routing forward's scattered key rows: faster than vector gathers,
 * and than copying the rows first and transposing the copy). */
static void FN(gather_t)(int rows, int cols, const T *src, const int64_t *off, T mul,
                         T *restrict dst, ptrdiff_t ld)
{
    const int rv = rows / VL * VL, cv = cols / VL * VL;
    const vec m = FN(vsplat)(mul);
    for (int r0 = 0; r0 < rv; r0 += VL) {
        /* the next block's rows asked for (into L2: prefetcht2) while this one is
           transposed; a block reads one line of each of its rows per column step, a
           pattern the hardware prefetchers follow poorly (measured: the clustered
           centroid pass, which transposes every key once, 3-4 % faster) */
        for (int i = 0; r0 + VL + i < rows && i < VL; i++)
            for (int c = 0; c < cols; c += 64 / (int)sizeof(T))
                __builtin_prefetch(src + off[r0 + VL + i] + c, 0, 1);
        for (int c0 = 0; c0 < cv; c0 += VL) {
            vec x[VL];
            #pragma GCC unroll 16
            for (int i = 0; i < VL; i++) x[i] = FN(vload)(src + off[r0 + i] + c0) * m;
            FN(transpose_block)(x);
            #pragma GCC unroll 16
            for (int i = 0; i < VL; i++) FN(vstore)(dst + (c0 + i) * ld + r0, x[i]);
        }
    }
    for (int c = 0; c < cols; c++) {               /* the edges: rows ≥ rv or columns ≥ cv */
        T *o = dst + c * ld;
        for (int r = c < cv ? rv : 0; r < rows; r++) o[r] = src[off[r] + c] * mul;
    }
}

static void FN(softmax_grad)(int bq, int bk, const T *P, T *dP, ptrdiff_t ld, const T *delta,
                             T scale)
{
    const int bkv = bk / VL * VL;
    for (int i = 0; i < bq; i++) {
        const T *p = P + i * ld;
        T *g = dP + i * ld;
        const T di = delta[i];
        for (int j = 0; j < bkv; j += VL)
            FN(vstore)(g + j, FN(vload)(p + j) * (FN(vload)(g + j) - di) * scale);
        for (int j = bkv; j < bk; j++) g[j] = p[j] * (g[j] - di) * scale;
    }
}

#include "kernels_select_body.h"
#include "kernels_kmeans_body.h"

/* ------------------------------------------------------------------ row normalisation */
static void FN(normalize_row)(const T *x, int d, T *out, T *norm, T *sq)
{
    const int dv = d / VL * VL;
    vec acc = FN(vsplat)(0);
    for (int j = 0; j < dv; j += VL) {
        const vec v = FN(vload)(x + j);
        acc += v * v;
    }
    T s = FN(hsum)(acc);
    for (int j = dv; j < d; j++) s += x[j] * x[j];
    const T nrm = (T)sqrt((double)s);
    const T div = nrm > 0 ? nrm : 1;
    const vec dvec = FN(vsplat)(div);
    vec acc2 = FN(vsplat)(0);
    for (int j = 0; j < dv; j += VL) {
        const vec o = FN(vload)(x + j) / dvec;
        FN(vstore)(out + j, o);
        acc2 += o * o;
    }
    T s2 = FN(hsum)(acc2);
    for (int j = dv; j < d; j++) {
        out[j] = x[j] / div;
        s2 += out[j] * out[j];
    }
    *norm = nrm;
    *sq = s2;
}

#if RA_IS_F32
static double FN(fma_probe)(long iters, float *checksum)
{
    vec a[12];
    const vec mul = FN(vsplat)(0.999999f), add = FN(vsplat)(1e-7f);
    for (int c = 0; c < 12; c++) a[c] = FN(vsplat)(1.0f + c);
    for (long it = 0; it < iters; it++)
        for (int c = 0; c < 12; c++) a[c] = a[c] * mul + add;
    vec s = FN(vsplat)(0);
    for (int c = 0; c < 12; c++) s += a[c];
    *checksum = FN(hsum)(s);
    return 2.0 * 12 * VL * (double)iters;
}
#endif

#undef vec
#undef uvec
#undef VL
