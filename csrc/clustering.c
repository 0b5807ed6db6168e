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
#define RA_FUSE_SCORES (1 << 20)   /* assign_top stores fewer scores (n·c) than this */

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

/* Clusters per top_members work unit: enough units for every thread, a multiple of 16
 * (whole vectors on every ISA), at most 256. */
static inline int ra_top_group(int c, int nt)
{
    int cb = (c + nt - 1) / nt;
    cb = (cb + 15) / 16 * 16;
    if (cb > 256) cb = 256;
    return cb > c ? c : cb;
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
    RA_PARALLEL_FOR(nt, k, nch, schedule(static),
        int64_t *cnt = counts + (size_t)k * c;
        memset(cnt, 0, sizeof(int64_t) * (size_t)c);
        const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
        for (int i = k * RA_CHUNK; i < i1; i++)
            if (labels[i] >= 0) cnt[labels[i]]++;);
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
    RA_PARALLEL_FOR(nt, k, nch, schedule(static),
        int64_t *off = counts + (size_t)k * c;
        const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
        for (int i = k * RA_CHUNK; i < i1; i++)
            if (labels[i] >= 0) members[off[labels[i]]++] = i;);
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

/* Scratch of one Hamming k-means problem (code words of up to 64 bits: code and cent are
 * used as arrays of the problem's word type; dist holds distances, 32-bit). */
typedef struct {
    uint64_t *code, *partial, *block, *cent;
    uint32_t *dist;
    uint8_t *valid, *empty;
    int64_t *lab, *start, *rows, *counts;
    /* the bit-sliced assign's planes and per-centroid inputs (kernels.h), when c allows
       it, the table does not put the word-wise assign first and they could be had (else
       NULL: the word-wise assign, the same labels) */
    void *planes;
    int32_t *inputs;
} RaHammingWork;

static int ra_hamming_work_alloc(RaHammingWork *w, int n, int c)
{
    const size_t nch = (size_t)ra_nchunks(n);
    w->code = ra_alloc(ra_mul(sizeof(uint64_t), (size_t)n));
    w->dist = ra_alloc(ra_mul(sizeof(uint32_t), (size_t)n));
    w->partial = ra_alloc(ra_mul(sizeof(uint64_t), ra_mul(nch, ra_trials(c) + 1)));
    w->block = ra_alloc(ra_mul(sizeof(uint64_t), (size_t)n / RA_HAMMING_BLOCK + 1));
    w->cent = ra_alloc(ra_mul(sizeof(uint64_t), (size_t)c));
    w->valid = ra_alloc((size_t)n);
    w->empty = ra_alloc((size_t)c);
    w->lab = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    w->start = ra_alloc(ra_mul(sizeof(int64_t), (size_t)c + 1));
    w->rows = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    w->counts = ra_alloc(ra_mul(sizeof(int64_t), ra_mul(nch, c)));
    w->planes = NULL;
    w->inputs = NULL;
    if (c <= RA_SLICE_MAX_C && !ra_kernels()->hamming64.words_first) {
        w->planes = ra_alloc(ra_slice_bytes(n, 64));
        w->inputs = ra_alloc(ra_mul(sizeof(int32_t), ra_mul((size_t)c, RA_SLICE_INPUTS(64))));
    }
    return (w->code && w->dist && w->partial && w->block && w->cent && w->valid && w->empty &&
            w->lab && w->start && w->rows && w->counts) ? RA_OK : RA_ERR_NOMEM;
}

static void ra_hamming_work_free(RaHammingWork *w)
{
    ra_free(w->code); ra_free(w->dist); ra_free(w->partial); ra_free(w->block);
    ra_free(w->cent); ra_free(w->valid); ra_free(w->empty); ra_free(w->lab);
    ra_free(w->start); ra_free(w->rows); ra_free(w->counts);
    ra_free(w->planes); ra_free(w->inputs);
}

/* One problem in 64-bit words, and in 32-bit words when every code fits (and the 32-bit
 * assign's packed keys hold c): the same results, twice the lanes per vector. */
#define RA_TYPED_BODY "hamming_body.h"
#define RA_TYPED_WORDS
#include "typed.h"

/* codes (B; n) int64 bit patterns, mask (B; n) uint8 or data == NULL, iters, seed (B)
 * -> labels (B; n) int64 in [-1, c), centroids (B; c) int64 codes.  Problem b with nt
 * threads inside (the result does not depend on nt). */
static void ra_hamming_problem(ptrdiff_t b, int n, int c, RaBVec codes, RaBVec mask,
                               RaBVec iters, RaBVec seed, RaBVec labels, RaBVec centroids,
                               RaHammingWork *w, int nt)
{
    RaVec cv = ra_vec_at(codes, b);
    uint64_t bits = 0;
    for (int i = 0; i < n; i++) bits |= (uint64_t)RA_VEC_AT(int64_t, cv, i);
    if (bits >> 32 || c > (1 << RA_HAMMING_KEY_BITS32))
        ra_hamming_fit64(b, n, c, codes, mask, iters, seed, labels, centroids, w, nt);
    else
        ra_hamming_fit32(b, n, c, codes, mask, iters, seed, labels, centroids, w, nt);
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
