/* kernels.h — the SIMD building blocks of the tile engine, one table per instruction set.
 *
 * kernels_body.h is compiled once per table: on x86 three times (kernels_avx512.c,
 * kernels_avx2.c, kernels_generic.c) under different target pragmas, on AArch64 twice
 * (kernels_neon.c, kernels_generic.c), elsewhere once (generic); ra_kernels() picks the
 * best table the running CPU supports, once.  The environment variable RA_SIMD
 * (avx512 | avx2 | generic on x86, generic on AArch64) forces a lower path, for testing.
 *
 * All matrices are row-major with an explicit leading dimension (in elements).
 */
#ifndef RA_KERNELS_H
#define RA_KERNELS_H

#include "common.h"

#define RA_TOPM 16        /* rank tracked per column by top_sample */
#define RA_TOP_SLACK 65   /* top_admit list slots beyond cap */
#define RA_OFFER_ALIGN 16 /* top_offer list stride granule (elements): the widest vector */
#define RA_OFFER_DEPTH 4  /* top_offer's pre-pass floor up to cap = 4 vectors of lanes */

#define RA_KERNEL_FNS(T)                                                                  \
    /* C (M×N, ldc) = [C +] A (M×K, lda) · B (K×N, ldb); accumulate != 0 adds to C. */    \
    void (*gemm)(int M, int N, int K, const T *A, ptrdiff_t lda, const T *B,               \
                 ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate);                      \
    /* gemm, hinting hints' lines as it goes, paced by multiply-adds (common.h). */      \
    void (*gemm_hinting)(int M, int N, int K, const T *A, ptrdiff_t lda, const T *B,       \
                         ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate,               \
                         RaHints *hints);                                                  \
    /* C (M×N, ldc) = [C +] Aᵀ · B with A stored (K×M, lda), B (K×N, ldb). */              \
    void (*gemm_tn)(int M, int N, int K, const T *A, ptrdiff_t lda, const T *B,            \
                    ptrdiff_t ldb, T *C, ptrdiff_t ldc, int accumulate);                   \
    /* Online-softmax step.  S (bq×bk, lds) holds logits, masked ones = -inf; on return   \
       S holds p = exp(S - m_new).  mx, sum (bq) are the running max and sum; acc         \
       (bq×e, ldacc) is rescaled by exp(m_old - m_new).  A row with no visible key so far  \
       keeps mx = -inf, sum = 0 and gets p = 0; such a row must come with sum = 0 and acc  \
       0 or NaN (ra_fwd_init's state, then zero weights times non-finite values), which   \
       its first visible key leaves as they are rather than multiply by exp(-inf) = 0.    \
       NaN logits make the row NaN. */                                                    \
    void (*softmax_step)(int bq, int bk, T *S, ptrdiff_t lds, T *mx, T *sum, T *acc,      \
                         int e, ptrdiff_t ldacc);                                          \
    /* S (bq×bk, lds) = exp(S - lse[i]) row by row; rows with lse = -inf become 0. */      \
    void (*exp_shift)(int bq, int bk, T *S, ptrdiff_t lds, const T *lse);                   \
    /* S[i, j] = -inf where key j is hidden from query i: kpos[j] < 0, or causal and      \
       kpos[j] > qpos[i], or exclude_self and kpos[j] == qpos[i]. */                      \
    void (*mask_tile)(int bq, int bk, T *S, ptrdiff_t lds, const int64_t *qpos,           \
                      const int64_t *kpos, int causal, int exclude_self);                  \
    /* Relative position bias: S[i, j] += bias[kpos[j] - qpos[i]] where kpos[j] >= 0    \
       (bias points at offset 0; padding keys are left alone). */                        \
    void (*bias_tile)(int bq, int bk, T *S, ptrdiff_t lds, const int64_t *qpos,           \
                      const int64_t *kpos, const T *bias);                                 \
    /* Attention dropout: S[i, j] *= keep where ra_pair_bits(key, qpos[i], kpos[j]) >=   \
       drop (common.h), else S[i, j] = 0. */                                              \
    void (*dropout_tile)(int bq, int bk, T *S, ptrdiff_t lds, const int64_t *qpos,        \
                         const int64_t *kpos, uint64_t key, uint32_t drop, T keep);        \
    /* Transposing gather: dst[c·ld + r] = mul · src[off[r] + c] for r < rows, c < cols  \
       (row r of a strided matrix starts at element offset off[r] from src). */           \
    void (*gather_t)(int rows, int cols, const T *src, const int64_t *off, T mul, T *dst, \
                     ptrdiff_t ld);                                                        \
    /* Row argmax of S (rows×c, lds): lab[i] = first j with the largest non-NaN S[i, j]    \
       (-1 if the row is all NaN), best[i] = that value (NaN for -1). */                  \
    void (*argmax_rows)(int rows, int c, const T *S, ptrdiff_t lds, int64_t *lab, T *best);\
    /* Column argmax of S (c×cols, lds): lab[i] = first j with the largest non-NaN         \
       S[j, i] (-1 if the column is all NaN), best[i] = that value (NaN for -1): the      \
       labels argmax_rows gives on Sᵀ, and its values (where +0 and -0 tie for the        \
       maximum, either zero). */                                                          \
    void (*argmax_cols)(int c, int cols, const T *S, ptrdiff_t lds, int64_t *lab, T *best);\
    /* dP (bq×bk, ld) = scale · P ∘ (dP - delta[i]), in place in dP. */                    \
    void (*softmax_grad)(int bq, int bk, const T *P, T *dP, ptrdiff_t ld, const T *delta,  \
                         T scale);                                                         \
    /* top_members sample: rows (rows×cb, ld) update top (m×ldt, m <= RA_TOPM), per      \
       column the m largest values seen so far in decreasing order (NaN counts as -inf;   \
       a value enters only if strictly larger, so equal values keep row order).           \
       Initialise top to -inf.  tpos (m×ldt unsigned integers of T's width: uint32 for    \
       float, uint64 for double) or NULL: the row index r of each entry, alongside. */    \
    void (*top_sample)(int rows, int cb, const T *s, ptrdiff_t ld, int m, T *top,         \
                       ptrdiff_t ldt, void *tpos);                                         \
    /* top_members admission: row r (rows×cb, ld) joins column j's candidate list iff     \
       s[r][j] >= thr[j] (so NaN never does): pos[j·L + cnt[j]] = row0 + r, val[..] =     \
       s[r][j], cnt[j]++, with list stride L = cap + RA_TOP_SLACK.  A list found holding   \
       >= cap entries (checked every RA_TOP_SLACK - 1 rows, so it may reach               \
       cap + RA_TOP_SLACK - 1) gets thr[j] = NaN and admits no more.  cnt (initialised),  \
       pos and val hold cb + 1 lists: list cb, whose count must be 0, is scratch. */       \
    void (*top_admit)(int rows, int cb, const T *s, ptrdiff_t ld, int row0, T *thr,       \
                      int cap, int *cnt, int32_t *pos, T *val);                            \
    /* Clustered top-k: row r of s (rows×cols, ld) offers each entry j with kpos[j] >= 0  \
       to its candidate list (values lv, positions lj: integers of T's width, row stride  \
       ldl; size at size[r·lds]; at most cap > 0 entries), which keeps the best offered   \
       so far, best first: larger value, ties to the earlier offer, NaN last.  Successive \
       calls offer increasing positions.  An entry with kpos[j] < 0 must hold -inf or NaN \
       (the engine's masked logits do): a pre-pass bounds the row's best values from all  \
       its entries.  A list is read in whole vectors: ldl is a multiple of               \
       RA_OFFER_ALIGN elements, at least cap rounded up to one. */                        \
    void (*top_offer)(int rows, int cols, const T *s, ptrdiff_t ld, const int64_t *kpos,  \
                      int cap, T *lv, void *lj, ptrdiff_t ldl, int *size, ptrdiff_t lds);   \
    /* Running column maximum (Combiner max-pooling): rows j = from, from + step, ...,     \
       up to but not including to (step ±1), row j at x + j·ld, d columns.  Where a row   \
       is larger (strict) or at least as large (!strict) than best[c], best[c] takes its  \
       value and barg[c] = j; NaN never replaces. */                                      \
    void (*pool_scan)(const T *x, ptrdiff_t ld, int from, int to, int step, int d, T *best, \
                      int32_t *barg, int strict);                                          \
    /* One unit-stride row x (d) -> out = x / |x| (x itself when |x| is 0 or NaN),        \
       *norm = |x|, *sq = |out|² (sums in a fixed order per instruction set). */         \
    void (*normalize_row)(const T *x, int d, T *out, T *norm, T *sq);                           \
    /* LSH codes: codes[r] = Σ_k [S[r, k] > thr[k]] << k for rows r of S (rows×bits,       \
       lds), bits <= 64; quiet comparisons (a NaN score gives bit 0, raises no flag). */   \
    void (*threshold_bits)(int rows, int bits, const T *S, ptrdiff_t lds, const T *thr,   \
                           int64_t *codes);                                                \
    /* The greedy k-means++ seeding's candidate potentials over one block of rows: for    \
       t < L, s[t] += Σ_{r < rows} w(max(cos[t·ldc + r], best[r]), valid[r]), where       \
       w(x, v) = (1 − x)² in double when v and x < 1, else 0 (a NaN gives 0).  Row r goes  \
       into partial sum r mod 8; the eight are combined in a fixed order, then added. */  \
    void (*seed_potential)(int rows, int L, const T *cos, ptrdiff_t ldc, const T *best,   \
                           const uint8_t *valid, double *s);

typedef struct { RA_KERNEL_FNS(float) } RaKernelsF32;
typedef struct { RA_KERNEL_FNS(double) } RaKernelsF64;

/* Hamming distances of code words, rows [i0, i1) (popcnt where the CPU has it). */
#define RA_HAMMING_KEY_BITS32 26   /* the 32-bit assign packs (distance, j): c <= 2^26 */
#define RA_HAMMING_KEY_BITS64N 25  /* so does the 64-bit one in 32-bit keys: c <= 2^25 */
#define RA_HAMMING_BLOCK 64        /* rows per D² block sum of the seeding; divides RA_CHUNK */
/* Bit-sliced codes (kernels_hamming.h, hamming_slice): the codes in blocks of 8·VEC_BYTES,
 * code r of a block at bit r % 64 of word r / 64 of each VEC_BYTES plane.  The code bits
 * go in pairs (a, b) = (2p, 2p + 1) (b = 0 past the last bit), six planes a pair:
 * a ^ b, its complement, then (a ^ x) & (b ^ y) for x, y = 0, 1 (x, y = 1: the bit
 * complemented); a zero plane ends the block.  A centroid (bits x, y at a and b) picks
 * for pair p plane 6p + (x ^ y) and plane 6p + 2 + 2x + y: the sum and the carry of the
 * two bits of code XOR centroid, no XOR done. */
#define RA_SLICE_MAX_C 1024          /* the sliced assign keeps c <= 2^10 labels as planes */
#define RA_SLICE_INPUTS(bits) (((bits) + 15) / 16 * 16)   /* planes a centroid picks */
/* Bytes of the planes of n codes of `bits` bits (any VEC_BYTES <= 64). */
static inline size_t ra_slice_bytes(int n, int bits)
{
    return ra_mul((size_t)3 * (size_t)bits + 4, (size_t)n / 8 + 64);
}

/* The RA_SLICE_INPUTS(bits) planes centroid `cent` picks, as byte offsets in a block of
 * planes of plane_bytes each (the pairs past the last: the zero plane). */
static inline void ra_slice_inputs(uint64_t cent, int bits, int plane_bytes, int32_t *in)
{
    const int pairs = (bits + 1) / 2;
    int p = 0;
    for (int32_t at = 0; p < pairs; p++, at += 6 * plane_bytes) {
        const int x = (int)(cent >> (2 * p) & 1), y = (int)(cent >> (2 * p + 1) & 1);
        in[2 * p] = at + plane_bytes * (x ^ y);
        in[2 * p + 1] = at + plane_bytes * (2 + 2 * x + y);
    }
    for (; p < RA_SLICE_INPUTS(bits) / 2; p++) in[2 * p] = in[2 * p + 1] = 6 * pairs * plane_bytes;
}

/* a[c] bit r <-> a[r] bit c (a 64 × 64 bit matrix transposed in place). */
static inline void ra_bit_transpose64(uint64_t a[64])
{
    uint64_t m = 0x00000000FFFFFFFFull;
    for (int j = 32; j != 0; j >>= 1, m ^= m << j)
        for (int k = 0; k < 64; k = (k + j + 1) & ~j) {
            const uint64_t t = ((a[k] >> j) ^ a[k + j]) & m;
            a[k + j] ^= t;
            a[k] ^= t << j;
        }
}

/* Byte c bit r of the result = byte r bit c of x (an 8 × 8 bit matrix transposed). */
static inline uint64_t ra_bit_transpose8(uint64_t x)
{
    uint64_t t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
    x ^= t ^ (t << 7);
    t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
    x ^= t ^ (t << 14);
    t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
    return x ^ t ^ (t << 28);
}

typedef struct {
    /* nearest centroid of each valid row (ties to the lowest, -1 if invalid) into lab,
       returning how many labels changed (32-bit words: c <= 2^RA_HAMMING_KEY_BITS32); */
    int64_t (*assign)(int i0, int i1, const void *code, const uint8_t *valid,
                      const void *cent, int c, int64_t *lab);
    /* pot[t] = Σ min(popcount(code[i] ^ center[t]), dist[i])² for t < count; */
    void (*potential)(int i0, int i1, const void *code, const uint32_t *dist,
                      const uint64_t *center, int count, uint64_t *pot);
    /* dist[i] = min(dist[i], popcount(code[i] ^ center)), and the sums of the new dist²
       per block of RA_HAMMING_BLOCK rows from i0 (a multiple of it) into block; returns
       their total. */
    uint64_t (*min)(int i0, int i1, const void *code, uint64_t center, uint32_t *dist,
                    uint64_t *block);
    /* the n codes' low `bits` bits (1-64) as planes in the layout above; returns the
       bytes of a plane; */
    int (*slice)(int n, const void *code, int bits, void *planes);
    /* assign from the planes: rows [i0, i1) (i0 a multiple of 512), inputs (c,
       RA_SLICE_INPUTS(bits)) the centroids' planes (ra_slice_inputs), c <= RA_SLICE_MAX_C. */
    int64_t (*assign_sliced)(int i0, int i1, const void *planes, int bits,
                             const int32_t *inputs, const uint8_t *valid, int c, int64_t *lab);
    /* 1 where `assign` is the faster Lloyd assign at every code width (a vector popcount
       counts a 64-bit lane in one instruction): hamming_kmeans then builds no planes */
    int words_first;
} RaHammingKernels;

typedef struct {
    const char *name;   /* "avx512-vpopcnt", "avx512", "avx2", "neon" or "generic" */
    RaKernelsF32 f32;
    RaKernelsF64 f64;
    /* Peak probe: `iters` rounds of 12 independent float32 vector FMA chains; returns
       the flop count done (the checksum keeps the compiler from dropping the work). */
    double (*fma_probe)(long iters, float *checksum);
    /* Hamming kernels for 64-bit and for 32-bit code words (codes and centroids of that
       width, passed as void *; distances always 32-bit). */
    RaHammingKernels hamming64, hamming32;
} RaKernels;

extern const RaKernels ra_kernels_generic;
#if defined(__x86_64__) || defined(__i386__)
extern const RaKernels ra_kernels_avx512vp, ra_kernels_avx512, ra_kernels_avx2;
#endif
#if defined(__aarch64__)
extern const RaKernels ra_kernels_neon;
#endif

/* The table for this CPU (resolved once, thread-safe after the module is imported). */
const RaKernels *ra_kernels(void);

#endif /* RA_KERNELS_H */
