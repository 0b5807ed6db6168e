/* clustering_body.h — typed routing-decision kernels; included by clustering.c per dtype
 * with T, IT (the signed integer of T's width), KT (kernel table type), KSEL (f32 | f64)
 * and FN(name) = name##_<suffix>. */

/* ------------------------------------------------------------------ building blocks */
/* Pack a (c, d) strided matrix transposed into ct (d, c) contiguous. */
static void FN(pack_transposed)(RaMat m, int c, int d, T *ct)
{
    FN(ra_gather)(m, NULL, 0, c, d, 1, 1, ct, c);
}

/* One thread's scratch of assign_rows (and lsh_hash, with c = bits): x block (RA_ROWS, d),
 * scores (RA_ROWS, c), best (RA_ROWS), labels (RA_ROWS) int64. */
typedef struct { T *x, *scores, *best; int64_t *arg; } FN(AssignTile);

static void FN(assign_tile)(RaArena *a, int d, int c, FN(AssignTile) *t)
{
    t->x = RA_TAKE(a, T, ra_mul(RA_ROWS, d));
    t->scores = RA_TAKE(a, T, ra_mul(RA_ROWS, c));
    t->best = RA_TAKE(a, T, RA_ROWS);
    t->arg = RA_TAKE(a, int64_t, RA_ROWS);
}

static size_t FN(assign_scratch)(int d, int c)
{
    RaArena a = {NULL, 0};
    FN(AssignTile) t;
    FN(assign_tile)(&a, d, c, &t);
    return a.used;
}

#include "norms_body.h"

/* x (n, d) strided, ct (d, c) = centroidsᵀ  ->  lab (n): argmax_j x_i·μ_j (−1 for rows
 * with mask False; mask.data may be NULL).  Blocks of RA_ROWS rows through the gemm
 * kernel.  With xt set (the rows transposed in blocks, (nb, d, RA_ROWS), from
 * seed_transpose; x unused, scores.data NULL), ct holds the centroids (c, d) themselves
 * and each block's products come as (c, RA_ROWS), reduced down the columns by argmax_cols
 * (the same labels: the same products, no per-row horizontal reduction).  Scratch holds
 * nt slices of per_thread bytes: x block (RA_ROWS, d), scores (RA_ROWS, c).  When
 * scores.data / best.data are set, the scores (n, c) and each row's best score (n; NaN
 * for a row labelled −1) are written there too (the gemm writes straight into scores when
 * its rows are contiguous).  With count != 0, returns how many labels differ from lab's
 * previous contents (else 0, and lab is only written). */
static int64_t FN(assign_rows)(const KT *K, RaMat x, const T *xt, RaVec mask, int n, int d,
                               const T *ct, int c, RaVec lab, RaMat scores, RaVec best,
                               int count, char *scratch, size_t per_thread, int nt)
{
    const int nblk = (n + RA_ROWS - 1) / RA_ROWS;
    const int direct = scores.data && scores.s1 == (ptrdiff_t)sizeof(T) &&
                       scores.s0 % (ptrdiff_t)sizeof(T) == 0;
    int64_t changed = 0;
    #pragma omp parallel for num_threads(nt) schedule(static) reduction(+:changed)
    for (int blk = 0; blk < nblk; blk++) {
        const int i0 = blk * RA_ROWS, rows = n - i0 < RA_ROWS ? n - i0 : RA_ROWS;
        FN(AssignTile) t;
        FN(assign_tile)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, d, c, &t);
        T *xs = t.x, *s = t.scores, *top = t.best;
        int64_t *arg = t.arg;
        ptrdiff_t lds = c, ldx;
        if (xt) {              /* S (c, RA_ROWS) = centroids · (block rows)ᵀ */
            K->gemm(c, rows, d, ct, d, xt + (size_t)blk * d * RA_ROWS, RA_ROWS, s, RA_ROWS, 0);
            K->argmax_cols(c, rows, s, RA_ROWS, arg, top);
        } else {
            const T *xr = FN(ra_rows)(x, i0, rows, d, xs, &ldx);
            if (direct) {      /* the product straight into the scores output */
                s = (T *)(scores.data + (ptrdiff_t)i0 * scores.s0);
                lds = scores.s0 / (ptrdiff_t)sizeof(T);
            }
            K->gemm(rows, c, d, xr, ldx, ct, c, s, lds, 0);
            K->argmax_rows(rows, c, s, lds, arg, top);
        }
        for (int r = 0; r < rows; r++) {
            const int i = i0 + r;
            const int masked = mask.data && !RA_VEC_AT(uint8_t, mask, i);
            const int64_t l = masked ? -1 : arg[r];
            if (count) changed += RA_VEC_AT(int64_t, lab, i) != l;
            RA_VEC_AT(int64_t, lab, i) = l;
            if (scores.data && !direct) {
                const T *si = s + (size_t)r * c;
                if (scores.s1 == (ptrdiff_t)sizeof(T))
                    memcpy(scores.data + (ptrdiff_t)i * scores.s0, si, sizeof(T) * (size_t)c);
                else
                    for (int j = 0; j < c; j++) RA_MAT_AT(T, scores, i, j) = si[j];
            }
            if (best.data) RA_VEC_AT(T, best, i) = masked ? (T)NAN : top[r];
        }
    }
    return changed;
}


/* ------------------------------------------------------------------ assign_clusters */
/* x (B; n, d), centroids (B; c, d) -> labels (B; n) int64 */
int FN(ra_assign_clusters)(ptrdiff_t B, int n, int d, int c, RaBMat x, RaBMat centroids,
                           RaBVec labels, RaBMat scores, RaBVec best)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    const size_t per_thread = FN(assign_scratch)(d, c);
    T *ct = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)d, c)));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!ct || !scratch) { ra_free(ct); ra_free(scratch); return RA_ERR_NOMEM; }
    const RaVec no_mask = {NULL, 0};
    for (ptrdiff_t b = 0; b < B; b++) {
        FN(pack_transposed)(ra_mat_at(centroids, b), c, d, ct);
        RaMat sb = {scores.data ? scores.data + b * scores.sb : NULL, scores.s0, scores.s1};
        FN(assign_rows)(K, ra_mat_at(x, b), NULL, no_mask, n, d, ct, c, ra_vec_at(labels, b), sb,
                        ra_vec_at(best, b), 0, scratch, per_thread, nt);
    }
    ra_free(ct);
    ra_free(scratch);
    return RA_OK;
}

/* ------------------------------------------------------------------ spherical_kmeans */
/* The D² weight of a row whose largest cosine so far is best: (1 − best)² for a valid
 * row with best < 1, else 0 (NaN: 0) — seed_potential's term, one row at a time. */
static inline double FN(seed_weight)(T best, uint8_t valid)
{
    const double x = 1.0 - (double)best;
    return ((valid != 0) & (x > 0)) ? x * x : 0.0;
}

/* The unit rows xn (n, d) as blocks of RA_ROWS rows, each block transposed:
 * xt (nb, d, RA_ROWS), nb = ceil(n / RA_ROWS), the last block zero-padded — the
 * right-hand operand of the seeding gemm, read sequentially. */
static void FN(seed_transpose)(int n, int d, const T *xn, T *xt, int nt)
{
    const int nb = (n + RA_ROWS - 1) / RA_ROWS;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int blk = 0; blk < nb; blk++) {
        T *o = xt + (size_t)blk * d * RA_ROWS;
        for (int r = 0; r < RA_ROWS; r++) {
            const int i = blk * RA_ROWS + r;
            for (int u = 0; u < d; u++) o[(size_t)u * RA_ROWS + r] = i < n ? xn[(size_t)i * d + u] : 0;
        }
    }
}

/* Row of the D² sample: the first row whose running weight exceeds target (whole
 * chunks skipped by their sums, then whole blocks of RA_ROWS rows by theirs, the rows'
 * weights computed from best as they are read); rounding past the end: the last row of
 * positive weight. */
static int FN(seed_sample)(int n, const T *best, const uint8_t *valid, const double *chunk_sum,
                           const double *block_sum, double target)
{
    const int nch = ra_nchunks(n), nb = (n + RA_ROWS - 1) / RA_ROWS;
    double run = 0;
    int k = 0, blk;
    while (k < nch - 1 && run + chunk_sum[k] <= target) run += chunk_sum[k++];
    for (blk = k * (RA_CHUNK / RA_ROWS); blk < nb - 1 && run + block_sum[blk] <= target; blk++)
        run += block_sum[blk];
    for (int i = blk * RA_ROWS; i < n; i++) {
        const double w = FN(seed_weight)(best[i], valid[i]);
        run += w;
        if (w > 0 && run > target) return i;
    }
    for (int i = n - 1; i >= 0; i--)
        if (FN(seed_weight)(best[i], valid[i]) > 0) return i;
    return -1;
}

/* Seeded greedy k-means++ on the unit rows xn (n, d): mu (c, d) := c rows of xn.  The
 * first is uniform; each next one is the best of L = ra_trials(c) candidates drawn with
 * probability ∝ D², D = 1 − (largest cos to the centroids so far): the one leaving the
 * least total D² (the first on ties).  Scratch: best (n), partial ((nch + nb) · (L + 1),
 * nch = ra_nchunks(n), nb = ceil(n / RA_ROWS): the weights' and the candidates' sums per
 * chunk and per block), cands (L, d), xt (nb, d, RA_ROWS) from seed_transpose and cos
 * (nb, L, RA_ROWS): the candidates' cosines, one (L, d) × (d, RA_ROWS) gemm per block, kept so
 * that the winner's column updates best without another pass over xn. */
static void FN(spherical_seed)(const KT *K, int n, int d, int c, const T *xn,
                               const uint8_t *valid, int64_t nvalid, uint64_t *rng, T *mu,
                               T *best, double *partial, T *cands, const T *xt, T *cos, int nt)
{
    const int nch = ra_nchunks(n), L = ra_trials(c), nb = (n + RA_ROWS - 1) / RA_ROWS;
    double *pot = partial + nch;            /* (nch, L) candidate potentials per chunk */
    double *block_w = pot + (size_t)nch * L;         /* (nb) the weights' sums per block */
    double *block_pot = block_w + nb;                /* (nb, L) the candidates' per block */
    for (int i = 0; i < n; i++) best[i] = -INFINITY;
    for (int j = 0; j < c; j++) {
        int pick = -1, won = -1;
        if (j > 0) {
            /* 1. the weights' sums per chunk and per block (step 4 of the last
                  centroid), chunks combined in order */
            double total = 0;
            for (int k = 0; k < nch; k++) total += partial[k];
            if (total > 0) {
                /* 2. L candidates by D² sampling */
                int cand[RA_MAX_TRIALS];
                for (int t = 0; t < L; t++) {
                    cand[t] = FN(seed_sample)(n, best, valid, partial, block_w,
                                              ra_rng_unit(rng) * total);
                    memcpy(cands + (size_t)t * d, xn + (size_t)cand[t] * d, sizeof(T) * (size_t)d);
                }
                /* 3. keep the candidate with the least remaining potential: each
                      candidate's sum per block of RA_ROWS rows (K->seed_potential, kept
                      for step 4), blocks in order per chunk, chunks combined in order */
                #pragma omp parallel for num_threads(nt) schedule(static)
                for (int k = 0; k < nch; k++) {
                    const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
                    double s[RA_MAX_TRIALS] = {0};
                    for (int i0 = k * RA_CHUNK; i0 < i1; i0 += RA_ROWS) {
                        const int rows = i1 - i0 < RA_ROWS ? i1 - i0 : RA_ROWS;
                        const int blk = i0 / RA_ROWS;
                        T *cb = cos + (size_t)blk * L * RA_ROWS;
                        double *bp = block_pot + (size_t)blk * L;
                        K->gemm(L, RA_ROWS, d, cands, d, xt + (size_t)blk * d * RA_ROWS,
                                RA_ROWS, cb, RA_ROWS, 0);
                        for (int t = 0; t < L; t++) bp[t] = 0;
                        K->seed_potential(rows, L, cb, RA_ROWS, best + i0, valid + i0, bp);
                        for (int t = 0; t < L; t++) s[t] += bp[t];
                    }
                    for (int t = 0; t < L; t++) pot[(size_t)k * L + t] = s[t];
                }
                double least = INFINITY;
                for (int t = 0; t < L; t++) {
                    double s = 0;
                    for (int k = 0; k < nch; k++) s += pot[(size_t)k * L + t];
                    if (pick < 0 || s < least) { least = s; pick = cand[t]; won = t; }
                }
            }
        }
        if (pick < 0)   /* first centroid, or every remaining weight is 0: uniform */
            pick = ra_kth_valid(n, valid, (int64_t)(ra_rng_next(rng) % (uint64_t)nvalid));
        T *m = mu + (size_t)j * d;
        memcpy(m, xn + (size_t)pick * d, sizeof(T) * (size_t)d);
        /* 4. best cos against the new centroid: the winner's gemm column, or (a uniform
              pick) the dot products put in column 0; the next draw's weight sums per
              block and per chunk: the winner's potentials, or that column's */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int k = 0; k < nch; k++) {
            const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
            double s = 0;
            for (int i0 = k * RA_CHUNK; i0 < i1; i0 += RA_ROWS) {
                const int rows = i1 - i0 < RA_ROWS ? i1 - i0 : RA_ROWS;
                T *cb = cos + (size_t)(i0 / RA_ROWS) * L * RA_ROWS, *bb = best + i0;
                double *bw = block_w + i0 / RA_ROWS;
                if (won < 0) {
                    for (int r = 0; r < rows; r++)
                        cb[r] = FN(ra_dot)((const char *)(xn + (size_t)(i0 + r) * d), sizeof(T),
                                           (const char *)m, sizeof(T), d);
                    *bw = 0;
                    K->seed_potential(rows, 1, cb, RA_ROWS, bb, valid + i0, bw);
                } else {
                    *bw = block_pot[(size_t)(i0 / RA_ROWS) * L + won];
                }
                s += *bw;
                const T *col = cb + (size_t)(won < 0 ? 0 : won) * RA_ROWS;
                for (int r = 0; r < rows; r++) bb[r] = col[r] > bb[r] ? col[r] : bb[r];
            }
            partial[k] = s;
        }
    }
}

/* mu_j := normalised sum of the rows xn[members of j] (in row order) for every cluster
 * with members and a non-zero sum; other clusters keep their centroid.  The member rows
 * are hinted RA_PREFETCH_ROWS members ahead: gathered unhinted, every add waited on its
 * row. */
static void FN(spherical_update)(int d, int c, const T *xn, const int64_t *start,
                                 const int64_t *rows, T *mu, T *sums, int nt)
{
    const size_t row_bytes = sizeof(T) * (size_t)d;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
    for (int j = 0; j < c; j++) {
        if (start[j + 1] == start[j]) continue;
        T *s = sums + (size_t)j * d;
        memset(s, 0, sizeof(T) * (size_t)d);
        for (int64_t t = start[j]; t < start[j + 1]; t++) {
            if (t + RA_PREFETCH_ROWS < start[j + 1]) {
                const char *ahead = (const char *)(xn + (size_t)rows[t + RA_PREFETCH_ROWS] * d);
                for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off);
            }
            const T *xi = xn + (size_t)rows[t] * d;
            for (int u = 0; u < d; u++) s[u] += xi[u];
        }
        T sq = 0;
        for (int u = 0; u < d; u++) sq += s[u] * s[u];
        sq = FN(safe_sq)(s, d, sq);
        if (!(sq > 0)) continue;
        const T inv = 1 / sqrt(sq);
        for (int u = 0; u < d; u++) mu[(size_t)j * d + u] = s[u] * inv;
    }
}

/* x (B; n, d), mask (B; n) uint8 or data == NULL, init (B; c, d) when use_init,
 * iters, seed (B)  ->  centroids (B; c, d) */
int FN(ra_spherical_kmeans)(ptrdiff_t B, int n, int d, int c, RaBMat x, RaBVec mask,
                            RaBMat init, int use_init, RaBVec iters, RaBVec seed,
                            RaBMat centroids)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads(), nch = ra_nchunks(n), nb = (n + RA_ROWS - 1) / RA_ROWS;
    const size_t nd = ra_mul((size_t)n, d), cd = ra_mul((size_t)c, d);
    const size_t padded = ra_mul((size_t)nb, RA_ROWS);         /* rows in whole blocks */
    const size_t per_thread = FN(assign_scratch)(d, c);
    T *xn = ra_alloc(ra_mul(sizeof(T), nd));
    T *mu = ra_alloc(ra_mul(sizeof(T), cd));
    T *sums = ra_alloc(ra_mul(sizeof(T), cd));
    T *best = ra_alloc(ra_mul(sizeof(T), (size_t)n));
    double *partial = ra_alloc(ra_mul(sizeof(double), ra_mul((size_t)nch + nb, ra_trials(c) + 1)));
    uint8_t *valid = ra_alloc((size_t)n);
    int64_t *lab = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *start = ra_alloc(ra_mul(sizeof(int64_t), (size_t)c + 1));
    int64_t *rows = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *counts = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)nch, c)));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    T *seed_cands = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)d, RA_MAX_TRIALS)));
    int64_t most_iters = 0;                            /* xt is needed by seeding or Lloyd */
    for (ptrdiff_t b = 0; b < B; b++) {
        const int64_t it = RA_VEC_AT(int64_t, ra_vec_at(iters, b), 0);
        most_iters = it > most_iters ? it : most_iters;
    }
    T *xt = ra_alloc(ra_mul(sizeof(T), ra_mul(use_init && most_iters == 0 ? 0 : padded, d)));
    T *seed_cos = ra_alloc(ra_mul(sizeof(T), ra_mul(use_init ? 0 : padded, ra_trials(c))));
    const RaMat no_x = {NULL, 0, 0}, no_scores = {NULL, 0, 0};
    const RaVec lab_view = {(char *)lab, sizeof(int64_t)}, valid_view = {(char *)valid, 1};
    const RaVec no_best = {NULL, 0};
    int st = (xn && mu && sums && best && partial && valid && lab && start && rows &&
              counts && scratch && seed_cands && xt && seed_cos) ? RA_OK : RA_ERR_NOMEM;

    for (ptrdiff_t b = 0; b < B && st == RA_OK; b++) {
        RaMat xb = ra_mat_at(x, b);
        RaVec mb = ra_vec_at(mask, b);
        const int64_t n_iters = RA_VEC_AT(int64_t, ra_vec_at(iters, b), 0);
        uint64_t rng = RA_VEC_AT(uint64_t, ra_vec_at(seed, b), 0);
        /* 1. unit rows (a zero row stays zero); masked rows, and rows with a NaN or an
              infinity, never take part */
        fexcept_t fe_saved;
        ra_lift_worker_flags(nt, FE_OVERFLOW);   /* the problems before: kept */
        fegetexceptflag(&fe_saved, FE_OVERFLOW);
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int i = 0; i < n; i++) {
            T *o = xn + (size_t)i * d;
            T sq = 0;
            for (int u = 0; u < d; u++) {
                o[u] = RA_MAT_AT(T, xb, i, u);
                sq += o[u] * o[u];
            }
            sq = FN(safe_sq)(o, d, sq);                  /* huge or tiny rows: rescaled */
            const T inv = sq > 0 ? 1 / sqrt(sq) : 0;
            for (int u = 0; u < d; u++) o[u] *= inv;
            valid[i] = (mb.data == NULL || RA_VEC_AT(uint8_t, mb, i)) && isfinite(sq);
            lab[i] = -2;                     /* "no label yet": every row counts as changed */
        }
        (void)ra_worker_flags(nt, FE_OVERFLOW);
        fesetexceptflag(&fe_saved, FE_OVERFLOW);
        int64_t nvalid = 0;
        for (int i = 0; i < n; i++) nvalid += valid[i];
        /* 2. the rows transposed in blocks (the operand of the seeding's and the Lloyd
              assign's products); initial centroids: given, or seeded k-means++ (nothing
              to seed from: zeros) */
        if (nvalid > 0 && (!use_init || n_iters > 0)) FN(seed_transpose)(n, d, xn, xt, nt);
        if (use_init) {
            RaMat ib = ra_mat_at(init, b);
            for (int j = 0; j < c; j++)
                for (int u = 0; u < d; u++) mu[(size_t)j * d + u] = RA_MAT_AT(T, ib, j, u);
        } else if (nvalid > 0) {
            FN(spherical_seed)(K, n, d, c, xn, valid, nvalid, &rng, mu, best, partial,
                               seed_cands, xt, seed_cos, nt);
        } else {
            memset(mu, 0, sizeof(T) * cd);
        }
        /* 3. Lloyd iterations; unchanged labels mean a fixed point */
        for (int64_t it = 0; it < n_iters && nvalid > 0; it++) {
            const int64_t changed = FN(assign_rows)(K, no_x, xt, valid_view, n, d, mu, c,
                                                    lab_view, no_scores, no_best, 1, scratch,
                                                    per_thread, nt);
            if (changed == 0) break;
            ra_group_by_label(n, lab, c, start, rows, counts, nt);
            FN(spherical_update)(d, c, xn, start, rows, mu, sums, nt);
        }
        RaMat ob = ra_mat_at(centroids, b);
        for (int j = 0; j < c; j++)
            for (int u = 0; u < d; u++) RA_MAT_AT(T, ob, j, u) = mu[(size_t)j * d + u];
    }
    ra_free(xn); ra_free(mu); ra_free(sums); ra_free(best); ra_free(partial);
    ra_free(valid); ra_free(lab); ra_free(start); ra_free(rows); ra_free(counts);
    ra_free(scratch); ra_free(seed_cands); ra_free(xt); ra_free(seed_cos);
    return st;
}

/* ------------------------------------------------------------------ update_centroids */
/* centroids (B; c, d), x (B; n, d), labels (B; n) in [-1, c), mask (B; n) uint8,
 * decay (B)  ->  out (B; c, d): μ_c ← normalise(decay·μ_c + (1 − decay)·mean of x rows
 * labelled c, mask True); a cluster with no such row is copied unchanged. */
/* Row blocks of update_centroids: at most RA_UPDATE_BLOCKS, of at least RA_CHUNK rows —
 * a function of n only, so the sums' order never depends on the thread count. */
#define RA_UPDATE_BLOCKS 16
static inline int FN(update_blocks)(int n)
{
    const int k = ra_nchunks(n);
    return k < RA_UPDATE_BLOCKS ? (k > 0 ? k : 1) : RA_UPDATE_BLOCKS;
}

/* Problem b with `parts` threads: each row block's rows are summed per cluster in row
 * order into the block's partial (blocks in parallel), then each cluster's partials are
 * added in block order (clusters in parallel).  lab (n), sum (blocks, c, d), size
 * (blocks, c) are scratch; sum's first block becomes the new centroids. */
static int FN(update_problem)(ptrdiff_t b, int n, int d, int c, RaBMat centroids, RaBMat x,
                              RaBVec labels, RaBVec mask, RaBVec decay, RaBMat out,
                              int64_t *lab, T *sum, int64_t *size, int parts)
{
    const int st = ra_read_labels(n, c, ra_vec_at(labels, b), ra_vec_at(mask, b), lab);
    if (st != RA_OK) return st;
    RaMat cb = ra_mat_at(centroids, b), xb = ra_mat_at(x, b), ob = ra_mat_at(out, b);
    const T dec = RA_VEC_AT(T, ra_vec_at(decay, b), 0);
    const int nb = FN(update_blocks)(n);
    const size_t cd = (size_t)c * d;
    #pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
    for (int blk = 0; blk < nb; blk++) {
        const int i0 = (int)((int64_t)n * blk / nb), i1 = (int)((int64_t)n * (blk + 1) / nb);
        T *part = sum + (size_t)blk * cd;
        int64_t *cnt = size + (size_t)blk * c;
        memset(part, 0, sizeof(T) * cd);
        memset(cnt, 0, sizeof(int64_t) * (size_t)c);
        for (int i = i0; i < i1; i++) {
            const int64_t l = lab[i];
            if (l < 0) continue;
            FN(ra_add_row)(part + (size_t)l * d, 1, xb, i, d);
            cnt[l]++;
        }
    }
    #pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
    for (int j = 0; j < c; j++) {
        T *v = sum + (size_t)j * d;     /* becomes the new centroid in place */
        int64_t count = size[j];
        for (int blk = 1; blk < nb; blk++) {
            const T *p = sum + (size_t)blk * cd + (size_t)j * d;
            for (int u = 0; u < d; u++) v[u] += p[u];
            count += size[(size_t)blk * c + j];
        }
        if (count == 0) {
            for (int u = 0; u < d; u++) v[u] = RA_MAT_AT(T, cb, j, u);
            continue;
        }
        for (int u = 0; u < d; u++)
            v[u] = dec * RA_MAT_AT(T, cb, j, u) + (1 - dec) * (v[u] / (T)count);
        fexcept_t fe_saved;
        fegetexceptflag(&fe_saved, FE_OVERFLOW);
        T sq = 0;
        for (int u = 0; u < d; u++) sq += v[u] * v[u];
        sq = FN(safe_sq)(v, d, sq);
        fesetexceptflag(&fe_saved, FE_OVERFLOW);
        const T inv = sq > 0 ? 1 / sqrt(sq) : 1;
        for (int u = 0; u < d; u++) v[u] *= inv;
    }
    /* written after every read: out may alias centroids */
    for (int j = 0; j < c; j++)
        for (int u = 0; u < d; u++) RA_MAT_AT(T, ob, j, u) = sum[(size_t)j * d + u];
    return RA_OK;
}

/* Several problems: one per thread (its row blocks and clusters in turn); one problem:
 * its row blocks, then its clusters, split among the threads.  The same sums either way. */
int FN(ra_update_centroids)(ptrdiff_t B, int n, int d, int c, RaBMat centroids, RaBMat x,
                            RaBVec labels, RaBVec mask, RaBVec decay, RaBMat out)
{
    const int nt = ra_num_threads();
    const int workers = B > 1 ? (B < nt ? (int)B : nt) : 1, parts = B > 1 ? 1 : nt;
    const size_t nb = (size_t)FN(update_blocks)(n);     /* row blocks per problem */
    int64_t *lab = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)n, workers)));
    T *sum = ra_alloc(ra_mul(sizeof(T), ra_mul(ra_mul(nb * c, (size_t)d), workers)));
    int64_t *size = ra_alloc(ra_mul(sizeof(int64_t), ra_mul(nb * c, workers)));
    int st = (lab && sum && size) ? RA_OK : RA_ERR_NOMEM;
    if (st == RA_OK && B == 1) {
        /* called directly: from inside even an inactive parallel region, the clusters'
           region would be a nested one, whose thread team libgomp builds afresh each time */
        st = FN(update_problem)(0, n, d, c, centroids, x, labels, mask, decay, out, lab, sum,
                                size, parts);
    } else if (st == RA_OK) {
        #pragma omp parallel for num_threads(workers) schedule(dynamic, 1) if (workers > 1)
        for (ptrdiff_t b = 0; b < B; b++) {
            const int w = ra_thread_id();
            const int r = FN(update_problem)(b, n, d, c, centroids, x, labels, mask, decay, out,
                                             lab + (size_t)w * n, sum + (size_t)w * nb * c * d,
                                             size + (size_t)w * nb * c, parts);
            if (r != RA_OK) {
                #pragma omp atomic write
                st = r;
            }
        }
    }
    ra_free(lab); ra_free(sum); ra_free(size);
    return st;
}

/* ------------------------------------------------------------------ commitment_loss */
/* x (B; n, d), centroids (B; c, d), labels (B; n) in [-1, c), mask (B; n) uint8
 *  ->  loss (B): mean over rows with label >= 0 and mask True of ‖x_i − μ_label‖²
 *  (0 when there is no such row).  Chunk partials summed in chunk order. */
int FN(ra_commitment_loss)(ptrdiff_t B, int n, int d, int c, RaBMat x, RaBMat centroids,
                           RaBVec labels, RaBVec mask, RaBVec loss)
{
    const int nt = ra_num_threads(), nch = ra_nchunks(n);
    (void)nt;   /* used only by the OpenMP pragma */
    int64_t *lab = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    T *partial = ra_alloc(ra_mul(sizeof(T), (size_t)nch));
    int st = (lab && partial) ? RA_OK : RA_ERR_NOMEM;
    for (ptrdiff_t b = 0; b < B && st == RA_OK; b++) {
        st = ra_read_labels(n, c, ra_vec_at(labels, b), ra_vec_at(mask, b), lab);
        if (st != RA_OK) break;
        RaMat xb = ra_mat_at(x, b), cb = ra_mat_at(centroids, b);
        int64_t count = 0;
        for (int i = 0; i < n; i++) count += lab[i] >= 0;
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int k = 0; k < nch; k++) {
            const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
            T s = 0;
            for (int i = k * RA_CHUNK; i < i1; i++) {
                if (lab[i] < 0) continue;
                for (int u = 0; u < d; u++) {
                    const T diff = RA_MAT_AT(T, xb, i, u) - RA_MAT_AT(T, cb, lab[i], u);
                    s += diff * diff;
                }
            }
            partial[k] = s;
        }
        T total = 0;
        for (int k = 0; k < nch; k++) total += partial[k];
        RA_VEC_AT(T, ra_vec_at(loss, b), 0) = count ? total / (T)count : 0;
    }
    ra_free(lab); ra_free(partial);
    return st;
}

#include "top_members_body.h"

/* ------------------------------------------------------------------ lsh_hash */
/* x (B; n, d), planes (B; bits, d + 1)  ->  codes (B; n) int64: bit b set iff
 * x·planes[b, :d] > planes[b, d]; one gemm per block of rows, then the threshold. */
int FN(ra_lsh_hash)(ptrdiff_t B, int n, int d, int bits, RaBMat x, RaBMat planes,
                    RaBVec codes)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    const int nblk = (n + RA_ROWS - 1) / RA_ROWS;
    /* shared pack per problem: Pᵀ (d, BP) with zero columns up to BP = bits rounded up to
       16 (whole vectors on every ISA: no scalar tail in the gemm or the threshold), and
       the thresholds (BP), +inf past `bits` (so those bits stay 0) */
    const int bp = (bits + 15) / 16 * 16;
    const size_t per_problem = ra_round_up(ra_mul(sizeof(T), ra_mul((size_t)d + 1, bp)));
    const size_t per_thread = FN(assign_scratch)(d, bp);
    char *packs = ra_alloc(ra_mul(per_problem, (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!packs || !scratch) { ra_free(packs); ra_free(scratch); return RA_ERR_NOMEM; }

    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        T *pt = (T *)(packs + b * per_problem), *thr = pt + (size_t)d * bp;
        RaMat p = ra_mat_at(planes, b);
        for (int u = 0; u < d; u++)
            for (int k = 0; k < bp; k++) pt[(size_t)u * bp + k] = k < bits ? RA_MAT_AT(T, p, k, u) : 0;
        for (int k = 0; k < bp; k++) thr[k] = k < bits ? RA_MAT_AT(T, p, k, d) : (T)INFINITY;
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * nblk; unit++) {
        const ptrdiff_t b = unit / nblk;
        const int i0 = (int)(unit % nblk) * RA_ROWS, rows = n - i0 < RA_ROWS ? n - i0 : RA_ROWS;
        const T *pt = (const T *)(packs + b * per_problem), *thr = pt + (size_t)d * bp;
        FN(AssignTile) t;
        FN(assign_tile)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, d, bp, &t);
        T *xs = t.x, *s = t.scores;
        RaVec out = ra_vec_at(codes, b);
        ptrdiff_t ldx;
        const T *xr = FN(ra_rows)(ra_mat_at(x, b), i0, rows, d, xs, &ldx);
        K->gemm(rows, bp, d, xr, ldx, pt, bp, s, bp, 0);
        int64_t *code = t.arg;
        K->threshold_bits(rows, bp, s, bp, thr, code);
        for (int r = 0; r < rows; r++) RA_VEC_AT(int64_t, out, i0 + r) = code[r];
    }
    ra_free(packs);
    ra_free(scratch);
    return RA_OK;
}
