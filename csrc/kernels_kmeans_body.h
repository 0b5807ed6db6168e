/* kernels_kmeans_body.h — spherical k-means' kernels: the column argmax of its Lloyd
 * assign and the k-means++ seeding's candidate potentials.
 * Included by kernels_body.h after kernels_select_body.h (once per type, with its macros
 * and FN(svec)). */

/* ------------------------------------------------------------------ column argmax */
/* One row of argmax_cols' scan: where x > m (quiet: a NaN lane is not larger and raises no
 * flag; m is never NaN), m takes x and a takes row.  On AVX-512 one masked compare and two
 * masked moves, on AVX2 a quiet compare and two blends; elsewhere the NaN lanes are
 * replaced by m before the ordered compare. */
static inline void FN(argmax_step)(vec x, vec *m, FN(svec) *a, FN(svec) row)
{
#if defined(RA_X86) && VEC_BYTES == 64 && RA_IS_F32
    const __mmask16 up = _mm512_cmp_ps_mask((__m512)x, (__m512)*m, _CMP_GT_OQ);
    *m = (vec)_mm512_mask_mov_ps((__m512)*m, up, (__m512)x);
    *a = (FN(svec))_mm512_mask_mov_epi32((__m512i)*a, up, (__m512i)row);
#elif defined(RA_X86) && VEC_BYTES == 64
    const __mmask8 up = _mm512_cmp_pd_mask((__m512d)x, (__m512d)*m, _CMP_GT_OQ);
    *m = (vec)_mm512_mask_mov_pd((__m512d)*m, up, (__m512d)x);
    *a = (FN(svec))_mm512_mask_mov_epi64((__m512i)*a, up, (__m512i)row);
#elif defined(RA_X86) && VEC_BYTES == 32 && RA_IS_F32
    const __m256 up = _mm256_cmp_ps((__m256)x, (__m256)*m, _CMP_GT_OQ);
    *m = (vec)_mm256_blendv_ps((__m256)*m, (__m256)x, up);
    *a = (FN(svec))_mm256_blendv_ps((__m256)*a, (__m256)row, up);
#elif defined(RA_X86) && VEC_BYTES == 32
    const __m256d up = _mm256_cmp_pd((__m256d)x, (__m256d)*m, _CMP_GT_OQ);
    *m = (vec)_mm256_blendv_pd((__m256d)*m, (__m256d)x, up);
    *a = (FN(svec))_mm256_blendv_pd((__m256d)*a, (__m256d)row, up);
#else
    x = FN(vsel)((uvec)(x == x), x, *m);
    const uvec up = (uvec)(x > *m);
    *m = FN(vsel)(up, x, *m);
    *a = (FN(svec))((up & (uvec)row) | (~up & (uvec)*a));
#endif
}

/* See RaKernels.argmax_cols.  nv register blocks of VL columns (nv = 4, then 1) scanned
 * down the rows together, each with its running maximum and row (an integer of T's width
 * beside the value) in registers: independent chains, and no horizontal reduction per
 * row as in argmax_rows.  A column whose maximum never rose above -inf (all -inf or
 * NaN) is finished by a scalar scan: its first non-NaN row, else -1. */
static inline __attribute__((always_inline)) void
FN(argmax_cols_block)(int nv, int c, const T *S, ptrdiff_t lds, int64_t *lab, T *best)
{
    vec m[4];
    FN(svec) a[4];
    for (int u = 0; u < nv; u++) {
        m[u] = FN(vsplat)(-INFINITY);
        a[u] = (FN(svec)){0} - 1;
    }
    for (int j = 0; j < c; j++) {
        const FN(svec) row = (FN(svec)){0} + j;
        for (int u = 0; u < nv; u++)
            FN(argmax_step)(FN(vload)(S + (ptrdiff_t)j * lds + u * VL), &m[u], &a[u], row);
    }
    for (int u = 0; u < nv; u++) {
        T mv[VL];
        IT av[VL];
        memcpy(mv, &m[u], sizeof mv);
        memcpy(av, &a[u], sizeof av);
        for (int l = 0; l < VL; l++) {
            const int i = u * VL + l;
            int64_t first = av[l];
            for (int j = 0; first < 0 && j < c; j++)
                if (S[(ptrdiff_t)j * lds + i] == S[(ptrdiff_t)j * lds + i]) first = j;
            lab[i] = first;
            best[i] = first >= 0 ? mv[l] : (T)NAN;
        }
    }
}

static void FN(argmax_cols)(int c, int cols, const T *S, ptrdiff_t lds, int64_t *lab, T *best)
{
    int i = 0;
    for (; i + 4 * VL <= cols; i += 4 * VL)
        FN(argmax_cols_block)(4, c, S + i, lds, lab + i, best + i);
    for (; i + VL <= cols; i += VL) FN(argmax_cols_block)(1, c, S + i, lds, lab + i, best + i);
    for (; i < cols; i++) {
        int64_t first = -1;
        T m = (T)NAN;
        for (int j = 0; j < c; j++) {
            const T x = S[(ptrdiff_t)j * lds + i];
            if (x == x && (first < 0 || x > m)) { m = x; first = j; }
        }
        lab[i] = first;
        best[i] = m;
    }
}

/* ------------------------------------------------------------------ k-means++ potentials */
/* See RaKernels.seed_potential.  Eight rows at a time in 8-lane vectors (one or more
 * registers per instruction set; a short last group padded with invalid rows), each
 * lane's square computed and then kept or not, so the partial sums are independent
 * chains — a running sum per candidate made the seeding's potential pass a chain of
 * dependent scalar adds — and every table computes the same bits. */
static void FN(seed_potential)(int rows, int L, const T *cos, ptrdiff_t ldc, const T *best,
                               const uint8_t *valid, double *s)
{
    typedef T t8 __attribute__((vector_size(8 * sizeof(T))));
    typedef UT u8t __attribute__((vector_size(8 * sizeof(T))));   /* T's lanes as bits */
    typedef double d8 __attribute__((vector_size(64)));
    typedef int64_t i8 __attribute__((vector_size(64)));
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const i8 byte_shift = {0, 8, 16, 24, 32, 40, 48, 56};     /* row l's flag in the word */
#else
    const i8 byte_shift = {56, 48, 40, 32, 24, 16, 8, 0};
#endif
    /* a short last group, padded with invalid rows */
    const int whole = rows / 8 * 8, left = rows - whole;
    T tail_best[8] = {0};
    uint8_t tail_valid[8] = {0};
    memcpy(tail_best, best + whole, sizeof(T) * (size_t)left);
    memcpy(tail_valid, valid + whole, (size_t)left);
    for (int t = 0; t < L; t++) {
        const T *c = cos + (ptrdiff_t)t * ldc;
        T tail_cos[8] = {0};
        memcpy(tail_cos, c + whole, sizeof(T) * (size_t)left);
        d8 part = {0};
        for (int r = 0; r < rows; r += 8) {
            const int in_tail = r == whole;
            t8 cv, bv;
            uint64_t vb;
            memcpy(&cv, in_tail ? tail_cos : c + r, sizeof cv);
            memcpy(&bv, in_tail ? tail_best : best + r, sizeof bv);
            memcpy(&vb, in_tail ? tail_valid : valid + r, sizeof vb);   /* a byte a row */
            const u8t larger = (u8t)(cv > bv);           /* a NaN on either side: best */
            const t8 x = (t8)(((u8t)cv & larger) | ((u8t)bv & ~larger));
            const d8 w = 1.0 - __builtin_convertvector(x, d8), sq = w * w;
            const i8 flag = (((i8){0} + (int64_t)vb) >> byte_shift) & 0xff;
            const i8 keep = (flag != 0) & (w > 0);
            part += (d8)((i8)sq & keep);     /* kept by a mask: never fused into an FMA */
        }
        double p[8];
        memcpy(p, &part, sizeof p);
        s[t] += ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
    }
}
