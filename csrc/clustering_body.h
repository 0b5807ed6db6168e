/* clustering_body.h — typed routing-decision kernels; included by clustering.c per dtype
 * with T, KT (kernel table type), KSEL (f32 | f64) and FN(name) = name##_<suffix>. */

/* ------------------------------------------------------------------ building blocks */
/* Pack a (c, d) strided matrix transposed into ct (d, c) contiguous. */
static void FN(pack_transposed)(RaMat m, int c, int d, T *ct)
{
    FN(ra_gather)(m, NULL, 0, c, d, 1, 1, ct, c);
}

/* Index of the largest non-NaN entry of s (c), ties to the lowest; −1 if all are NaN. */
static inline int64_t FN(argmax_row)(const T *s, int c)
{
    int64_t lab = -1;
    T best = 0;
    for (int j = 0; j < c; j++) {
        const T v = s[j];
        if (v == v && (lab < 0 || v > best)) { best = v; lab = j; }
    }
    return lab;
}

/* x (n, d) strided, ct (d, c) = centroidsᵀ  ->  lab (n): argmax_j x_i·μ_j (−1 for rows
 * with mask False; mask.data may be NULL).  Blocks of RA_ROWS rows through the gemm
 * kernel; scratch holds nt slices of per_thread bytes: x block (RA_ROWS, d), scores
 * (RA_ROWS, c).  With count != 0, returns how many labels differ from lab's previous
 * contents (else 0, and lab is only written). */
static int64_t FN(assign_rows)(const KT *K, RaMat x, RaVec mask, int n, int d, const T *ct,
                               int c, RaVec lab, int count, char *scratch, size_t per_thread,
                               int nt)
{
    const int nblk = (n + RA_ROWS - 1) / RA_ROWS;
    int64_t changed = 0;
    #pragma omp parallel for num_threads(nt) schedule(static) reduction(+:changed)
    for (int blk = 0; blk < nblk; blk++) {
        const int i0 = blk * RA_ROWS, rows = n - i0 < RA_ROWS ? n - i0 : RA_ROWS;
        T *xs = (T *)(scratch + (size_t)ra_thread_id() * per_thread);
        T *s = xs + (size_t)RA_ROWS * d;
        FN(ra_gather)(x, NULL, i0, rows, d, 1, 0, xs, d);
        K->gemm(rows, c, d, xs, d, ct, c, s, c, 0);
        for (int r = 0; r < rows; r++) {
            const int i = i0 + r;
            const int64_t l = (mask.data && !RA_VEC_AT(uint8_t, mask, i))
                              ? -1 : FN(argmax_row)(s + (size_t)r * c, c);
            if (count) changed += RA_VEC_AT(int64_t, lab, i) != l;
            RA_VEC_AT(int64_t, lab, i) = l;
        }
    }
    return changed;
}

static size_t FN(assign_scratch)(int d, int c)
{
    return ra_round_up(ra_mul(sizeof(T), ra_mul(RA_ROWS, ra_add((size_t)d, (size_t)c))));
}

/* ------------------------------------------------------------------ assign_clusters */
/* x (B; n, d), centroids (B; c, d) -> labels (B; n) int64 */
int FN(ra_assign_clusters)(ptrdiff_t B, int n, int d, int c, RaBMat x, RaBMat centroids,
                           RaBVec labels)
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
        FN(assign_rows)(K, ra_mat_at(x, b), no_mask, n, d, ct, c, ra_vec_at(labels, b), 0,
                        scratch, per_thread, nt);
    }
    ra_free(ct);
    ra_free(scratch);
    return RA_OK;
}

/* ------------------------------------------------------------------ spherical_kmeans */
/* Seeded k-means++ on the unit rows xn (n, d): mu (c, d) := c rows of xn drawn by D²
 * sampling with D = 1 − max cos to the centroids chosen so far.  best (n) and partial
 * (ra_nchunks(n)) are scratch. */
static void FN(spherical_seed)(int n, int d, int c, const T *xn, const uint8_t *valid,
                               int64_t nvalid, uint64_t *rng, T *mu, T *best, double *partial,
                               int nt)
{
    const int nch = ra_nchunks(n);
    for (int j = 0; j < c; j++) {
        int pick = -1;
        if (j > 0) {
            /* 1. weights (1 − best cos)², summed per chunk, chunks combined in order */
            #pragma omp parallel for num_threads(nt) schedule(static)
            for (int k = 0; k < nch; k++) {
                const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
                double s = 0;
                for (int i = k * RA_CHUNK; i < i1; i++) {
                    const double w = 1.0 - (double)best[i];
                    s += (valid[i] && w > 0) ? w * w : 0;
                }
                partial[k] = s;
            }
            double total = 0;
            for (int k = 0; k < nch; k++) total += partial[k];
            /* 2. first row whose running weight exceeds u·total (rounding: last positive row) */
            if (total > 0) {
                const double target = ra_rng_unit(rng) * total;
                double run = 0;
                for (int i = 0; i < n && pick < 0; i++) {
                    const double w = 1.0 - (double)best[i];
                    if (!(valid[i] && w > 0)) continue;
                    run += w * w;
                    if (run > target) pick = i;
                }
                for (int i = n - 1; i >= 0 && pick < 0; i--) {
                    const double w = 1.0 - (double)best[i];
                    if (valid[i] && w > 0) pick = i;
                }
            }
        }
        if (pick < 0)   /* first centroid, or every remaining weight is 0: uniform */
            pick = ra_kth_valid(n, valid, (int64_t)(ra_rng_next(rng) % (uint64_t)nvalid));
        T *m = mu + (size_t)j * d;
        memcpy(m, xn + (size_t)pick * d, sizeof(T) * (size_t)d);
        /* 3. best cos against the new centroid */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (int i = 0; i < n; i++) {
            const T *xi = xn + (size_t)i * d;
            T dot = 0;
            for (int t = 0; t < d; t++) dot += xi[t] * m[t];
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
    double *partial = ra_alloc(ra_mul(sizeof(double), (size_t)nch));
    uint8_t *valid = ra_alloc((size_t)n);
    int64_t *lab = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *start = ra_alloc(ra_mul(sizeof(int64_t), (size_t)c + 1));
    int64_t *rows = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *counts = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)nch, c)));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    int st = (xn && mu && ct && sums && best && partial && valid && lab && start && rows &&
              counts && scratch) ? RA_OK : RA_ERR_NOMEM;
    const RaMat xn_view = {(char *)xn, (ptrdiff_t)(sizeof(T) * (size_t)d), sizeof(T)};
    const RaVec lab_view = {(char *)lab, sizeof(int64_t)}, valid_view = {(char *)valid, 1};

    for (ptrdiff_t b = 0; b < B && st == RA_OK; b++) {
        RaMat xb = ra_mat_at(x, b);
        RaVec mb = ra_vec_at(mask, b);
        const int64_t n_iters = RA_VEC_AT(int64_t, ra_vec_at(iters, b), 0);
        uint64_t rng = RA_VEC_AT(uint64_t, ra_vec_at(seed, b), 0);
        /* 1. unit rows (a zero row stays zero); masked rows never take part */
        int64_t nvalid = 0;
        for (int i = 0; i < n; i++) {
            valid[i] = mb.data == NULL || RA_VEC_AT(uint8_t, mb, i);
            nvalid += valid[i];
            lab[i] = -2;                     /* "no label yet": every row counts as changed */
        }
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
        }
        /* 2. initial centroids: given, or seeded k-means++ (nothing to seed from: zeros) */
        if (use_init) {
            RaMat ib = ra_mat_at(init, b);
            for (int j = 0; j < c; j++)
                for (int u = 0; u < d; u++) mu[(size_t)j * d + u] = RA_MAT_AT(T, ib, j, u);
        } else if (nvalid > 0) {
            FN(spherical_seed)(n, d, c, xn, valid, nvalid, &rng, mu, best, partial, nt);
        } else {
            memset(mu, 0, sizeof(T) * cd);
        }
        /* 3. Lloyd iterations; unchanged labels mean a fixed point */
        for (int64_t it = 0; it < n_iters && nvalid > 0; it++) {
            FN(pack_transposed)((RaMat){(char *)mu, (ptrdiff_t)(sizeof(T) * (size_t)d), sizeof(T)},
                                c, d, ct);
            const int64_t changed = FN(assign_rows)(K, xn_view, valid_view, n, d, ct, c,
                                                    lab_view, 1, scratch, per_thread, nt);
            if (changed == 0) break;
            ra_group_by_label(n, lab, c, start, rows, counts, nt);
            FN(spherical_update)(d, c, xn, start, rows, mu, sums, nt);
        }
        RaMat ob = ra_mat_at(centroids, b);
        for (int j = 0; j < c; j++)
            for (int u = 0; u < d; u++) RA_MAT_AT(T, ob, j, u) = mu[(size_t)j * d + u];
    }
    ra_free(xn); ra_free(mu); ra_free(ct); ra_free(sums); ra_free(best); ra_free(partial);
    ra_free(valid); ra_free(lab); ra_free(start); ra_free(rows); ra_free(counts);
    ra_free(scratch);
    return st;
}

/* ------------------------------------------------------------------ update_centroids */
/* centroids (B; c, d), x (B; n, d), labels (B; n) in [-1, c), mask (B; n) uint8,
 * decay (B)  ->  out (B; c, d): μ_c ← normalise(decay·μ_c + (1 − decay)·mean of x rows
 * labelled c, mask True); a cluster with no such row is copied unchanged. */
int FN(ra_update_centroids)(ptrdiff_t B, int n, int d, int c, RaBMat centroids, RaBMat x,
                            RaBVec labels, RaBVec mask, RaBVec decay, RaBMat out)
{
    const int nt = ra_num_threads();
    const size_t per_thread = ra_round_up(ra_mul(2 * sizeof(T), (size_t)d));   /* v, sum */
    int64_t *lab = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *start = ra_alloc(ra_mul(sizeof(int64_t), (size_t)c + 1));
    int64_t *rows = ra_alloc(ra_mul(sizeof(int64_t), (size_t)n));
    int64_t *counts = ra_alloc(ra_mul(sizeof(int64_t), ra_mul((size_t)ra_nchunks(n), c)));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    int st = (lab && start && rows && counts && scratch) ? RA_OK : RA_ERR_NOMEM;
    for (ptrdiff_t b = 0; b < B && st == RA_OK; b++) {
        st = ra_read_labels(n, c, ra_vec_at(labels, b), ra_vec_at(mask, b), lab);
        if (st != RA_OK) break;
        ra_group_by_label(n, lab, c, start, rows, counts, nt);
        RaMat cb = ra_mat_at(centroids, b), xb = ra_mat_at(x, b), ob = ra_mat_at(out, b);
        const T dec = RA_VEC_AT(T, ra_vec_at(decay, b), 0);
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
        for (int j = 0; j < c; j++) {
            T *v = (T *)(scratch + (size_t)ra_thread_id() * per_thread), *s = v + d;
            const int64_t size = start[j + 1] - start[j];
            /* read the whole row before writing: out may alias centroids */
            for (int u = 0; u < d; u++) v[u] = RA_MAT_AT(T, cb, j, u);
            if (size > 0) {
                memset(s, 0, sizeof(T) * (size_t)d);
                for (int64_t t = start[j]; t < start[j + 1]; t++)
                    for (int u = 0; u < d; u++) s[u] += RA_MAT_AT(T, xb, rows[t], u);
                T sq = 0;
                for (int u = 0; u < d; u++) {
                    v[u] = dec * v[u] + (1 - dec) * (s[u] / (T)size);
                    sq += v[u] * v[u];
                }
                const T inv = sq > 0 ? 1 / sqrt(sq) : 1;
                for (int u = 0; u < d; u++) v[u] *= inv;
            }
            for (int u = 0; u < d; u++) RA_MAT_AT(T, ob, j, u) = v[u];
        }
    }
    ra_free(lab); ra_free(start); ra_free(rows); ra_free(counts); ra_free(scratch);
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
/* One kept row of a cluster's top-w heap: its score and position. */
typedef struct { T v; int32_t pos; } FN(RaScored);

/* a ranks below b: smaller score, or equal score and later position */
static inline int FN(worse)(FN(RaScored) a, FN(RaScored) b)
{
    return a.v < b.v || (a.v == b.v && a.pos > b.pos);
}

/* Restore the min-heap (root = worst kept row) below slot i. */
static void FN(sift_down)(FN(RaScored) *h, int w, int i)
{
    for (;;) {
        int l = 2 * i + 1, m = i;
        if (l < w && FN(worse)(h[l], h[m])) m = l;
        if (l + 1 < w && FN(worse)(h[l + 1], h[m])) m = l + 1;
        if (m == i) return;
        FN(RaScored) tmp = h[i]; h[i] = h[m]; h[m] = tmp;
        i = m;
    }
}

/* col (n) scores of one cluster (NaN already −inf) -> pos (w) the positions of the w
 * best rows by (score desc, position asc), increasing.  heap (w) is scratch.
 * Rows come in position order, so a row beats the worst kept one iff its score is
 * strictly larger; blocks of 16 with no such score are skipped in one vector test. */
static void FN(top_w)(const T *col, int n, int w, FN(RaScored) *heap, int32_t *pos)
{
    for (int i = 0; i < w; i++) heap[i] = (FN(RaScored)){col[i], i};
    for (int i = w / 2 - 1; i >= 0; i--) FN(sift_down)(heap, w, i);
    int i = w;
    for (; i + 16 <= n; i += 16) {
        const T thr = heap[0].v;
        int any = 0;
        for (int t = 0; t < 16; t++) any |= col[i + t] > thr;
        if (!any) continue;
        for (int t = 0; t < 16; t++)
            if (col[i + t] > heap[0].v) {
                heap[0] = (FN(RaScored)){col[i + t], i + t};
                FN(sift_down)(heap, w, 0);
            }
    }
    for (; i < n; i++)
        if (col[i] > heap[0].v) {
            heap[0] = (FN(RaScored)){col[i], i};
            FN(sift_down)(heap, w, 0);
        }
    for (int t = 0; t < w; t++) pos[t] = heap[t].pos;
    qsort(pos, (size_t)w, sizeof(int32_t), ra_cmp_int32);
}

#define RA_GROUP ((int)(64 / sizeof(T)))   /* clusters per work unit: one cache line of a row */

/* scores (B; n, c) -> idx (B; c, w) int64: for each cluster the w rows with the largest
 * score (NaN counts as −inf), ties to the lower position, listed by position. */
int FN(ra_top_members)(ptrdiff_t B, int n, int c, int w, RaBMat scores, RaBMat idx)
{
    const int nt = ra_num_threads();
    const int ngroups = (c + RA_GROUP - 1) / RA_GROUP;
    /* per thread: columns (RA_GROUP, n), heap (w), positions (w) */
    const size_t col_sz = ra_round_up(ra_mul(sizeof(T), ra_mul(RA_GROUP, (size_t)n)));
    const size_t heap_sz = ra_round_up(ra_mul(sizeof(FN(RaScored)), (size_t)w));
    const size_t per_thread = ra_add(ra_add(col_sz, heap_sz), ra_mul(sizeof(int32_t), (size_t)w));
    char *scratch = ra_alloc(ra_mul(ra_round_up(per_thread), (size_t)nt));
    if (!scratch) return RA_ERR_NOMEM;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * ngroups; unit++) {
        const ptrdiff_t b = unit / ngroups;
        const int j0 = (int)(unit % ngroups) * RA_GROUP;
        const int g = c - j0 < RA_GROUP ? c - j0 : RA_GROUP;
        char *base = scratch + (size_t)ra_thread_id() * ra_round_up(per_thread);
        T *cols = (T *)base;
        FN(RaScored) *heap = (FN(RaScored) *)(base + col_sz);
        int32_t *pos = (int32_t *)(base + col_sz + heap_sz);
        RaMat s = ra_mat_at(scores, b), o = ra_mat_at(idx, b);
        /* 1. transpose the group's columns (one pass over the rows) */
        for (int i = 0; i < n; i++)
            for (int t = 0; t < g; t++) {
                const T v = RA_MAT_AT(T, s, i, j0 + t);
                cols[(size_t)t * n + i] = v == v ? v : -INFINITY;
            }
        /* 2. select per cluster */
        for (int t = 0; t < g; t++) {
            FN(top_w)(cols + (size_t)t * n, n, w, heap, pos);
            for (int r = 0; r < w; r++) RA_MAT_AT(int64_t, o, j0 + t, r) = pos[r];
        }
    }
    ra_free(scratch);
    return RA_OK;
}
#undef RA_GROUP

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
        T *xs = (T *)(scratch + (size_t)ra_thread_id() * per_thread);
        T *s = xs + (size_t)RA_ROWS * d;
        RaVec out = ra_vec_at(codes, b);
        FN(ra_gather)(ra_mat_at(x, b), NULL, i0, rows, d, 1, 0, xs, d);
        K->gemm(rows, bits, d, xs, d, pt, bits, s, bits, 0);
        for (int r = 0; r < rows; r++) {
            uint64_t code = 0;
            for (int k = 0; k < bits; k++) code |= (uint64_t)(s[(size_t)r * bits + k] > thr[k]) << k;
            RA_VEC_AT(int64_t, out, i0 + r) = (int64_t)code;
        }
    }
    ra_free(packs);
    ra_free(scratch);
    return RA_OK;
}
