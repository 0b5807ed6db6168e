/* kernels_hamming.h — Hamming-distance kernels of 64-bit codes for one instruction set.
 * Included by kernels_<isa>.c (through kernels_isa.h, and once more by kernels_avx512.c
 * for the VPOPCNTQ variant) with these macros defined:
 *   HFN(name)    name mangling, e.g. name##_avx2
 *   RA_POPCOUNT  popcount of one uint64_t
 * Loops are written over rows with 64-bit lanes throughout, so that a target with a
 * vector popcount (AVX-512 VPOPCNTDQ) vectorises them; elsewhere they run one popcnt
 * per pair.  Invalid rows carry dist 0 in the seeding kernels, so they need no test. */

#ifndef RA_HAMMING_ROWS
#define RA_HAMMING_ROWS 64   /* rows per block of hamming_assign */
#endif

/* code (rows [i0, i1)), cent (c) -> lab: the nearest centroid of each valid row, ties to
 * the lowest, -1 for invalid rows.  Returns how many labels changed. */
static int64_t HFN(hamming_assign)(int i0, int i1, const uint64_t *code, const uint8_t *valid,
                                   const uint64_t *cent, int c, int64_t *lab)
{
    int64_t changed = 0;
    uint64_t best[RA_HAMMING_ROWS];
    int64_t best_j[RA_HAMMING_ROWS];
    for (int b0 = i0; b0 < i1; b0 += RA_HAMMING_ROWS) {
        const int rows = i1 - b0 < RA_HAMMING_ROWS ? i1 - b0 : RA_HAMMING_ROWS;
        const uint64_t *x = code + b0;
        for (int r = 0; r < rows; r++) { best[r] = 65; best_j[r] = -1; }
        for (int j = 0; j < c; j++) {
            const uint64_t cj = cent[j];
            for (int r = 0; r < rows; r++) {        /* strict <: ties keep the lower j */
                const uint64_t dist = (uint64_t)RA_POPCOUNT(x[r] ^ cj);
                const int closer = dist < best[r];
                best[r] = closer ? dist : best[r];
                best_j[r] = closer ? j : best_j[r];
            }
        }
        for (int r = 0; r < rows; r++) {
            const int64_t label = valid[b0 + r] ? best_j[r] : -1;
            changed += label != lab[b0 + r];
            lab[b0 + r] = label;
        }
    }
    return changed;
}

/* code, dist (rows [i0, i1)) -> Σ min(popcount(code[i] ^ center), dist[i])². */
static uint64_t HFN(hamming_potential)(int i0, int i1, const uint64_t *code,
                                       const uint64_t *dist, uint64_t center)
{
    uint64_t s = 0;
    for (int i = i0; i < i1; i++) {
        uint64_t dd = (uint64_t)RA_POPCOUNT(code[i] ^ center);
        dd = dd < dist[i] ? dd : dist[i];
        s += dd * dd;
    }
    return s;
}

/* code, dist (rows [i0, i1)): dist[i] = min(dist[i], popcount(code[i] ^ center)). */
static void HFN(hamming_min)(int i0, int i1, const uint64_t *code, uint64_t center,
                             uint64_t *dist)
{
    for (int i = i0; i < i1; i++) {
        const uint64_t dd = (uint64_t)RA_POPCOUNT(code[i] ^ center);
        dist[i] = dd < dist[i] ? dd : dist[i];
    }
}
