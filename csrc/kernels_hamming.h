/* kernels_hamming.h — Hamming-distance kernels for one instruction set, for 64-bit and
 * 32-bit code words.  Included by kernels_<isa>.c (through kernels_isa.h, and once more
 * by kernels_avx512.c for the VPOPCNTQ variant) with these macros defined:
 *   HFN(name)      name mangling through RA_CAT3, e.g. name##_avx2
 *   RA_POPCOUNT    popcount of one uint64_t;  RA_POPCOUNT32: of one uint32_t
 * It includes itself once per word width W (64, 32), naming the kernels
 * hamming_<kernel><W>_<isa>.  Loops run over rows with lanes of the word width, so that
 * a target with a vector popcount (AVX-512 VPOPCNTDQ) vectorises them, 16 lanes for
 * 32-bit words; elsewhere they take one popcnt per pair. */
#ifndef HW
#define HW uint64_t
#define HPOP RA_POPCOUNT
#define HNAME(name) name##64
#include "kernels_hamming.h"
#undef HW
#undef HPOP
#undef HNAME
#define HW uint32_t
#define HPOP RA_POPCOUNT32
#define HNAME(name) name##32
#include "kernels_hamming.h"
#undef HW
#undef HPOP
#undef HNAME
#else

#ifndef RA_HAMMING_ROWS
#define RA_HAMMING_ROWS 64   /* rows per block of hamming_assign */
#endif

/* code (rows [i0, i1)), cent (c) -> lab: the nearest centroid of each valid row, ties to
 * the lowest, -1 for invalid rows.  Returns how many labels changed. */
static int64_t HFN(HNAME(hamming_assign))(int i0, int i1, const void *code_,
                                          const uint8_t *valid, const void *cent_, int c,
                                          int64_t *lab)
{
    const HW *code = code_, *cent = cent_;
    int64_t changed = 0;
    HW best[RA_HAMMING_ROWS], best_j[RA_HAMMING_ROWS];
    for (int b0 = i0; b0 < i1; b0 += RA_HAMMING_ROWS) {
        const int rows = i1 - b0 < RA_HAMMING_ROWS ? i1 - b0 : RA_HAMMING_ROWS;
        const HW *x = code + b0;
        for (int r = 0; r < rows; r++) { best[r] = 65; best_j[r] = 0; }   /* any j beats 65 */
        for (int j = 0; j < c; j++) {
            const HW cj = cent[j];
            for (int r = 0; r < rows; r++) {        /* strict <: ties keep the lower j */
                const HW dist = (HW)HPOP(x[r] ^ cj);
                const int closer = dist < best[r];
                best[r] = closer ? dist : best[r];
                best_j[r] = closer ? (HW)j : best_j[r];
            }
        }
        for (int r = 0; r < rows; r++) {
            const int64_t label = valid[b0 + r] ? (int64_t)best_j[r] : -1;
            changed += label != lab[b0 + r];
            lab[b0 + r] = label;
        }
    }
    return changed;
}

/* code, dist (rows [i0, i1)) -> Σ min(popcount(code[i] ^ center), dist[i])². */
static uint64_t HFN(HNAME(hamming_potential))(int i0, int i1, const void *code_,
                                              const void *dist_, uint64_t center_)
{
    const HW *code = code_, *dist = dist_, center = (HW)center_;
    uint64_t total = 0;
    for (int b0 = i0; b0 < i1; b0 += 1 << 16) {     /* 2^16 rows · 64² fit any word */
        const int b1 = i1 - b0 < 1 << 16 ? i1 : b0 + (1 << 16);
        HW s = 0;
        for (int i = b0; i < b1; i++) {
            HW dd = (HW)HPOP(code[i] ^ center);
            dd = dd < dist[i] ? dd : dist[i];
            s += dd * dd;
        }
        total += s;
    }
    return total;
}

/* code, dist (rows [i0, i1)): dist[i] = min(dist[i], popcount(code[i] ^ center)). */
static void HFN(HNAME(hamming_min))(int i0, int i1, const void *code_, uint64_t center_,
                                    void *dist_)
{
    const HW *code = code_, center = (HW)center_;
    HW *dist = dist_;
    for (int i = i0; i < i1; i++) {
        const HW dd = (HW)HPOP(code[i] ^ center);
        dist[i] = dd < dist[i] ? dd : dist[i];
    }
}

#endif
