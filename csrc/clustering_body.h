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

/* x (n, d) strided, ct (d, c) = centroidsᵀ  ->  lab (n): argmax_j x_i·μ_j (−1 for rows
 * with mask False; mask.data may be NULL).  Blocks of RA_ROWS rows through the gemm
 * kernel; scratch holds nt slices of per_thread bytes: x block (RA_ROWS, d), scores
 * (RA_ROWS, c).  When scores.data / best.data are set, the scores (n, c) and each row's
 * best score (n; NaN for a row labelled −1) are written there too (the gemm writes
 * straight into scores when its rows are contiguous).  With count != 0,
 * returns how many labels differ from lab's previous contents (else 0, and lab is only
 * written). */
static int64_t FN(assign_rows)(const KT *K, RaMat x, RaVec mask, int n, int d, const T *ct,
                               int c, RaVec lab, RaMat scores, RaVec best, int count,
                               char *scratch, size_t per_thread, int nt)
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
        ptrdiff_t lds = c;
        FN(ra_gather)(x, NULL, i0, rows, d, 1, 0, xs, d);
        if (direct) {          /* the product straight into the scores output */
            s = (T *)(scores.data + (ptrdiff_t)i0 * scores.s0);
            lds = scores.s0 / (ptrdiff_t)sizeof(T);
        }
        K->gemm(rows, c, d, xs, d, ct, c, s, lds, 0);
        K->argmax_rows(rows, c, s, lds, arg, top);
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
        FN(assign_rows)(K, ra_mat_at(x, b), no_mask, n, d, ct, c, ra_vec_at(labels, b), sb,
                        ra_vec_at(best, b), 0, scratch, per_thread, nt);
    }
    ra_free(ct);
    ra_free(scratch);
    return RA_OK;
}

/* ------------------------------------------------------------------ spherical_kmeans */
/* Rows with weight (1 − best cos)² > 0; NaN counts as 0. */
static inline double FN(seed_weight)(T best, uint8_t valid)
{
    const double w = 1.0 - (double)best;
    return (valid && w > 0) ? w * w : 0;
}

/* Seeded greedy k-means++ on the unit rows xn (n, d): mu (c, d) := c rows of xn.  The
 * first is uniform; each next one is the best of ra_trials(c) candidates drawn with
 * probability ∝ D², D = 1 − (largest cos to the centroids so far): the one leaving the
 * least total D² (the first on ties).  best (n), w (n), partial (ra_nchunks(n) ·
 * (ra_trials(c) + 1)), cands (d, RA_SEED_COLS) and, per thread, a block of
 * RA_ROWS · RA_SEED_COLS are scratch: the candidates' cosines come from the gemm kernel,
 * RA_ROWS rows at a time. */
static void FN(spherical_seed)(const KT *K, int n, int d, int c, const T *xn,
                               const uint8_t *valid, int64_t nvalid, uint64_t *rng, T *mu,
                               T *best, double *w, double *partial, T *cands, T *blocks, int nt)
{
    const int nch = ra_nchunks(n), L = ra_trials(c);
    const int LP = (L + 15) / 16 * 16;      /* candidate columns: whole vectors on every ISA */
    double *pot = partial + nch;            /* (nch, L) candidate potentials per chunk */
    for (int j = 0; j < c; j++) {
        int pick = -1;
        if (j > 0) {
            /* 1. weights, summed per chunk, chunks combined in order */
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int k = 0; k < nch; k++) {
                const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
                double s = 0;
                for (int i = k * RA_CHUNK; i < i1; i++) s += (w[i] = FN(seed_weight)(best[i], valid[i]));
                partial[k] = s;
            }
            double total = 0;
            for (int k = 0; k < nch; k++) total += partial[k];
            if (total > 0) {
                /* 2. L candidates: first row whose running weight exceeds u·total
                      (rounding past the end: the last row of positive weight) */
                int cand[RA_MAX_TRIALS];
                for (int t = 0; t < L; t++) {
                    const double target = ra_rng_unit(rng) * total;
                    double run = 0;
                    cand[t] = -1;
                    for (int i = 0; i < n && cand[t] < 0; i++) {
                        run += w[i];
                        if (w[i] > 0 && run > target) cand[t] = i;
                    }
                    for (int i = n - 1; i >= 0 && cand[t] < 0; i--)
                        if (w[i] > 0) cand[t] = i;
                }
                /* 3. keep the candidate with the least remaining potential: the
                      candidates transposed and zero-padded (d, LP), their
                      cosines by blocks of rows, each candidate's sum in row order */
                for (int u = 0; u < d; u++)
                    for (int t = 0; t < LP; t++)
                        cands[(size_t)u * LP + t] = t < L ? xn[(size_t)cand[t] * d + u] : 0;
                #pragma omp parallel for num_threads(nt) schedule(static)
                for (int k = 0; k < nch; k++) {
                    const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
                    T *cos = blocks + (size_t)ra_thread_id() * RA_ROWS * LP;
                    double s[RA_MAX_TRIALS] = {0};
                    for (int i0 = k * RA_CHUNK; i0 < i1; i0 += RA_ROWS) {
                        const int rows = i1 - i0 < RA_ROWS ? i1 - i0 : RA_ROWS;
                        K->gemm(rows, LP, d, xn + (size_t)i0 * d, d, cands, LP, cos, LP, 0);
                        for (int r = 0; r < rows; r++) {
                            const T b = best[i0 + r];
                            for (int t = 0; t < L; t++) {
                                const T dot = cos[(size_t)r * LP + t];
                                s[t] += FN(seed_weight)(dot > b ? dot : b, valid[i0 + r]);
                            }
                        }
                    }
                    for (int t = 0; t < L; t++) pot[(size_t)k * L + t] = s[t];
                }
                double least = INFINITY;
                for (int t = 0; t < L; t++) {
                    double s = 0;
                    for (int k = 0; k < nch; k++) s += pot[(size_t)k * L + t];
                    if (pick < 0 || s < least) { least = s; pick = cand[t]; }
                }
            }
        }
        if (pick < 0)   /* first centroid, or every remaining weight is 0: uniform */
            pick = ra_kth_valid(n, valid, (int64_t)(ra_rng_next(rng) % (uint64_t)nvalid));
        T *m = mu + (size_t)j * d;
        memcpy(m, xn + (size_t)pick * d, sizeof(T) * (size_t)d);
        /* 4. best cos against the new centroid */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int i = 0; i < n; i++) {
            const T dot = FN(ra_dot)((const char *)(xn + (size_t)i * d), sizeof(T),
                                     (const char *)m, sizeof(T), d);
            if (j == 0 || dot > best[i]) best[i] = dot;
        }
    }
}

/* mu_j := normalised sum of the rows xn[members of j] (in row order) for every cluster
 * with members and a non-zero sum; other clusters keep their centroid. */
static void FN(spherical_update)(int d, int c, const T *xn, const int64_t *start,
                                 const int64_t *rows, T *mu, T *sums, int nt)
{
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
    for (int j = 0; j < c; j++) {
        if (start[j + 1] == start[j]) continue;
        T *s = sums + (size_t)j * d;
        memset(s, 0, sizeof(T) * (size_t)d);
        for (int64_t t = start[j]; t < start[j + 1]; t++) {
            const T *xi = xn + (size_t)rows[t] * d;
            for (int u = 0; u < d; u++) s[u] += xi[u];
        }
        T sq = 0;
        for (int u = 0; u < d; u++) sq += s[u] * s[u];
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
    const int nt = ra_num_threads(), nch = ra_nchunks(n);
    const size_t nd = ra_mul((size_t)n, d), cd = ra_mul((size_t)c, d);
    const size_t per_thread = FN(assign_scratch)(d, c);
    T *xn = ra_alloc(ra_mul(sizeof(T), nd));
    T *mu = ra_alloc(ra_mul(sizeof(T), cd));
    T *ct = ra_alloc(ra_mul(sizeof(T), cd));
    T *sums = ra_alloc(ra_mul(sizeof(T), cd));
    T *best = ra_alloc(ra_mul(sizeof(T), (size_t)n));
    double *partial = ra_alloc(ra_mul(sizeof(double), ra_mul((size_t)nch, ra_trials(c) + 1)));
    double *w = ra_alloc(ra_mul(sizeof(double), (size_t)n));
    uint8_t *valid = ra_alloc((size_t)n);
    int64_t *lab = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *start = ra_alloc(ra_mul(sizeof(int64_t), (size_t)c + 1));
    int64_t *rows = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *counts = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)nch, c)));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    T *seed_cands = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)d, RA_SEED_COLS)));
    T *seed_blocks = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)nt, RA_ROWS * RA_SEED_COLS)));
    int st = (xn && mu && ct && sums && best && partial && w && valid && lab && start && rows &&
              counts && scratch && seed_cands && seed_blocks) ? RA_OK : RA_ERR_NOMEM;
    const RaMat xn_view = {(char *)xn, (ptrdiff_t)(sizeof(T) * (size_t)d), sizeof(T)};
    const RaVec lab_view = {(char *)lab, sizeof(int64_t)}, valid_view = {(char *)valid, 1};

    for (ptrdiff_t b = 0; b < B && st == RA_OK; b++) {
        RaMat xb = ra_mat_at(x, b);
        RaVec mb = ra_vec_at(mask, b);
        const int64_t n_iters = RA_VEC_AT(int64_t, ra_vec_at(iters, b), 0);
        uint64_t rng = RA_VEC_AT(uint64_t, ra_vec_at(seed, b), 0);
        /* 1. unit rows (a zero row stays zero); masked rows, and rows with a NaN or an
              infinity, never take part */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int i = 0; i < n; i++) {
            T *o = xn + (size_t)i * d;
            T sq = 0;
            for (int u = 0; u < d; u++) {
                o[u] = RA_MAT_AT(T, xb, i, u);
                sq += o[u] * o[u];
            }
            const T inv = sq > 0 ? 1 / sqrt(sq) : 0;
            for (int u = 0; u < d; u++) o[u] *= inv;
            valid[i] = (mb.data == NULL || RA_VEC_AT(uint8_t, mb, i)) && isfinite(sq);
            lab[i] = -2;                     /* "no label yet": every row counts as changed */
        }
        int64_t nvalid = 0;
        for (int i = 0; i < n; i++) nvalid += valid[i];
        /* 2. initial centroids: given, or seeded k-means++ (nothing to seed from: zeros) */
        if (use_init) {
            RaMat ib = ra_mat_at(init, b);
            for (int j = 0; j < c; j++)
                for (int u = 0; u < d; u++) mu[(size_t)j * d + u] = RA_MAT_AT(T, ib, j, u);
        } else if (nvalid > 0) {
            FN(spherical_seed)(K, n, d, c, xn, valid, nvalid, &rng, mu, best, w, partial,
                               seed_cands, seed_blocks, nt);
        } else {
            memset(mu, 0, sizeof(T) * cd);
        }
        /* 3. Lloyd iterations; unchanged labels mean a fixed point */
        for (int64_t it = 0; it < n_iters && nvalid > 0; it++) {
            FN(pack_transposed)((RaMat){(char *)mu, (ptrdiff_t)(sizeof(T) * (size_t)d), sizeof(T)},
                                c, d, ct);
            const RaMat no_scores = {NULL, 0, 0};
            const RaVec no_best = {NULL, 0};
            const int64_t changed = FN(assign_rows)(K, xn_view, valid_view, n, d, ct, c,
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
    ra_free(xn); ra_free(mu); ra_free(ct); ra_free(sums); ra_free(best); ra_free(partial);
    ra_free(w); ra_free(valid); ra_free(lab); ra_free(start); ra_free(rows); ra_free(counts);
    ra_free(scratch); ra_free(seed_cands); ra_free(seed_blocks);
    return st;
}

/* ------------------------------------------------------------------ update_centroids */
/* centroids (B; c, d), x (B; n, d), labels (B; n) in [-1, c), mask (B; n) uint8,
 * decay (B)  ->  out (B; c, d): μ_c ← normalise(decay·μ_c + (1 − decay)·mean of x rows
 * labelled c, mask True); a cluster with no such row is copied unchanged. */
/* Problem b with `parts` threads: each owns a range of clusters and sums their rows in one
 * sequential pass over x, so every cluster's rows are added in row order whatever the
 * split.  lab (n), sum (c, d), size (c) are scratch. */
static int FN(update_problem)(ptrdiff_t b, int n, int d, int c, RaBMat centroids, RaBMat x,
                              RaBVec labels, RaBVec mask, RaBVec decay, RaBMat out,
                              int64_t *lab, T *sum, int64_t *size, int parts)
{
    const int st = ra_read_labels(n, c, ra_vec_at(labels, b), ra_vec_at(mask, b), lab);
    if (st != RA_OK) return st;
    RaMat cb = ra_mat_at(centroids, b), xb = ra_mat_at(x, b), ob = ra_mat_at(out, b);
    const T dec = RA_VEC_AT(T, ra_vec_at(decay, b), 0);
    #pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
    for (int part = 0; part < parts; part++) {
        const int j0 = (int)((int64_t)c * part / parts), j1 = (int)((int64_t)c * (part + 1) / parts);
        if (j0 == j1) continue;
        memset(sum + (size_t)j0 * d, 0, sizeof(T) * (size_t)(j1 - j0) * d);
        memset(size + j0, 0, sizeof(int64_t) * (size_t)(j1 - j0));
        for (int i = 0; i < n; i++) {
            const int64_t l = lab[i];
            if (l < j0 || l >= j1) continue;
            FN(ra_add_row)(sum + (size_t)l * d, 1, xb, i, d);
            size[l]++;
        }
        for (int j = j0; j < j1; j++) {
            T *v = sum + (size_t)j * d;     /* becomes the new centroid in place */
            if (size[j] == 0) {
                for (int u = 0; u < d; u++) v[u] = RA_MAT_AT(T, cb, j, u);
            } else {
                T sq = 0;
                for (int u = 0; u < d; u++) {
                    v[u] = dec * RA_MAT_AT(T, cb, j, u) + (1 - dec) * (v[u] / (T)size[j]);
                    sq += v[u] * v[u];
                }
                const T inv = sq > 0 ? 1 / sqrt(sq) : 1;
                for (int u = 0; u < d; u++) v[u] *= inv;
            }
        }
    }
    /* written after every read: out may alias centroids */
    for (int j = 0; j < c; j++)
        for (int u = 0; u < d; u++) RA_MAT_AT(T, ob, j, u) = sum[(size_t)j * d + u];
    return RA_OK;
}

/* Several problems: one per thread (each a single sequential pass); one problem: its
 * clusters split among the threads.  The same sums either way. */
int FN(ra_update_centroids)(ptrdiff_t B, int n, int d, int c, RaBMat centroids, RaBMat x,
                            RaBVec labels, RaBVec mask, RaBVec decay, RaBMat out)
{
    const int nt = ra_num_threads();
    const int workers = B > 1 ? (B < nt ? (int)B : nt) : 1, parts = B > 1 ? 1 : nt;
    int64_t *lab = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)n, workers)));
    T *sum = ra_alloc(ra_mul(sizeof(T), ra_mul(ra_mul((size_t)c, (size_t)d), workers)));
    int64_t *size = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)c, workers)));
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
                                             lab + (size_t)w * n, sum + (size_t)w * c * d,
                                             size + (size_t)w * c, parts);
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

/* ------------------------------------------------------------------ top_members */
/* The ranking key of a score: NaN ranks lowest, as −inf. */
static inline T FN(rank_key)(T v) { return v == v ? v : -(T)INFINITY; }

/* The (k+1)-th largest of a (m > k entries, no NaN); a and b (m each) are scratch, a's
 * contents are destroyed.  Quickselect with branch-free out-of-place partitions (the
 * comparisons on random data are unpredictable): split around a median-of-three pivot p
 * into (> p | <= p), and a side holding k that is all <= p is split again into
 * (== p | < p), so runs of equal values end at once.  Expected O(m). */
static T FN(kth_largest)(T *a, T *b, int m, int k)
{
    if (m > 128) {
        /* one pass with two pivots bracketing the target rank, read off a sorted strided
           sample of 31 (Floyd–Rivest style): count what lies above the band, keep the
           band (~1/5 of the input); if the k-th is not in it, the plain loop below */
        enum { G = 31, D = 3 };
        T smp[G];
        for (int i = 0; i < G; i++) {
            const T x = a[(int)((2 * (int64_t)i + 1) * m / (2 * G))];
            int j = i;
            for (; j > 0 && smp[j - 1] < x; j--) smp[j] = smp[j - 1];
            smp[j] = x;
        }
        const int rr = (int)(((int64_t)2 * k + 1) * G / (2 * (int64_t)m));
        const T pa = rr - D > 0 ? smp[rr - D] : (T)INFINITY;
        const T pb = rr + D < G - 1 ? smp[rr + D] : -(T)INFINITY;
        int above = 0, nb = 0;
        for (int i = 0; i < m; i++) {
            const T v = a[i];
            b[nb] = v;
            above += v > pa;
            nb += (v <= pa) & (v >= pb);
        }
        if (above <= k && k < above + nb) {
            T *u = a; a = b; b = u;
            m = nb;
            k -= above;
        }
    }
    while (m > 16) {
        T x = a[0], y = a[m / 2], z = a[m - 1];
        if (x < y) { T u = x; x = y; y = u; }
        if (y < z) { T u = y; y = z; z = u; }
        if (x < y) { T u = x; x = y; y = u; }
        const T p = y;
        int nh = 0, nl = 0;
        for (int i = 0; i < m; i++) {          /* b = [> p ...) ... (... <= p] */
            const T v = a[i];
            b[nh] = v;
            b[m - 1 - nl] = v;
            const int gt = v > p;
            nh += gt;
            nl += !gt;
        }
        if (k < nh) { T *u = a; a = b; b = u; m = nh; continue; }
        k -= nh;
        const T *lo = b + nh;                   /* m - nh entries, all <= p, p among them */
        const int ml = m - nh;
        int ne = 0, nl2 = 0;
        for (int i = 0; i < ml; i++) {          /* a = [== p ...) ... (... < p] */
            const T v = lo[i];
            a[ne] = v;
            a[ml - 1 - nl2] = v;
            const int eq = v == p;
            ne += eq;
            nl2 += !eq;
        }
        if (k < ne) return p;
        k -= ne;
        a += ne;
        m = ml - ne;
    }
    for (int i = 1; i < m; i++) {               /* insertion sort, decreasing */
        const T x = a[i];
        int j = i;
        for (; j > 0 && a[j - 1] < x; j--) a[j] = a[j - 1];
        a[j] = x;
    }
    return a[k];
}

/* Write the w best of a position-ordered list (vals with byte stride vstride, positions
 * pos or NULL = 0, 1, ...) whose w-th best value is t: every value > t and the first
 * (w − #greater) equal to t, i.e. ties to the lower position, listed by position.
 * Branch-free; sel (w + 1) is scratch. */
static void FN(emit_best)(const T *vals, ptrdiff_t vstride, const int32_t *pos, int cnt, int w,
                          T t, int greater, int64_t *sel, RaMat o, int j)
{
    int need_eq = w - greater, r = 0;
    for (int k = 0; k < cnt; k++) {
        const T v = FN(rank_key)(*(const T *)((const char *)vals + k * vstride));
        const int eq = (v == t) & (need_eq > 0);
        const int take = (v > t) | eq;
        need_eq -= eq;
        sel[r] = pos ? pos[k] : k;
        r += take;
        if (r == w) break;
    }
    for (int q = 0; q < w; q++) RA_MAT_AT(int64_t, o, j, q) = sel[q];
}

/* Exact path for one column (n rows, byte stride st): select on all n keys. */
static void FN(top_column_exact)(const char *col, ptrdiff_t st, int n, int w, T *tmp, T *tmp2,
                                 int64_t *sel, RaMat o, int j)
{
    for (int i = 0; i < n; i++) tmp[i] = FN(rank_key)(*(const T *)(col + i * st));
    const T t = FN(kth_largest)(tmp, tmp2, n, w - 1);
    int greater = 0;
    for (int i = 0; i < n; i++) greater += FN(rank_key)(*(const T *)(col + i * st)) > t;
    FN(emit_best)((const T *)col, st, NULL, n, w, t, greater, sel, o, j);
}

/* Sampling plan: rows 0, k, 2k, ... (S = ceil(n/k) of them) give per cluster the RA_TOPM-th
 * largest sampled score θ; about RA_TOPM·k ≈ max(2.5w, 256) rows reach it.  No plan
 * (k = 0) when that is not well below n: every cluster takes the exact path. */
static int FN(top_plan)(int n, int w, int *cap)
{
    const double K = 2.5 * w > 256 ? 2.5 * w : 256;
    const int k = (int)(K / RA_TOPM);
    if ((double)n < 4.0 * RA_TOPM * k) return 0;
    *cap = 2 * RA_TOPM * k + 64;
    return k;
}

/* One thread's top_members scratch for work units of up to cb clusters: thresholds,
 * sample tops (and their positions), list counts, candidate lists (cb + 1 of
 * cap + RA_TOP_SLACK slots, the last one top_admit's scratch), selection scratch.
 * Laid out from an arena. */
typedef struct {
    T *thr, *top;
    IT *tpos;
    int *cnt;
    int32_t *pos;
    T *val, *tmp, *tmp2;
    int64_t *sel;
} FN(TopScratch);

static void FN(top_scratch)(RaArena *a, int n, int w, int cb, int cap, FN(TopScratch) *ts)
{
    const size_t ldt = (size_t)(cb + 15) / 16 * 16, L = (size_t)cap + RA_TOP_SLACK;
    ts->thr = RA_TAKE(a, T, ldt);
    ts->top = RA_TAKE(a, T, ra_mul(RA_TOPM, ldt));
    ts->tpos = RA_TAKE(a, IT, ra_mul(RA_TOPM, ldt));
    ts->cnt = RA_TAKE(a, int, (size_t)cb + 1);
    ts->pos = RA_TAKE(a, int32_t, ra_mul((size_t)cb + 1, L));
    ts->val = RA_TAKE(a, T, ra_mul((size_t)cb + 1, L));
    ts->tmp = RA_TAKE(a, T, (size_t)n);
    ts->tmp2 = RA_TAKE(a, T, (size_t)n);
    ts->sel = RA_TAKE(a, int64_t, (size_t)w + 1);
}

/* Cluster t's thresholds from a top_sample state: θ = the RA_TOPM-th largest sampled
 * score, NaN ("admit nothing": the exact path) when that is −inf; lists emptied. */
static void FN(top_thresholds)(int g, FN(TopScratch) *ts, int ldt)
{
    for (int t = 0; t < g; t++) {
        const T th = ts->top[(RA_TOPM - 1) * ldt + t];
        ts->thr[t] = th == -(T)INFINITY ? (T)NAN : th;
    }
    memset(ts->cnt, 0, sizeof(int) * ((size_t)g + 1));
}

/* Cluster t of a unit, from its candidate list (>= w entries, in position order): the
 * w-th largest t of the list's scores (quickselect on a copy), then every score > t and
 * the first w − #(> t) equal to t, into row j of o. */
static void FN(top_from_list)(FN(TopScratch) *ts, int t, int cap, int w, RaMat o, int j)
{
    const size_t L = (size_t)cap + RA_TOP_SLACK;
    const T *v = ts->val + (size_t)t * L;
    const int cnt = ts->cnt[t];
    memcpy(ts->tmp, v, sizeof(T) * (size_t)cnt);
    const T th = FN(kth_largest)(ts->tmp, ts->tmp2, cnt, w - 1);
    int greater = 0;
    for (int q = 0; q < cnt; q++) greater += v[q] > th;
    FN(emit_best)(v, sizeof(T), ts->pos + (size_t)t * L, cnt, w, th, greater, ts->sel, o, j);
}

/* scores (B; n, c) -> idx (B; c, w) int64: for each cluster the w rows with the largest
 * score (NaN counts as −inf), ties to the lower position, listed by position.
 *
 * Per work unit (ra_top_group adjacent clusters of one problem):
 *  1. a strided sample of rows gives each cluster a threshold θ (its RA_TOPM-th largest
 *     sampled score: ~2.5w rows should reach it), by a vector insertion network; for
 *     w <= RA_TOPM the network runs over every row and θ is the exact w-th largest;
 *  2. one pass over the rows appends every (position, score) with score >= θ to the
 *     cluster's list — in position order, one vector compare per row and VL clusters;
 *  3. per cluster, the w-th largest t of the list's scores (quickselect on a copy of the
 *     scores only); the answer is every score > t plus the first w − #(> t) equal to t.
 * A cluster whose list got fewer than w rows (θ too high), overflowed (θ too low, or
 * massive ties), or whose θ is −inf (NaN/−inf columns) takes the exact path: select on
 * all n keys.  Each cluster's result depends on nothing else, so any split into units
 * and any thread count give the same output. */
int FN(ra_top_members)(ptrdiff_t B, int n, int c, int w, RaBMat scores, RaBMat idx)
{
    if (c == 0) return RA_OK;         /* no clusters: nothing to list */
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    /* Ordered comparisons with NaN scores (and the NaN "admit nothing" thresholds) set
       FE_INVALID; the result is exact regardless, so the caller's flag is restored. */
    fexcept_t fe_saved;
    fegetexceptflag(&fe_saved, FE_INVALID);
    int cap = 0;
    /* w <= RA_TOPM: the network runs over every row with positions alongside, and its
       first w entries are the answer (no admission pass) unless they reach −inf */
    const int all_rows = w <= RA_TOPM;
    const int k = all_rows ? 1 : FN(top_plan)(n, w, &cap);
    const int rank = all_rows ? w : RA_TOPM;      /* θ = the rank-th largest sampled */
    const int S = k ? (n + k - 1) / k : 0;
    const int cb = ra_top_group(c, nt), parts = (c + cb - 1) / cb;
    const int ldt = (cb + 15) / 16 * 16;
    RaArena measure = {NULL, 0};
    FN(TopScratch) ts0;
    FN(top_scratch)(&measure, n, w, cb, cap, &ts0);
    const size_t per_thread = measure.used;
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    /* rows must be contiguous along clusters for the vector passes: else pack a copy */
    const int packed = !(scores.s1 == (ptrdiff_t)sizeof(T) &&
                         scores.s0 % (ptrdiff_t)sizeof(T) == 0 &&
                         scores.sb % (ptrdiff_t)sizeof(T) == 0 &&
                         ((uintptr_t)scores.data % sizeof(T)) == 0);
    T *pk = packed && k ? ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)n, c))) : NULL;
    if (!scratch || (packed && k && !pk)) { ra_free(scratch); ra_free(pk); return RA_ERR_NOMEM; }

    for (ptrdiff_t b = 0; b < B; b++) {
        const RaMat s = ra_mat_at(scores, b), o = ra_mat_at(idx, b);
        const T *base = (const T *)s.data;
        ptrdiff_t ld = s.s0 / (ptrdiff_t)sizeof(T);
        if (pk) {
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int i = 0; i < n; i++)
                for (int j = 0; j < c; j++) pk[(size_t)i * c + j] = RA_MAT_AT(T, s, i, j);
            base = pk;
            ld = c;
        }
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int part = 0; part < parts; part++) {
            const int j0 = part * cb, g = c - j0 < cb ? c - j0 : cb;
            FN(TopScratch) ts;
            FN(top_scratch)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, n, w, cb,
                            cap, &ts);
            if (k) {
                const T *sp = base + j0;
                for (int q = 0; q < RA_TOPM * ldt; q++) ts.top[q] = -(T)INFINITY;
                K->top_sample(S, g, sp, ld * k, rank, ts.top, ldt, all_rows ? ts.tpos : NULL);
                if (all_rows) {
                    for (int t = 0; t < g; t++) {
                        const int j = j0 + t;
                        if (ts.top[(w - 1) * ldt + t] == -(T)INFINITY) {   /* NaN/−inf in it */
                            FN(top_column_exact)(s.data + (ptrdiff_t)j * s.s1, s.s0, n, w,
                                                 ts.tmp, ts.tmp2, ts.sel, o, j);
                            continue;
                        }
                        int64_t *sel = ts.sel;
                        for (int r = 0; r < w; r++) {   /* its w best, by position */
                            const int64_t x = (int64_t)ts.tpos[r * ldt + t];
                            int q = r;
                            for (; q > 0 && sel[q - 1] > x; q--) sel[q] = sel[q - 1];
                            sel[q] = x;
                        }
                        for (int r = 0; r < w; r++) RA_MAT_AT(int64_t, o, j, r) = sel[r];
                    }
                    continue;
                }
                FN(top_thresholds)(g, &ts, ldt);
                K->top_admit(n, g, sp, ld, 0, ts.thr, cap, ts.cnt, ts.pos, ts.val);
            }
            for (int t = 0; t < g; t++) {
                const int j = j0 + t;
                if (!k || ts.cnt[t] < w || ts.cnt[t] >= cap)
                    FN(top_column_exact)(s.data + (ptrdiff_t)j * s.s1, s.s0, n, w, ts.tmp,
                                         ts.tmp2, ts.sel, o, j);
                else
                    FN(top_from_list)(&ts, t, cap, w, o, j);
            }
        }
    }
    ra_free(scratch);
    ra_free(pk);
    fesetexceptflag(&fe_saved, FE_INVALID);
    return RA_OK;
}

/* ------------------------------------------------------------------ assign_top_members */
/* The scores x·μᵀ of the 16 columns of ct (d, c) from jb (fewer at the end) for every
 * row, into cols (n, 16): the same vector or tail path of the gemm assign_rows takes for
 * those columns (jb is a multiple of 16, hence of every vector width), so the same bits.
 * xs (RA_ROWS, d) scratch. */
static void FN(score_block)(const KT *K, RaMat x, int n, int d, const T *ct, int c, int jb,
                            T *xs, T *cols)
{
    const int nb = c - jb < 16 ? c - jb : 16;
    for (int i0 = 0; i0 < n; i0 += RA_ROWS) {
        const int rows = n - i0 < RA_ROWS ? n - i0 : RA_ROWS;
        FN(ra_gather)(x, NULL, i0, rows, d, 1, 0, xs, d);
        K->gemm(rows, nb, d, xs, d, ct + jb, c, cols + (size_t)i0 * 16, 16, 0);
    }
}

/* Without a sampling plan: the scores (n, c) stored, then the two kernels as they are. */
static int FN(assign_top_stored)(ptrdiff_t B, int n, int d, int c, int w, RaBMat x,
                                 RaBMat centroids, RaBVec labels, RaBVec best, RaBMat idx)
{
    T *scores = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)n, c)));
    int status = scores ? RA_OK : RA_ERR_NOMEM;
    const RaBMat sv = {(char *)scores, 0, (ptrdiff_t)sizeof(T) * c, sizeof(T)};
    for (ptrdiff_t b = 0; b < B && status == RA_OK; b++) {
        const RaBMat xb = {x.data + b * x.sb, 0, x.s0, x.s1};
        const RaBMat cb = {centroids.data + b * centroids.sb, 0, centroids.s0, centroids.s1};
        const RaBVec lb = {labels.data + b * labels.sb, 0, labels.s0};
        const RaBVec bb = {best.data + b * best.sb, 0, best.s0};
        const RaBMat ib = {idx.data + b * idx.sb, 0, idx.s0, idx.s1};
        status = FN(ra_assign_clusters)(1, n, d, c, xb, cb, lb, sv, bb);
        if (status == RA_OK) status = FN(ra_top_members)(1, n, c, w, sv, ib);
    }
    ra_free(scores);
    return status;
}

/* One thread's scratch of assign_top: top_members' scratch, then the x block (RA_ROWS, d),
 * a score tile (RA_ROWS, cb), and score_block's columns (n, 16). */
typedef struct { FN(TopScratch) ts; T *x, *scores, *cols; } FN(AssignTopTile);

static void FN(assign_top_tile)(RaArena *a, int n, int w, int d, int cb, int cap,
                                FN(AssignTopTile) *t)
{
    FN(top_scratch)(a, n, w, cb, cap, &t->ts);
    t->x = RA_TAKE(a, T, ra_mul(RA_ROWS, d));
    t->scores = RA_TAKE(a, T, ra_mul(RA_ROWS, cb));
    t->cols = RA_TAKE(a, T, ra_mul(n, 16));
}

/* x (B; n, d), centroids (B; c, d) -> labels (B; n) int64, best (B; n), idx (B; c, w)
 * int64: bit for bit ra_assign_clusters (labels and best) followed by ra_top_members on
 * the scores x·μᵀ, without storing the (n, c) scores.  Per work unit (the adjacent
 * clusters ra_top_group gives one thread, a multiple of 16, so every score comes out of
 * the same vector or tail path of the gemm as in assign_rows):
 *  1. the sampled rows 0, k, 2k, ... are scored and set each cluster's threshold θ;
 *  2. RA_ROWS rows at a time are scored into a tile that stays in cache: its argmax
 *     over the unit's clusters is kept, and top_admit appends the rows reaching θ;
 *  3. per cluster, the w best of its list; the clusters whose list fell short,
 *     overflowed, or whose θ is −inf take the exact path on their column, scored again
 *     16 columns at a time (score_block).
 * Then per row the units' maxima are combined in unit order (the first of equal maxima,
 * as argmax_rows), so neither result depends on the split or the thread count.  The
 * caller's FE_INVALID is kept, and raised if a product raised it (as assign_clusters
 * would), never by the comparisons.  Without a sampling plan (w <= RA_TOPM, or n small
 * against w), or below RA_FUSE_SCORES scores (where the split's repeated row reads cost
 * more than the stored scores' traffic), the scores are stored instead: the same result
 * either way. */
int FN(ra_assign_top)(ptrdiff_t B, int n, int d, int c, int w, RaBMat x, RaBMat centroids,
                      RaBVec labels, RaBVec best, RaBMat idx)
{
    if (c == 0) {           /* no clusters: labels -1, best NaN, no members */
        const RaBMat no_scores = {NULL, 0, 0, 0};
        return FN(ra_assign_clusters)(B, n, d, c, x, centroids, labels, no_scores, best);
    }
    int cap = 0;
    const int k = w <= RA_TOPM ? 0 : FN(top_plan)(n, w, &cap);
    if (!k || (int64_t)n * c < RA_FUSE_SCORES)
        return FN(assign_top_stored)(B, n, d, c, w, x, centroids, labels, best, idx);
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    fexcept_t fe_saved;
    fegetexceptflag(&fe_saved, FE_INVALID);
    int invalid = 0;                   /* a product raised FE_INVALID */
    const int cb = ra_top_group(c, nt), parts = (c + cb - 1) / cb;
    const int ldt = (cb + 15) / 16 * 16, S = (n + k - 1) / k;
    RaArena measure = {NULL, 0};
    FN(AssignTopTile) t0;
    FN(assign_top_tile)(&measure, n, w, d, cb, cap, &t0);
    const size_t per_thread = measure.used;
    T *ct = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)d, c)));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    int64_t *unit_lab = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)parts, n)));
    T *unit_best = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)parts, n)));
    if (!ct || !scratch || !unit_lab || !unit_best) {
        ra_free(ct); ra_free(scratch); ra_free(unit_lab); ra_free(unit_best);
        return RA_ERR_NOMEM;
    }
    for (ptrdiff_t b = 0; b < B; b++) {
        const RaMat xb = ra_mat_at(x, b), o = ra_mat_at(idx, b);
        const RaMat xk = {xb.data, xb.s0 * k, xb.s1};      /* the sampled rows */
        FN(pack_transposed)(ra_mat_at(centroids, b), c, d, ct);
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1) reduction(|:invalid)
        for (int part = 0; part < parts; part++) {
            const int j0 = part * cb, g = c - j0 < cb ? c - j0 : cb;
            FN(AssignTopTile) at;
            FN(assign_top_tile)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, n,
                                w, d, cb, cap, &at);
            FN(TopScratch) ts = at.ts;
            T *xs = at.x, *tile = at.scores, *cols = at.cols;
            int64_t *lab = unit_lab + (size_t)part * n;
            T *top = unit_best + (size_t)part * n;
            /* 1. thresholds from the sampled rows */
            for (int q = 0; q < RA_TOPM * ldt; q++) ts.top[q] = -(T)INFINITY;
            for (int s0 = 0; s0 < S; s0 += RA_ROWS) {
                const int rows = S - s0 < RA_ROWS ? S - s0 : RA_ROWS;
                FN(ra_gather)(xk, NULL, s0, rows, d, 1, 0, xs, d);
                K->gemm(rows, g, d, xs, d, ct + j0, c, tile, cb, 0);
                K->top_sample(rows, g, tile, cb, RA_TOPM, ts.top, ldt, NULL);
            }
            FN(top_thresholds)(g, &ts, ldt);
            /* 2. every row: the unit's argmax, and admission */
            for (int i0 = 0; i0 < n; i0 += RA_ROWS) {
                const int rows = n - i0 < RA_ROWS ? n - i0 : RA_ROWS;
                FN(ra_gather)(xb, NULL, i0, rows, d, 1, 0, xs, d);
                feclearexcept(FE_INVALID);
                K->gemm(rows, g, d, xs, d, ct + j0, c, tile, cb, 0);
                invalid |= fetestexcept(FE_INVALID) != 0;
                K->argmax_rows(rows, g, tile, cb, lab + i0, top + i0);
                K->top_admit(rows, g, tile, cb, i0, ts.thr, cap, ts.cnt, ts.pos, ts.val);
            }
            /* 3. selection: from the lists, or exact on columns scored again per block */
            for (int t0 = 0; t0 < g; t0 += 16) {
                const int t1 = t0 + 16 < g ? t0 + 16 : g;
                int scored = 0;
                for (int t = t0; t < t1; t++) {
                    const int j = j0 + t;
                    if (ts.cnt[t] >= w && ts.cnt[t] < cap) {
                        FN(top_from_list)(&ts, t, cap, w, o, j);
                        continue;
                    }
                    if (!scored) FN(score_block)(K, xb, n, d, ct, c, j0 + t0, xs, cols);
                    scored = 1;
                    FN(top_column_exact)((const char *)(cols + (t - t0)), 16 * sizeof(T), n,
                                         w, ts.tmp, ts.tmp2, ts.sel, o, j);
                }
            }
        }
        /* 4. labels and best scores: the first unit holding the row's largest score */
        const RaVec lv = ra_vec_at(labels, b), bv = ra_vec_at(best, b);
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int i = 0; i < n; i++) {
            int64_t l = -1;
            T m = (T)NAN;
            for (int part = 0; part < parts; part++) {
                const int64_t lp = unit_lab[(size_t)part * n + i];
                const T mp = unit_best[(size_t)part * n + i];
                if (lp >= 0 && (l < 0 || mp > m)) { l = part * (int64_t)cb + lp; m = mp; }
            }
            RA_VEC_AT(int64_t, lv, i) = l;
            RA_VEC_AT(T, bv, i) = m;
        }
    }
    ra_free(ct);
    ra_free(scratch);
    ra_free(unit_lab);
    ra_free(unit_best);
    fesetexceptflag(&fe_saved, FE_INVALID);
    if (invalid) feraiseexcept(FE_INVALID);
    return RA_OK;
}

/* ------------------------------------------------------------------ normalize_rows */
/* x (B; n, d) -> xhat (B; n, d), norm, sq (B; n); rows in parallel (each on its own). */
int FN(ra_normalize_rows)(ptrdiff_t B, int n, int d, RaBMat x, RaBMat xhat, RaBVec norm,
                          RaBVec sq)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    const ptrdiff_t total = B * (ptrdiff_t)n;
    /* unit-stride rows through the SIMD kernel, others element by element; which path a
       row takes depends on the layout only, never on the thread count */
    const int unit = x.s1 == (ptrdiff_t)sizeof(T) && xhat.s1 == (ptrdiff_t)sizeof(T);
    #pragma omp parallel for num_threads(nt) schedule(static) if (total * d > 32768)
    for (ptrdiff_t u = 0; u < total; u++) {
        const ptrdiff_t b = u / n;
        const int i = (int)(u % n);
        const RaMat xb = ra_mat_at(x, b), ob = ra_mat_at(xhat, b);
        const char *row = xb.data + (ptrdiff_t)i * xb.s0;
        char *out = ob.data + (ptrdiff_t)i * ob.s0;
        T *nrm_i = &RA_VEC_AT(T, ra_vec_at(norm, b), i), *sq_i = &RA_VEC_AT(T, ra_vec_at(sq, b), i);
        if (unit) {
            K->normalize_row((const T *)row, d, (T *)out, nrm_i, sq_i);
            continue;
        }
        const T nrm = (T)sqrt(FN(ra_dot)(row, xb.s1, row, xb.s1, d));
        const T div = nrm > 0 ? nrm : 1;
        for (int f = 0; f < d; f++)
            *(T *)(out + (ptrdiff_t)f * ob.s1) = *(const T *)(row + (ptrdiff_t)f * xb.s1) / div;
        *nrm_i = nrm;
        *sq_i = FN(ra_dot)(out, ob.s1, out, ob.s1, d);
    }
    return RA_OK;
}

/* ------------------------------------------------------------------ lsh_hash */
/* x (B; n, d), planes (B; bits, d + 1)  ->  codes (B; n) int64: bit b set iff
 * x·planes[b, :d] > planes[b, d]; one gemm per block of rows, then the threshold. */
int FN(ra_lsh_hash)(ptrdiff_t B, int n, int d, int bits, RaBMat x, RaBMat planes,
                    RaBVec codes)
{
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    const int nblk = (n + RA_ROWS - 1) / RA_ROWS;
    /* shared pack per problem: Pᵀ (d, bits) and thresholds (bits) */
    const size_t per_problem = ra_round_up(ra_mul(sizeof(T), ra_mul((size_t)d + 1, bits)));
    const size_t per_thread = FN(assign_scratch)(d, bits);
    char *packs = ra_alloc(ra_mul(per_problem, (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!packs || !scratch) { ra_free(packs); ra_free(scratch); return RA_ERR_NOMEM; }

    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        T *pt = (T *)(packs + b * per_problem), *thr = pt + (size_t)d * bits;
        RaMat p = ra_mat_at(planes, b);
        FN(pack_transposed)(p, bits, d, pt);
        for (int k = 0; k < bits; k++) thr[k] = RA_MAT_AT(T, p, k, d);
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * nblk; unit++) {
        const ptrdiff_t b = unit / nblk;
        const int i0 = (int)(unit % nblk) * RA_ROWS, rows = n - i0 < RA_ROWS ? n - i0 : RA_ROWS;
        const T *pt = (const T *)(packs + b * per_problem), *thr = pt + (size_t)d * bits;
        FN(AssignTile) t;
        FN(assign_tile)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, d, bits, &t);
        T *xs = t.x, *s = t.scores;
        RaVec out = ra_vec_at(codes, b);
        FN(ra_gather)(ra_mat_at(x, b), NULL, i0, rows, d, 1, 0, xs, d);
        K->gemm(rows, bits, d, xs, d, pt, bits, s, bits, 0);
        int64_t *code = t.arg;
        K->threshold_bits(rows, bits, s, bits, thr, code);
        for (int r = 0; r < rows; r++) RA_VEC_AT(int64_t, out, i0 + r) = code[r];
    }
    ra_free(packs);
    ra_free(scratch);
    return RA_OK;
}
