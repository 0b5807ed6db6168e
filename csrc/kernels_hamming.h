/* kernels_hamming.h — Hamming-distance kernels for one instruction set and one code-word
 * type, compiled through typed.h in word mode (W = uint64_t, uint32_t) by kernels_isa.h,
 * and once more by kernels_avx512.c for the VPOPCNTQ variant, with these macros defined:
 *   RA_POPCOUNT    popcount of one uint64_t;  RA_POPCOUNT32: of one uint32_t (WPOP)
 *   VEC_BYTES      the vector width; RA_HAMMING_VPOPCNT when the target has VPOPCNTDQ
 * naming the kernels hamming_<kernel><64|32>_<isa>.  Rows go through in vectors of W-bit
 * lanes (16 lanes of 32-bit words in 512 bits): the lane popcount is the VPOPCNT
 * instruction where the CPU has it, else a nibble-table lookup per byte (AVX2,
 * AVX-512BW), else the compiler's popcount per lane where RA_HAMMING_BUILTIN is set
 * (NEON), else (baseline) the SWAR bit count in vector arithmetic; leftover rows take the
 * scalar popcount.  hamming_kmeans' Lloyd assign (up to RA_SLICE_MAX_C centroids) runs on
 * bit planes instead: the last section. */

#ifndef RA_HAMMING_ROWS
#define RA_HAMMING_ROWS 64   /* rows per block of hamming_assign, a multiple of any lane count */
#endif

typedef W FN(ra_hvec) __attribute__((vector_size(VEC_BYTES), aligned(sizeof(W))));
#define hvec FN(ra_hvec)
#define HL ((int)(VEC_BYTES / sizeof(W)))           /* lanes */

/* Lane-wise popcount. */
static inline hvec FN(hamming_popv)(hvec x)
{
#ifdef RA_HAMMING_VPOPCNT
    return sizeof(W) == 8 ? (hvec)_mm512_popcnt_epi64((__m512i)x)
                          : (hvec)_mm512_popcnt_epi32((__m512i)x);
#elif VEC_BYTES == 64
    /* AVX-512BW: a 16-entry table of nibble counts looked up per byte (vpshufb), then the
       bytes of each lane summed: vpsadbw for 64-bit lanes, two multiply-adds for 32-bit */
    const __m512i lut = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
    const __m512i nib = _mm512_set1_epi8(0x0f), v = (__m512i)x;
    const __m512i cnt = _mm512_add_epi8(
        _mm512_shuffle_epi8(lut, _mm512_and_si512(v, nib)),
        _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib)));
    if (sizeof(W) == 8) return (hvec)_mm512_sad_epu8(cnt, _mm512_setzero_si512());
    return (hvec)_mm512_madd_epi16(_mm512_maddubs_epi16(cnt, _mm512_set1_epi8(1)),
                                   _mm512_set1_epi16(1));
#elif VEC_BYTES == 32
    /* AVX2: the same nibble table, 32 bytes at a time */
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i nib = _mm256_set1_epi8(0x0f), v = (__m256i)x;
    const __m256i cnt = _mm256_add_epi8(
        _mm256_shuffle_epi8(lut, _mm256_and_si256(v, nib)),
        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib)));
    if (sizeof(W) == 8) return (hvec)_mm256_sad_epu8(cnt, _mm256_setzero_si256());
    return (hvec)_mm256_madd_epi16(_mm256_maddubs_epi16(cnt, _mm256_set1_epi8(1)),
                                   _mm256_set1_epi16(1));
#elif defined(RA_HAMMING_BUILTIN)
    /* the compiler's popcount per lane (AArch64: the NEON CNT instruction) */
    for (int l = 0; l < HL; l++) x[l] = (W)WPOP(x[l]);
    return x;
#else
    const hvec m1 = (hvec){0} + (W)0x5555555555555555ull, m2 = (hvec){0} + (W)0x3333333333333333ull;
    const hvec m4 = (hvec){0} + (W)0x0f0f0f0f0f0f0f0full;
    x = x - ((x >> 1) & m1);
    x = (x & m2) + ((x >> 2) & m2);
    x = (x + (x >> 4)) & m4;                 /* a count per byte */
    x = x + (x >> 8);
    x = x + (x >> 16);
    if (sizeof(W) == 8) x = x + (x >> (4 * sizeof(W)));
    return x & 0x7f;
#endif
}

static inline hvec FN(hamming_loadv)(const W *p) { return *(const hvec *)p; }

/* Lane-wise unsigned minimum: one instruction where the target has it. */
static inline hvec FN(hamming_minv)(hvec a, hvec b)
{
#if VEC_BYTES == 64
    return sizeof(W) == 8 ? (hvec)_mm512_min_epu64((__m512i)a, (__m512i)b)
                          : (hvec)_mm512_min_epu32((__m512i)a, (__m512i)b);
#else
#if VEC_BYTES == 32
    if (sizeof(W) == 4) return (hvec)_mm256_min_epu32((__m256i)a, (__m256i)b);
#endif
    const hvec lt = (hvec)(a < b);
    return (a & lt) | (b & ~lt);
#endif
}

/* 64-bit words, narrowed: the low 32-bit halves of two vectors' lanes (a distance each)
 * as one vector of 32-bit lanes, a's lanes first. */
typedef uint32_t FN(ra_hkvec) __attribute__((vector_size(VEC_BYTES), aligned(4)));
#define hkvec FN(ra_hkvec)
static inline hkvec FN(hamming_narrow)(hvec a, hvec b)
{
#if VEC_BYTES == 64
    return __builtin_shufflevector((hkvec)a, (hkvec)b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,
                                   24, 26, 28, 30);
#elif VEC_BYTES == 32
    return __builtin_shufflevector((hkvec)a, (hkvec)b, 0, 2, 4, 6, 8, 10, 12, 14);
#else
    return __builtin_shufflevector((hkvec)a, (hkvec)b, 0, 2, 4, 6);
#endif
}

static inline hkvec FN(hamming_minkv)(hkvec a, hkvec b)
{
#if VEC_BYTES == 64
    return (hkvec)_mm512_min_epu32((__m512i)a, (__m512i)b);
#elif VEC_BYTES == 32
    return (hkvec)_mm256_min_epu32((__m256i)a, (__m256i)b);
#else
    const hkvec lt = (hkvec)(a < b);
    return (a & lt) | (b & ~lt);
#endif
}

/* The narrowed assignment's packed key (dist << S) | j of 32-bit lanes (j < 2^S) from dist
 * and the centroid's RA_HKEY_J(j, S): with VBMI2 one VPSHLDD shifts and merges (it takes j
 * pre-shifted to the top, j << (32 - S)); without, a shift and an or.  (Measured: 7 %
 * off a 63-bit Lloyd run; the 32-bit assignment's shift and or measured faster.) */
#ifdef RA_HAMMING_VBMI2
#define RA_HKEY_J(j, S) ((uint32_t)(j) << (32 - (S)))
#define RA_HKEY32(dist, jk, S) ((hkvec)_mm512_shldi_epi32((__m512i)(dist), (__m512i)(jk), (S)))
#else
#define RA_HKEY_J(j, S) ((uint32_t)(j))
#define RA_HKEY32(dist, jk, S) (((hkvec)(dist) << (S)) | (hkvec)(jk))
#endif

/* Labels of rows [b0, b0 + 2·HL·pairs) of 64-bit codes into label[], keys of 32 bits (c <=
 * 2^RA_HAMMING_KEY_BITS64N): two vectors' distances narrowed into one vector, so the
 * selection costs what it costs for 32-bit codes. */
static void FN(hamming_assign_narrow)(const W *code, int pairs, const W *cent, int c,
                                      int64_t *label)
{
    enum { KL = 2 * HL };                    /* 32-bit lanes per vector */
    hkvec best[RA_HAMMING_ROWS / KL];
    hvec x[RA_HAMMING_ROWS / HL];
    for (int t = 0; t < pairs; t++) {
        x[2 * t] = FN(hamming_loadv)(code + 2 * t * HL);
        x[2 * t + 1] = FN(hamming_loadv)(code + (2 * t + 1) * HL);
        best[t] = (hkvec){0} + ~0u;
    }
    for (int j = 0; j < c; j++) {
        const hvec cj = (hvec){0} + cent[j];
        const hkvec jv = (hkvec){0} + RA_HKEY_J(j, RA_HAMMING_KEY_BITS64N);
        for (int t = 0; t < pairs; t++) {
            const hkvec dist = FN(hamming_narrow)(FN(hamming_popv)(x[2 * t] ^ cj),
                                                  FN(hamming_popv)(x[2 * t + 1] ^ cj));
            best[t] = FN(hamming_minkv)(best[t], RA_HKEY32(dist, jv, RA_HAMMING_KEY_BITS64N));
        }
    }
    for (int r = 0; r < pairs * KL; r++)
        label[r] = (int64_t)(best[r / KL][r % KL] & ((1u << RA_HAMMING_KEY_BITS64N) - 1));
}

/* hamming_assign's packed lane key dist · 2^RA_HKEY_SHIFT + j: the smallest key is the
 * nearest centroid, ties to the lowest j (a distance needs 6 / 7 bits). */
#define RA_HKEY_SHIFT (sizeof(W) == 8 ? 32 : RA_HAMMING_KEY_BITS32)

/* code (rows [i0, i1)), cent (c) -> lab: the nearest centroid of each valid row, ties to
 * the lowest, -1 for invalid rows.  Returns how many labels changed.  Each lane keeps the
 * packed key of its best centroid so far, so a centroid costs xor, popcount, shift, or
 * and one minimum per vector of rows (32-bit words: c <= 2^RA_HAMMING_KEY_BITS32). */
static int64_t FN(hamming_assign)(int i0, int i1, const void *code_,
                                          const uint8_t *valid, const void *cent_, int c,
                                          int64_t *lab)
{
    const W *code = code_, *cent = cent_;
    int64_t changed = 0;
    const W jmask = (W)(((W)1 << RA_HKEY_SHIFT) - 1);
    hvec best[RA_HAMMING_ROWS / HL];
    const int narrow = sizeof(W) == 8 && c <= 1 << RA_HAMMING_KEY_BITS64N;
    for (int b0 = i0; b0 < i1; b0 += RA_HAMMING_ROWS) {
        const int rows = i1 - b0 < RA_HAMMING_ROWS ? i1 - b0 : RA_HAMMING_ROWS;
        const int nv = narrow ? rows / (2 * HL) * 2 : rows / HL;
        int64_t vlabel[RA_HAMMING_ROWS];
        if (narrow) {
            FN(hamming_assign_narrow)(code + b0, nv / 2, cent, c, vlabel);
        } else {
            hvec x[RA_HAMMING_ROWS / HL];
            for (int t = 0; t < nv; t++) {
                x[t] = FN(hamming_loadv)(code + b0 + t * HL);
                best[t] = (hvec){0} + (W)~(W)0;  /* any key beats it */
            }
            for (int j = 0; j < c; j++) {
                const hvec cj = (hvec){0} + cent[j], jv = (hvec){0} + (W)j;
                for (int t = 0; t < nv; t++)
                    best[t] = FN(hamming_minv)(best[t], (FN(hamming_popv)(x[t] ^ cj) << RA_HKEY_SHIFT) | jv);
            }
            for (int r = 0; r < nv * HL; r++) vlabel[r] = (int64_t)(best[r / HL][r % HL] & jmask);
        }
        for (int r = 0; r < rows; r++) {
            int64_t label = -1;
            if (r < nv * HL) {
                label = vlabel[r];
            } else {                         /* leftover rows, one at a time */
                int bd = 65;
                for (int j = 0; j < c; j++) {
                    const int dist = WPOP(code[b0 + r] ^ cent[j]);
                    if (dist < bd) { bd = dist; label = j; }
                }
            }
            if (!valid[b0 + r]) label = -1;
            changed += label != lab[b0 + r];
            lab[b0 + r] = label;
        }
    }
    return changed;
}

/* Distances of the codes code[0 .. KL) (KL = VEC_BYTES / 4) to the center in every lane
 * of cv, as 32-bit lanes: 64-bit words take two vectors, narrowed. */
static inline hkvec FN(hamming_dist32)(const W *code, hvec cv)
{
    if (sizeof(W) == 8)
        return FN(hamming_narrow)(FN(hamming_popv)(FN(hamming_loadv)(code) ^ cv),
                                  FN(hamming_popv)(FN(hamming_loadv)(code + HL) ^ cv));
    return (hkvec)FN(hamming_popv)(FN(hamming_loadv)(code) ^ cv);
}

static inline hkvec FN(hamming_loadk)(const uint32_t *p) { return *(const hkvec *)p; }

/* pot[t0 + t] += Σ min(popcount(code[i] ^ center[t0 + t]), dist[i])² over rows [i0, i1),
 * for a group of g candidates (a constant at each call, so the accumulators stay in
 * registers): each code and distance is loaded once for the group.  A lane sums at most
 * 2^16 / KL squares ≤ 64² between flushes, well inside 32 bits. */
static inline __attribute__((always_inline)) void
FN(hamming_potential_group)(const int g, int i0, int i1, const W *code, const uint32_t *dist,
                            const uint64_t *center, uint64_t *pot)
{
    enum { KL = VEC_BYTES / 4 };
    hvec cv[4];
    for (int t = 0; t < g; t++) cv[t] = (hvec){0} + (W)center[t];
    int i = i0;
    for (int b0 = i0; b0 + KL <= i1; b0 = i) {
        const int b1 = i1 - b0 < 1 << 16 ? i1 : b0 + (1 << 16);
        hkvec acc[4];
        for (int t = 0; t < g; t++) acc[t] = (hkvec){0};
        for (i = b0; i + KL <= b1; i += KL) {
            const hkvec dv = FN(hamming_loadk)(dist + i);
            for (int t = 0; t < g; t++) {
                const hkvec dd = FN(hamming_minkv)(FN(hamming_dist32)(code + i, cv[t]), dv);
                acc[t] += dd * dd;
            }
        }
        for (int t = 0; t < g; t++)
            for (int l = 0; l < KL; l++) pot[t] += acc[t][l];
    }
    for (; i < i1; i++)
        for (int t = 0; t < g; t++) {
            uint32_t dd = (uint32_t)WPOP(code[i] ^ (W)center[t]);
            dd = dd < dist[i] ? dd : dist[i];
            pot[t] += (uint64_t)dd * dd;
        }
}

/* code, dist (rows [i0, i1)), count candidates -> pot[t] = Σ min(popcount(code[i] ^
 * center[t]), dist[i])², in groups of up to four candidates. */
static void FN(hamming_potential)(int i0, int i1, const void *code_, const uint32_t *dist,
                                  const uint64_t *center, int count, uint64_t *pot)
{
    const W *code = code_;
    for (int t = 0; t < count; t++) pot[t] = 0;
    for (int t0 = 0; t0 < count; t0 += 4) {
        switch (count - t0) {
        case 1: FN(hamming_potential_group)(1, i0, i1, code, dist, center + t0, pot + t0); break;
        case 2: FN(hamming_potential_group)(2, i0, i1, code, dist, center + t0, pot + t0); break;
        case 3: FN(hamming_potential_group)(3, i0, i1, code, dist, center + t0, pot + t0); break;
        default: FN(hamming_potential_group)(4, i0, i1, code, dist, center + t0, pot + t0); break;
        }
    }
}

/* code, dist (rows [i0, i1), i0 a multiple of RA_HAMMING_BLOCK): dist[i] = min(dist[i],
 * popcount(code[i] ^ center)); block[b] = Σ dist² over the b-th block of RA_HAMMING_BLOCK
 * rows from i0 (the last one may be short); returns Σ dist² over all the rows. */
static uint64_t FN(hamming_min)(int i0, int i1, const void *code_, uint64_t center_,
                                uint32_t *dist, uint64_t *block)
{
    enum { KL = VEC_BYTES / 4 };
    const W *code = code_, center = (W)center_;
    const hvec cv = (hvec){0} + center;
    uint64_t total = 0;
    for (int b0 = i0; b0 < i1; b0 += RA_HAMMING_BLOCK) {
        const int b1 = i1 - b0 < RA_HAMMING_BLOCK ? i1 : b0 + RA_HAMMING_BLOCK;
        hkvec acc = (hkvec){0};
        int i = b0;
        for (; i + KL <= b1; i += KL) {
            const hkvec dd = FN(hamming_minkv)(FN(hamming_dist32)(code + i, cv),
                                               FN(hamming_loadk)(dist + i));
            *(hkvec *)(dist + i) = dd;
            acc += dd * dd;
        }
        uint64_t t = 0;
        for (int l = 0; l < KL; l++) t += acc[l];
        for (; i < b1; i++) {
            const uint32_t dd = (uint32_t)WPOP(code[i] ^ center);
            dist[i] = dd < dist[i] ? dd : dist[i];
            t += (uint64_t)dist[i] * dist[i];
        }
        block[(b0 - i0) / RA_HAMMING_BLOCK] = t;
        total += t;
    }
    return total;
}

/* ------------------------------------------------------------------ bit-sliced assign */
/* The codes as bit planes (the layout in kernels.h): a block of 8·VEC_BYTES codes is six
 * vectors per pair of code bits, so the distances of a block's codes to one centroid are
 * counted 8·VEC_BYTES at a time by carry-save adders, as binary numbers held in planes,
 * and the nearest centroid so far is kept the same way.  The work per centroid grows with
 * the bits used, not with the word size, and needs no popcount instruction. */
typedef uint64_t FN(ra_svec) __attribute__((vector_size(VEC_BYTES)));
#define svec FN(ra_svec)
#define SLICE_WORDS ((int)(VEC_BYTES / 8))         /* 64-bit words per plane */
#define SLICE_ROWS (64 * SLICE_WORDS)              /* codes per block */

/* code (n) -> planes (kernels.h): per block and pair of bits, their sum and the four
 * carries, then zeros. */
static int FN(hamming_slice)(int n, const void *code_, int bits, void *planes_)
{
    const W *code = code_;
    const int pairs = (bits + 1) / 2;
    svec *blk = planes_;
    for (int k0 = 0; k0 < n; k0 += SLICE_ROWS, blk += 6 * pairs + 1) {
        for (int w = 0; w < SLICE_WORDS; w++) {
            uint64_t a[64];
            for (int r = 0; r < 64; r++) {
                const int i = k0 + 64 * w + r;
                a[r] = i < n ? (uint64_t)code[i] : 0;
            }
            ra_bit_transpose64(a);                /* a[t] bit r = bit t of code r */
            for (int p = 0; p < pairs; p++) {
                const uint64_t x = a[2 * p], y = 2 * p + 1 < bits ? a[2 * p + 1] : 0;
                blk[6 * p][w] = x ^ y;
                blk[6 * p + 1][w] = ~(x ^ y);
                blk[6 * p + 2][w] = x & y;
                blk[6 * p + 3][w] = x & ~y;
                blk[6 * p + 4][w] = ~x & y;
                blk[6 * p + 5][w] = ~x & ~y;
            }
        }
        blk[6 * pairs] = (svec){0};
    }
    return VEC_BYTES;
}

/* Carry-save adder: x + y + z = lo + 2·hi, lane by lane and bit by bit. */
static inline svec FN(slice_csa)(svec *hi, svec x, svec y, svec z)
{
    const svec u = x ^ y;
    *hi = (x & y) | (u & z);
    return u ^ z;
}

/* The same for x plus a pair of bits given as their sum s and carry c (s & c = 0). */
static inline svec FN(slice_csa_pair)(svec *hi, svec x, svec s, svec c)
{
    *hi = c | (x & s);
    return x ^ s;
}

/* The distances of a block's codes to one centroid (planes blk, the centroid's planes'
 * byte offsets in[0 .. groups·16)) as seven planes, bit t of every distance in d[t]:
 * sixteen code bits (eight pairs) at a time through a Harley-Seal tree of carry-save
 * adders into planes 0-3, the sixteens rippled into planes 4-6. */
static inline void FN(slice_distance)(const svec *blk, const int32_t *in, int groups, svec d[7])
{
    svec d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0}, d4 = {0}, d5 = {0}, d6 = {0};
    for (int g = 0; g < groups; g++) {
        svec eights[2], s16;
        for (int h = 0; h < 2; h++, in += 8) {       /* four pairs: one eight out */
#define X(t) (*(const svec *)((const char *)blk + in[t]))
            svec twA, twB, foA, foB;
            d0 = FN(slice_csa_pair)(&twA, d0, X(0), X(1));
            d0 = FN(slice_csa_pair)(&twB, d0, X(2), X(3));
            d1 = FN(slice_csa)(&foA, d1, twA, twB);
            d0 = FN(slice_csa_pair)(&twA, d0, X(4), X(5));
            d0 = FN(slice_csa_pair)(&twB, d0, X(6), X(7));
            d1 = FN(slice_csa)(&foB, d1, twA, twB);
            d2 = FN(slice_csa)(&eights[h], d2, foA, foB);
#undef X
        }
        d3 = FN(slice_csa)(&s16, d3, eights[0], eights[1]);
        const svec c5 = d4 & s16;
        d4 ^= s16;
        d6 ^= d5 & c5;
        d5 ^= c5;
    }
    d[0] = d0; d[1] = d1; d[2] = d2; d[3] = d3; d[4] = d4; d[5] = d5; d[6] = d6;
}

/* One block's labels as LB planes: every centroid's distances (dp planes of them: the
 * distances are < 2^dp) in order, a lane taking centroid j where its distance is less
 * than the least so far, so ties go to the lowest j.  dp is a constant at each call. */
static inline __attribute__((always_inline)) void
FN(slice_nearest)(const int dp, const svec *blk, const int32_t *inputs, int groups, int c,
                  int LB, svec *label)
{
    const svec zero = {0}, ones = ~zero, jbit[2] = {zero, ones};
    svec best[7];
    for (int t = 0; t < dp; t++) best[t] = ones;      /* 2^dp − 1 with label 0: centroid 0
                                                          at worst ties it, and keeps it */
    for (int t = 0; t < LB; t++) label[t] = zero;
    for (int j = 0; j < c; j++) {
        svec d[7];
        FN(slice_distance)(blk, inputs + (size_t)j * (size_t)groups * 16, groups, d);
        svec less = zero, equal = ones;              /* d < best, from the top bit down */
        for (int t = dp - 1; t >= 0; t--) {
            less |= equal & ~d[t] & best[t];
            equal &= ~(d[t] ^ best[t]);
        }
        for (int t = 0; t < dp; t++) best[t] ^= (best[t] ^ d[t]) & less;
        for (int t = 0; t < LB; t++) label[t] ^= (label[t] ^ jbit[j >> t & 1]) & less;
    }
}

/* Labels of rows [i0, i1) (i0 a multiple of SLICE_ROWS) from the planes, block by block
 * (slice_nearest), read out eight codes at a time by 8 × 8 bit transposes.  Invalid rows
 * get -1; returns how many labels changed. */
static int64_t FN(hamming_assign_sliced)(int i0, int i1, const void *planes, int bits,
                                         const int32_t *inputs, const uint8_t *valid, int c,
                                         int64_t *lab)
{
    const int groups = RA_SLICE_INPUTS(bits) / 16, stride = 6 * ((bits + 1) / 2) + 1;
    const int dp = bits < 8 ? 3 : bits < 16 ? 4 : bits < 32 ? 5 : bits < 64 ? 6 : 7;
    int LB = 0;                                  /* label planes: c <= 2^LB */
    while ((1 << LB) < c) LB++;
    int64_t changed = 0;
    for (int k0 = i0; k0 < i1; k0 += SLICE_ROWS) {
        const svec *blk = (const svec *)planes + (size_t)(k0 / SLICE_ROWS) * (size_t)stride;
        svec label[10];
        switch (dp) {
        case 3: FN(slice_nearest)(3, blk, inputs, groups, c, LB, label); break;
        case 4: FN(slice_nearest)(4, blk, inputs, groups, c, LB, label); break;
        case 5: FN(slice_nearest)(5, blk, inputs, groups, c, LB, label); break;
        case 6: FN(slice_nearest)(6, blk, inputs, groups, c, LB, label); break;
        default: FN(slice_nearest)(7, blk, inputs, groups, c, LB, label); break;
        }
        const int rows = i1 - k0 < SLICE_ROWS ? i1 - k0 : SLICE_ROWS;
        for (int r0 = 0; r0 < rows; r0 += 8) {
            /* eight codes: byte t of lo (hi) holds label bit t (8 + t) of each of them */
            const int w = r0 / 64, sh = r0 % 64;
            uint64_t lo = 0, hi = 0;
            for (int t = 0; t < LB && t < 8; t++) lo |= (label[t][w] >> sh & 0xff) << (8 * t);
            for (int t = 8; t < LB; t++) hi |= (label[t][w] >> sh & 0xff) << (8 * (t - 8));
            lo = ra_bit_transpose8(lo);
            hi = ra_bit_transpose8(hi);
            for (int r = r0; r < rows && r < r0 + 8; r++) {
                const int64_t i = k0 + r;
                int64_t l = (int64_t)(lo >> (8 * (r - r0)) & 0xff)
                            | (int64_t)(hi >> (8 * (r - r0)) & 0xff) << 8;
                if (!valid[i]) l = -1;
                changed += l != lab[i];
                lab[i] = l;
            }
        }
    }
    return changed;
}

#undef svec
#undef SLICE_WORDS
#undef SLICE_ROWS

#undef hvec
#undef HL
#undef RA_HKEY_SHIFT
#undef RA_HKEY_J
#undef RA_HKEY32
#undef hkvec
