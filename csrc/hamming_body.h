/* hamming_body.h — Hamming k-means of one problem for one code-word type, compiled
 * through typed.h in word mode by clustering.c: W (uint64_t, or uint32_t when every code
 * fits), WSEL (the matching member of RaKernels), FN(name) = name64 / name32. */

/* code (n) -> labels (n): nearest centroid by popcount(code xor centroid), ties to
 * the lowest cluster, −1 for invalid rows.  Returns how many labels changed.  With
 * planes (the codes' `bits` low bits sliced by K->slice, plane_bytes each), from them;
 * else word by word. */
static int64_t FN(ra_hamming_assign)(int n, int c, const W *code, const uint8_t *valid,
                                      const W *cent, int64_t *lab, const void *planes,
                                      int plane_bytes, int bits, int32_t *inputs, int nt)
{
    const RaHammingKernels *K = &ra_kernels()->WSEL;
    const int nch = ra_nchunks(n), per = RA_SLICE_INPUTS(bits);
    int64_t changed = 0;
    if (planes) {
        for (int j = 0; j < c; j++)
            ra_slice_inputs((uint64_t)cent[j], bits, plane_bytes, inputs + (size_t)j * per);
        RA_PARALLEL_FOR(nt, k, nch, schedule(static) reduction(+:changed),
            const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
            changed += K->assign_sliced(k * RA_CHUNK, i1, planes, bits, inputs, valid, c, lab););
        return changed;
    }
    RA_PARALLEL_FOR(nt, k, nch, schedule(static) reduction(+:changed),
        const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
        changed += K->assign(k * RA_CHUNK, i1, code, valid, cent, c, lab););
    return changed;
}

/* Seeded greedy k-means++ on Hamming distance: cent (c) from the valid codes.  Each
 * step draws ra_trials(c) candidates by D² sampling and keeps the one leaving the least
 * total D² (the first on ties).  Integer weights: every sum is exact.  The D² weights are
 * summed per block of RA_HAMMING_BLOCK rows and per chunk, so a draw walks chunks, then
 * blocks, then rows.  Invalid rows keep dist 0 (weight 0, never drawn).
 * dist (n), partial (ra_nchunks(n) · (ra_trials(c) + 1)), block (ceil(n / RA_HAMMING_BLOCK))
 * are scratch. */
static void FN(ra_hamming_seed)(int n, int c, const W *code, const uint8_t *valid,
                                 int64_t nvalid, uint64_t *rng, W *cent, uint32_t *dist,
                                 uint64_t *partial, uint64_t *block, int nt)
{
    const RaHammingKernels *K = &ra_kernels()->WSEL;
    const int nch = ra_nchunks(n), L = ra_trials(c);
    uint64_t *pot = partial + nch;          /* (nch, L) candidate potentials per chunk */
    cent[0] = code[ra_kth_valid(n, valid, (int64_t)(ra_rng_next(rng) % (uint64_t)nvalid))];
    for (int i = 0; i < n; i++) dist[i] = valid[i] ? 65 : 0;   /* min(65, d) = d */
    for (int j = 1; j < c; j++) {
        /* 1. distances to the centroid chosen last, with their D² sums per block and per
              chunk (invalid rows keep 0) */
        RA_PARALLEL_FOR(nt, k, nch, schedule(static),
            partial[k] = K->min(k * RA_CHUNK, (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n, code,
                                cent[j - 1], dist, block + k * (RA_CHUNK / RA_HAMMING_BLOCK)););
        uint64_t total = 0;
        for (int k = 0; k < nch; k++) total += partial[k];
        int pick;
        if (total == 0) {                   /* every valid row is a centroid already */
            pick = ra_kth_valid(n, valid, (int64_t)(ra_rng_next(rng) % (uint64_t)nvalid));
        } else {
            /* 2. L candidates: first row whose running weight exceeds a uniform target */
            int cand[RA_MAX_TRIALS] = {0};
            for (int t = 0; t < L; t++) {
                const uint64_t target = ra_rng_next(rng) % total;
                uint64_t run = 0;
                int k = 0;
                while (run + partial[k] <= target) run += partial[k++];
                int b = k * (RA_CHUNK / RA_HAMMING_BLOCK);
                while (run + block[b] <= target) run += block[b++];
                int i = b * RA_HAMMING_BLOCK;
                for (;; i++) {
                    run += (uint64_t)(dist[i] * dist[i]);
                    if (run > target) break;
                }
                cand[t] = i;
            }
            /* 3. keep the candidate with the least remaining potential */
            uint64_t centers[RA_MAX_TRIALS];
            for (int t = 0; t < L; t++) centers[t] = (uint64_t)code[cand[t]];
            RA_PARALLEL_FOR(nt, k, nch, schedule(static),
                const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
                K->potential(k * RA_CHUNK, i1, code, dist, centers, L, pot + (size_t)k * L););
            uint64_t best = UINT64_MAX;
            pick = cand[0];
            for (int t = 0; t < L; t++) {
                uint64_t s = 0;
                for (int k = 0; k < nch; k++) s += pot[(size_t)k * L + t];
                if (s < best) { best = s; pick = cand[t]; }
            }
        }
        cent[j] = code[pick];
    }
}

/* Add `carry` (weight 2^level) to the bit-sliced counters plane[]. */
static inline void FN(planes_add)(uint64_t *plane, int level, uint64_t carry)
{
    for (int l = level; carry; l++) {
        const uint64_t both = plane[l] & carry;
        plane[l] ^= carry;
        carry = both;
    }
}

/* Carry-save adder: x + y + z = lo + 2·hi, bit by bit. */
static inline uint64_t FN(csa)(uint64_t *lo, uint64_t x, uint64_t y, uint64_t z)
{
    const uint64_t u = x ^ y;
    *lo = u ^ z;
    return (x & y) | (u & z);
}

/* The per-bit majority of the codes rows[0..size): a tied bit is 0.  The per-bit
 * counts are kept bit-sliced (plane[l] holds bit l of every count): eight words at a
 * time go through a carry-save tree into planes 0-2 and one ripple-carry from plane 3
 * (a ripple per word runs ~log2(64) planes deep and ends in a mispredicted branch), and
 * the counts are compared with size / 2 plane by plane, every bit at once.  32-bit codes
 * go two to a 64-bit word (the low and the high half count separately, then are added
 * bit-sliced). */
static W FN(ra_bit_majority)(const W *code, const int64_t *rows, int64_t size)
{
    enum { BITS = 8 * sizeof(W), PER = 64 / BITS };      /* codes per word: 2 or 1 */
    uint64_t plane[64] = {0};
    int64_t t = 0;
#define RA_WORD(t) ((uint64_t)code[rows[t]] | \
                    (PER == 2 && (t) + 1 < size ? (uint64_t)code[rows[(t) + 1]] << (BITS % 64) : 0))
    for (; t + 8 * PER <= size; t += 8 * PER) {
        uint64_t w[8], two[4], four[2];
        for (int u = 0; u < 8; u++) w[u] = RA_WORD(t + u * PER);
        for (int u = 0; u < 4; u++) two[u] = FN(csa)(&plane[0], plane[0], w[2 * u], w[2 * u + 1]);
        for (int u = 0; u < 2; u++) four[u] = FN(csa)(&plane[1], plane[1], two[2 * u], two[2 * u + 1]);
        FN(planes_add)(plane, 3, FN(csa)(&plane[2], plane[2], four[0], four[1]));
    }
    for (; t < size; t += PER) FN(planes_add)(plane, 0, RA_WORD(t));
#undef RA_WORD
    /* every count is at most size < 2^top: planes top and above stay 0 */
    const int top = 64 - __builtin_clzll((uint64_t)size);
    if (PER == 2) {                  /* the halves' counts added, bit-sliced */
        uint64_t carry = 0;
        for (int l = 0; l < top; l++)
            carry = FN(csa)(&plane[l], plane[l] & 0xffffffffu, plane[l] >> 32, carry);
    }
    /* a bit is set where its count > size / 2, i.e. 2·count > size: the planes against
       the threshold's bits, from the top */
    const uint64_t half = (uint64_t)size / 2;
    uint64_t greater = 0, equal = ~(uint64_t)0;
    for (int l = top - 1; l >= 0; l--) {   /* above: half's bits and the planes are 0 */
        if ((half >> l) & 1) {
            equal &= plane[l];
        } else {
            greater |= equal & plane[l];
            equal &= ~plane[l];
        }
    }
    return (W)greater;
}

/* Problem b: seeding, Lloyd iterations, labels and centroids written out. */
static void FN(ra_hamming_fit)(ptrdiff_t b, int n, int c, RaBVec codes, RaBVec mask,
                                RaBVec iters, RaBVec seed, RaBVec labels, RaBVec centroids,
                                RaHammingWork *w, int nt)
{
    W *code = (W *)w->code, *cent = (W *)w->cent;
    uint8_t *valid = w->valid;
    int64_t *lab = w->lab, *start = w->start, *rows = w->rows;
    RaVec cv = ra_vec_at(codes, b), mv = ra_vec_at(mask, b);
    const int64_t n_iters = RA_VEC_AT(int64_t, ra_vec_at(iters, b), 0);
    uint64_t rng = RA_VEC_AT(uint64_t, ra_vec_at(seed, b), 0);
    int64_t nvalid = 0;
    uint64_t used = 0;
    for (int i = 0; i < n; i++) {
        code[i] = (W)RA_VEC_AT(int64_t, cv, i);
        used |= (uint64_t)code[i];
        valid[i] = mv.data == NULL || RA_VEC_AT(uint8_t, mv, i);
        nvalid += valid[i];
        lab[i] = -2;                     /* "no label yet": every row counts as changed */
    }
    /* the codes' bits as planes for the Lloyd assign (every centroid is a code or a
       per-bit majority of codes: no bit beyond them) */
    const int bits = used ? 64 - __builtin_clzll(used) : 0;
    const void *planes = bits && w->planes && w->inputs ? w->planes : NULL;
    const int plane_bytes = planes ? ra_kernels()->WSEL.slice(n, code, bits, w->planes) : 0;
    if (nvalid == 0) {
        memset(cent, 0, sizeof(W) * (size_t)c);
    } else {
        /* 1. k-means++ seeding */
        FN(ra_hamming_seed)(n, c, code, valid, nvalid, &rng, cent, w->dist, w->partial,
                             w->block, nt);
        /* 2. Lloyd: assign, stop at a fixed point, majority-vote update */
        int reseeded = 1;
        for (int64_t it = 0;; it++) {
            const int64_t changed = FN(ra_hamming_assign)(n, c, code, valid, cent, lab, planes,
                                                         plane_bytes, bits, w->inputs, nt);
            if (it == n_iters || (changed == 0 && !reseeded)) break;
            ra_group_by_label(n, lab, c, start, rows, w->counts, nt);
            /* per cluster: the per-bit majority of its members */
            RA_PARALLEL_FOR(nt, j, c, schedule(dynamic, 4),
                const int64_t size = start[j + 1] - start[j];
                w->empty[j] = size == 0;
                if (size > 0) cent[j] = FN(ra_bit_majority)(code, rows + start[j], size););
            /* empty clusters, in cluster order: a fresh random valid row */
            reseeded = 0;
            for (int j = 0; j < c; j++) {
                if (!w->empty[j]) continue;
                cent[j] = code[ra_kth_valid(n, valid, (int64_t)(ra_rng_next(&rng) % (uint64_t)nvalid))];
                reseeded = 1;
            }
        }
    }
    RaVec lv = ra_vec_at(labels, b), ov = ra_vec_at(centroids, b);
    for (int i = 0; i < n; i++) RA_VEC_AT(int64_t, lv, i) = nvalid ? lab[i] : -1;
    for (int j = 0; j < c; j++) RA_VEC_AT(int64_t, ov, j) = (int64_t)(uint64_t)cent[j];
}
