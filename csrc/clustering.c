/* clustering.c — routing decisions: spherical k-means, centroid updates, balanced
 * membership, LSH codes and Hamming k-means.
 *
 * Determinism: every random draw comes from one splitmix64 stream per problem, seeded
 * with `seed` (the same for every problem of a batch, so a problem's result does not
 * depend on its place in the batch), and is taken serially.  Parallel loops write
 * disjoint outputs; every floating-point reduction runs over fixed chunks of RA_CHUNK
 * rows (or one cluster's members, in position order) and is combined in a fixed order,
 * so results are bit-identical for any thread count.
 */
#include <fenv.h>

#include "methods.h"

#define RA_CHUNK 4096      /* rows per reduction chunk: fixed, never thread-dependent */
#define RA_ROWS 64         /* rows per matrix-product block */

/* ------------------------------------------------------------------ PRNG */
/* splitmix64 (Steele, Lea, Flood 2014): state advances by the golden gamma. */
static inline uint64_t ra_rng_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform double in [0, 1) from the top 53 bits. */
static inline double ra_rng_unit(uint64_t *state)
{
    return (double)(ra_rng_next(state) >> 11) * 0x1.0p-53;
}

/* ------------------------------------------------------------------ shared helpers */
static inline int ra_nchunks(int n) { return (n + RA_CHUNK - 1) / RA_CHUNK; }

/* Candidates per greedy k-means++ step: 2 + floor(ln c), as in scikit-learn. */
#define RA_MAX_TRIALS 32
static inline int ra_trials(int c)
{
    const int L = 2 + (int)floor(log((double)c));
    return L < RA_MAX_TRIALS ? L : RA_MAX_TRIALS;
}

/* Position of the k-th (0-based) row with valid[i] != 0; valid has at least k+1 such rows. */
static int ra_kth_valid(int n, const uint8_t *valid, int64_t k)
{
    for (int i = 0; i < n; i++)
        if (valid[i] && k-- == 0) return i;
    return -1;
}

/* Counting sort of rows by label.  labels (n) in [-1, c), −1 = in no cluster  ->
 * start (c + 1) and members (start[c]): the rows of cluster j, increasing, are
 * members[start[j] .. start[j+1]).  counts is scratch of ra_nchunks(n)·c int64. */
static void ra_group_by_label(int n, const int64_t *labels, int c, int64_t *start,
                              int64_t *members, int64_t *counts, int nt)
{
    const int nch = ra_nchunks(n);
    /* 1. per-chunk counts */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int k = 0; k < nch; k++) {
        int64_t *cnt = counts + (size_t)k * c;
        memset(cnt, 0, sizeof(int64_t) * (size_t)c);
        const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
        for (int i = k * RA_CHUNK; i < i1; i++)
            if (labels[i] >= 0) cnt[labels[i]]++;
    }
    /* 2. offsets: cluster-major, chunk order inside a cluster */
    int64_t run = 0;
    for (int j = 0; j < c; j++) {
        start[j] = run;
        for (int k = 0; k < nch; k++) {
            const int64_t cnt = counts[(size_t)k * c + j];
            counts[(size_t)k * c + j] = run;
            run += cnt;
        }
    }
    start[c] = run;
    /* 3. scatter: each chunk writes its own slots */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int k = 0; k < nch; k++) {
        int64_t *off = counts + (size_t)k * c;
        const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
        for (int i = k * RA_CHUNK; i < i1; i++)
            if (labels[i] >= 0) members[off[labels[i]]++] = i;
    }
}

/* Copy labels (n) into lab, −1 where mask (may be NULL) is False.  RA_ERR_INDEX when a
 * label is outside [-1, c). */
static int ra_read_labels(int n, int c, RaVec labels, RaVec mask, int64_t *lab)
{
    for (int i = 0; i < n; i++) {
        const int64_t l = RA_VEC_AT(int64_t, labels, i);
        if (l < -1 || l >= c) return RA_ERR_INDEX;
        lab[i] = (mask.data && !RA_VEC_AT(uint8_t, mask, i)) ? -1 : l;
    }
    return RA_OK;
}

/* ------------------------------------------------------------------ typed kernels */
#define RA_TYPED_BODY "clustering_body.h"
#include "typed.h"

/* ------------------------------------------------------------------ members_from_labels */
/* labels (B; n) in [-1, c)  ->  members (B; c, s): the rows of each cluster in
 * increasing order, −1 padded; a cluster with more than s rows keeps its first s. */
int ra_members_from_labels(ptrdiff_t B, int n, int c, int s, RaBVec labels, RaBMat members)
{
    const int nt = ra_num_threads();
    int64_t *lab = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *start = ra_alloc(ra_mul(sizeof(int64_t), (size_t)c + 1));
    int64_t *rows = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *counts = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)ra_nchunks(n), c)));
    int st = (lab && start && rows && counts) ? RA_OK : RA_ERR_NOMEM;
    const RaVec no_mask = {NULL, 0};
    for (ptrdiff_t b = 0; b < B && st == RA_OK; b++) {
        st = ra_read_labels(n, c, ra_vec_at(labels, b), no_mask, lab);
        if (st != RA_OK) break;
        ra_group_by_label(n, lab, c, start, rows, counts, nt);
        RaMat out = ra_mat_at(members, b);
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int j = 0; j < c; j++) {
            const int64_t size = start[j + 1] - start[j];
            for (int t = 0; t < s; t++)
                RA_MAT_AT(int64_t, out, j, t) = t < size ? rows[start[j] + t] : -1;
        }
    }
    ra_free(lab); ra_free(start); ra_free(rows); ra_free(counts);
    return st;
}

/* ------------------------------------------------------------------ hamming_kmeans */
/* codes (n) -> labels (n): nearest centroid by popcount(code xor centroid), ties to
 * the lowest cluster, −1 for invalid rows.  Returns how many labels changed. */
static int64_t ra_hamming_assign(int n, int c, const uint64_t *code, const uint8_t *valid,
                                 const uint64_t *cent, int64_t *lab, int nt)
{
    const RaKernels *K = ra_kernels();
    const int nch = ra_nchunks(n);
    int64_t changed = 0;
    #pragma omp parallel for num_threads(nt) schedule(static) reduction(+:changed)
    for (int k = 0; k < nch; k++) {
        const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
        changed += K->hamming_assign(k * RA_CHUNK, i1, code, valid, cent, c, lab);
    }
    return changed;
}

/* Seeded greedy k-means++ on Hamming distance: cent (c) from the valid codes.  Each
 * step draws ra_trials(c) candidates by D² sampling and keeps the one leaving the least
 * total D² (the first on ties).  Integer weights: every sum is exact.  The D² weights are
 * summed per block of RA_HAMMING_BLOCK rows and per chunk, so a draw walks chunks, then
 * blocks, then rows.  Invalid rows keep dist 0 (weight 0, never drawn).
 * dist (n), partial (ra_nchunks(n) · (ra_trials(c) + 1)), block (ceil(n / RA_HAMMING_BLOCK))
 * are scratch. */
#define RA_HAMMING_BLOCK 64     /* divides RA_CHUNK */
static void ra_hamming_seed(int n, int c, const uint64_t *code, const uint8_t *valid,
                            int64_t nvalid, uint64_t *rng, uint64_t *cent, uint64_t *dist,
                            uint64_t *partial, uint64_t *block, int nt)
{
    const RaKernels *K = ra_kernels();
    const int nch = ra_nchunks(n), L = ra_trials(c);
    uint64_t *pot = partial + nch;          /* (nch, L) candidate potentials per chunk */
    cent[0] = code[ra_kth_valid(n, valid, (int64_t)(ra_rng_next(rng) % (uint64_t)nvalid))];
    for (int i = 0; i < n; i++) dist[i] = valid[i] ? (uint64_t)ra_popcount64(code[i] ^ cent[0]) : 0;
    for (int j = 1; j < c; j++) {
        /* 1. D² weights, summed per block and per chunk */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int k = 0; k < nch; k++) {
            const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
            uint64_t s = 0;
            for (int b0 = k * RA_CHUNK; b0 < i1; b0 += RA_HAMMING_BLOCK) {
                const int b1 = b0 + RA_HAMMING_BLOCK < i1 ? b0 + RA_HAMMING_BLOCK : i1;
                uint64_t t = 0;
                for (int i = b0; i < b1; i++) t += dist[i] * dist[i];
                block[b0 / RA_HAMMING_BLOCK] = t;
                s += t;
            }
            partial[k] = s;
        }
        uint64_t total = 0;
        for (int k = 0; k < nch; k++) total += partial[k];
        int pick;
        if (total == 0) {                   /* every valid row is a centroid already */
            pick = ra_kth_valid(n, valid, (int64_t)(ra_rng_next(rng) % (uint64_t)nvalid));
        } else {
            /* 2. L candidates: first row whose running weight exceeds a uniform target */
            int cand[RA_MAX_TRIALS];
            for (int t = 0; t < L; t++) {
                const uint64_t target = ra_rng_next(rng) % total;
                uint64_t run = 0;
                int k = 0;
                while (run + partial[k] <= target) run += partial[k++];
                int b = k * (RA_CHUNK / RA_HAMMING_BLOCK);
                while (run + block[b] <= target) run += block[b++];
                int i = b * RA_HAMMING_BLOCK;
                for (;; i++) {
                    run += dist[i] * dist[i];
                    if (run > target) break;
                }
                cand[t] = i;
            }
            /* 3. keep the candidate with the least remaining potential */
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int k = 0; k < nch; k++) {
                const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
                for (int t = 0; t < L; t++)
                    pot[(size_t)k * L + t] = K->hamming_potential(k * RA_CHUNK, i1, code, dist,
                                                                  code[cand[t]]);
            }
            uint64_t best = UINT64_MAX;
            pick = cand[0];
            for (int t = 0; t < L; t++) {
                uint64_t s = 0;
                for (int k = 0; k < nch; k++) s += pot[(size_t)k * L + t];
                if (s < best) { best = s; pick = cand[t]; }
            }
        }
        cent[j] = code[pick];
        /* 4. distances to the nearest chosen centroid */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int k = 0; k < nch; k++)
            K->hamming_min(k * RA_CHUNK, (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n, code,
                           cent[j], dist);
    }
}

/* The per-bit majority of the codes rows[0..size): a tied bit is 0.  The 64 per-bit
 * counts are kept bit-sliced (plane[l] holds bit l of every count), so adding a code is
 * a ripple-carry over a few planes instead of a loop over its set bits. */
static uint64_t ra_bit_majority(const uint64_t *code, const int64_t *rows, int64_t size)
{
    uint64_t plane[64] = {0};
    int levels = 0;
    for (int64_t t = 0; t < size; t++) {
        uint64_t carry = code[rows[t]];
        int l = 0;
        for (; carry; l++) {
            const uint64_t both = plane[l] & carry;
            plane[l] ^= carry;
            carry = both;
        }
        levels = l > levels ? l : levels;
    }
    uint64_t m = 0;
    for (int bit = 0; bit < 64; bit++) {
        int64_t ones = 0;
        for (int l = 0; l < levels; l++) ones |= (int64_t)((plane[l] >> bit) & 1) << l;
        if (2 * ones > size) m |= 1ull << bit;
    }
    return m;
}

/* codes (B; n) int64 bit patterns, mask (B; n) uint8 or data == NULL, iters, seed (B)
 * -> labels (B; n) int64 in [-1, c), centroids (B; c) int64 codes */
/* Scratch of one Hamming k-means problem. */
typedef struct {
    uint64_t *code, *dist, *partial, *block, *cent;
    uint8_t *valid, *empty;
    int64_t *lab, *start, *rows, *counts;
} RaHammingWork;

static int ra_hamming_work_alloc(RaHammingWork *w, int n, int c)
{
    const size_t nch = (size_t)ra_nchunks(n);
    w->code = ra_alloc(ra_mul(sizeof(uint64_t), (size_t)n));
    w->dist = ra_alloc(ra_mul(sizeof(uint64_t), (size_t)n));
    w->partial = ra_alloc(ra_mul(sizeof(uint64_t), ra_mul(nch, ra_trials(c) + 1)));
    w->block = ra_alloc(ra_mul(sizeof(uint64_t), (size_t)n / RA_HAMMING_BLOCK + 1));
    w->cent = ra_alloc(ra_mul(sizeof(uint64_t), (size_t)c));
    w->valid = ra_alloc((size_t)n);
    w->empty = ra_alloc((size_t)c);
    w->lab = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    w->start = ra_alloc(ra_mul(sizeof(int64_t), (size_t)c + 1));
    w->rows = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    w->counts = ra_alloc(ra_mul(sizeof(int64_t), ra_mul(nch, c)));
    return (w->code && w->dist && w->partial && w->block && w->cent && w->valid && w->empty && w->lab &&
            w->start && w->rows && w->counts) ? RA_OK : RA_ERR_NOMEM;
}

static void ra_hamming_work_free(RaHammingWork *w)
{
    ra_free(w->code); ra_free(w->dist); ra_free(w->partial); ra_free(w->block);
    ra_free(w->cent);
    ra_free(w->valid); ra_free(w->empty); ra_free(w->lab); ra_free(w->start);
    ra_free(w->rows); ra_free(w->counts);
}

/* One problem b: seeding, Lloyd iterations, labels and centroids written out; nt threads
 * inside (the result does not depend on nt). */
static void ra_hamming_problem(ptrdiff_t b, int n, int c, RaBVec codes, RaBVec mask,
                               RaBVec iters, RaBVec seed, RaBVec labels, RaBVec centroids,
                               RaHammingWork *w, int nt)
{
    uint64_t *code = w->code, *cent = w->cent;
    uint8_t *valid = w->valid;
    int64_t *lab = w->lab, *start = w->start, *rows = w->rows;
    RaVec cv = ra_vec_at(codes, b), mv = ra_vec_at(mask, b);
    const int64_t n_iters = RA_VEC_AT(int64_t, ra_vec_at(iters, b), 0);
    uint64_t rng = RA_VEC_AT(uint64_t, ra_vec_at(seed, b), 0);
    int64_t nvalid = 0;
    for (int i = 0; i < n; i++) {
        code[i] = (uint64_t)RA_VEC_AT(int64_t, cv, i);
        valid[i] = mv.data == NULL || RA_VEC_AT(uint8_t, mv, i);
        nvalid += valid[i];
        lab[i] = -2;                     /* "no label yet": every row counts as changed */
    }
    if (nvalid == 0) {
        memset(cent, 0, sizeof(uint64_t) * (size_t)c);
    } else {
        /* 1. k-means++ seeding */
        ra_hamming_seed(n, c, code, valid, nvalid, &rng, cent, w->dist, w->partial, w->block,
                            nt);
        /* 2. Lloyd: assign, stop at a fixed point, majority-vote update */
        int reseeded = 1;
        for (int64_t it = 0;; it++) {
            const int64_t changed = ra_hamming_assign(n, c, code, valid, cent, lab, nt);
            if (it == n_iters || (changed == 0 && !reseeded)) break;
            ra_group_by_label(n, lab, c, start, rows, w->counts, nt);
            /* per cluster: the per-bit majority of its members */
            #pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
            for (int j = 0; j < c; j++) {
                const int64_t size = start[j + 1] - start[j];
                w->empty[j] = size == 0;
                if (size > 0) cent[j] = ra_bit_majority(code, rows + start[j], size);
            }
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
    for (int j = 0; j < c; j++) RA_VEC_AT(int64_t, ov, j) = (int64_t)cent[j];
}

int ra_hamming_kmeans(ptrdiff_t B, int n, int c, RaBVec codes, RaBVec mask, RaBVec iters,
                      RaBVec seed, RaBVec labels, RaBVec centroids)
{
    const int nt = ra_num_threads();
    /* A problem of one row chunk has no parallelism inside: run whole problems in
       parallel then, one per thread (same results: each problem is computed alike). */
    const int by_problem = nt > 1 && B > 1 && ra_nchunks(n) == 1;
    const int workers = by_problem ? (B < nt ? (int)B : nt) : 1;
    RaHammingWork *work = calloc((size_t)workers, sizeof(RaHammingWork));
    int st = work ? RA_OK : RA_ERR_NOMEM;
    for (int t = 0; t < workers && st == RA_OK; t++) st = ra_hamming_work_alloc(&work[t], n, c);
    if (st == RA_OK && by_problem) {
        #pragma omp parallel for num_threads(workers) schedule(dynamic, 1)
        for (ptrdiff_t b = 0; b < B; b++)
            ra_hamming_problem(b, n, c, codes, mask, iters, seed, labels, centroids,
                               &work[ra_thread_id()], 1);
    } else if (st == RA_OK) {
        for (ptrdiff_t b = 0; b < B; b++)
            ra_hamming_problem(b, n, c, codes, mask, iters, seed, labels, centroids, &work[0], nt);
    }
    for (int t = 0; work && t < workers; t++) ra_hamming_work_free(&work[t]);
    free(work);
    return st;
}
