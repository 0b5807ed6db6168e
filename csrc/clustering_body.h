/* clustering_body.h — typed routing-decision kernels; included by clustering.c per dtype
 * with T, IT (the signed integer of T's width), KT (kernel table type), KSEL (f32 | f64)
 * and FN(name) = name##_<suffix>. */

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
 * (ra_trials(c) + 1)) are scratch. */
static void FN(spherical_seed)(int n, int d, int c, const T *xn, const uint8_t *valid,
                               int64_t nvalid, uint64_t *rng, T *mu, T *best, double *w,
                               double *partial, int nt)
{
    const int nch = ra_nchunks(n), L = ra_trials(c);
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
                /* 3. keep the candidate with the least remaining potential */
                #pragma omp parallel for num_threads(nt) schedule(static)
                for (int k = 0; k < nch; k++) {
                    const int i1 = (k + 1) * RA_CHUNK < n ? (k + 1) * RA_CHUNK : n;
                    for (int t = 0; t < L; t++) {
                        const T *m = xn + (size_t)cand[t] * d;
                        double s = 0;
                        for (int i = k * RA_CHUNK; i < i1; i++) {
                            const T *xi = xn + (size_t)i * d;
                            T dot = 0;
                            for (int u = 0; u < d; u++) dot += xi[u] * m[u];
                            s += FN(seed_weight)(dot > best[i] ? dot : best[i], valid[i]);
                        }
                        pot[(size_t)k * L + t] = s;
                    }
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
            const T *xi = xn + (size_t)i * d;
            T dot = 0;
            for (int u = 0; u < d; u++) dot += xi[u] * m[u];
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
    int st = (xn && mu && ct && sums && best && partial && w && valid && lab && start && rows &&
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
            FN(spherical_seed)(n, d, c, xn, valid, nvalid, &rng, mu, best, w, partial, nt);
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
    ra_free(w); ra_free(valid); ra_free(lab); ra_free(start); ra_free(rows); ra_free(counts);
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
/* A candidate row of one cluster: its score (NaN stored as −inf) and position. */
typedef struct { T v; int32_t pos; } FN(RaScored);

/* a ranks above b: larger score, or equal score and lower position (a total order) */
static inline int FN(better)(FN(RaScored) a, FN(RaScored) b)
{
    return a.v > b.v || (a.v == b.v && a.pos < b.pos);
}

/* nth_element: reorder a (m) so that a[k] is the (k+1)-th best, a[0..k) better and
 * a(k..m) worse.  Quickselect with a median-of-three pivot, expected O(m). */
static void FN(select_nth)(FN(RaScored) *a, int m, int k)
{
    int lo = 0, hi = m - 1;
    while (hi - lo >= 3) {
        FN(RaScored) tmp;
#define RA_SWAP(i, j) (tmp = a[i], a[i] = a[j], a[j] = tmp)
        const int mid = lo + (hi - lo) / 2;
        if (FN(better)(a[mid], a[lo])) RA_SWAP(mid, lo);
        if (FN(better)(a[hi], a[lo])) RA_SWAP(hi, lo);
        if (FN(better)(a[hi], a[mid])) RA_SWAP(hi, mid);
        /* a[lo] >= a[mid] >= a[hi]: partition a[lo+1 .. hi-1] around p = a[mid] */
        const FN(RaScored) p = a[mid];
        RA_SWAP(mid, hi - 1);
        int i = lo, j = hi - 1;
        for (;;) {
            while (FN(better)(a[++i], p)) {}
            while (FN(better)(p, a[--j])) {}
            if (i >= j) break;
            RA_SWAP(i, j);
        }
        RA_SWAP(i, hi - 1);          /* pivot to its final slot i */
#undef RA_SWAP
        if (i == k) return;
        if (k < i) hi = i - 1; else lo = i + 1;
    }
    for (int i = lo + 1; i <= hi; i++)          /* at most 3 left: insertion sort */
        for (int j = i; j > lo && FN(better)(a[j], a[j - 1]); j--) {
            const FN(RaScored) tmp = a[j];
            a[j] = a[j - 1];
            a[j - 1] = tmp;
        }
}

#define RA_GROUP ((int)(64 / sizeof(T)))   /* clusters per work unit: one cache line of a row */
/* 16-byte GCC vectors (native SSE2 width: this file is built for baseline x86-64) and
 * the matching lane-mask type; a group's row of scores is 64 / 16 = 4 of them. */
typedef T FN(gvec) __attribute__((vector_size(16)));
typedef IT FN(givec) __attribute__((vector_size(16)));
#define RA_GVECS 4

/* The smallest value strictly above v (+inf stays +inf: admitting a later +inf row
 * costs a little work, never a wrong answer, since cut_back ranks exactly). */
static inline T FN(next_up)(T v)
{
    return sizeof(T) == 4 ? (T)nextafterf((float)v, INFINITY) : (T)nextafter((double)v, INFINITY);
}

/* Cut a candidate list bt (cnt, in position order) back to its best w, keeping position
 * order: the w-th best e is found by quickselect on a copy (tmp), then a stable filter
 * keeps the entries ranking at or above e.  Returns e. */
static FN(RaScored) FN(cut_back)(FN(RaScored) *bt, int cnt, int w, FN(RaScored) *tmp)
{
    memcpy(tmp, bt, sizeof(FN(RaScored)) * (size_t)cnt);
    FN(select_nth)(tmp, cnt, w - 1);
    const FN(RaScored) e = tmp[w - 1];
    int kept = 0;
    for (int r = 0; r < cnt; r++)
        if (!FN(better)(e, bt[r])) bt[kept++] = bt[r];
    return e;
}

/* One pass over rows of s (n, g) — g <= RA_GROUP clusters — keeping each cluster's best
 * w rows in buf (g, 2w), in position order.  Rows arrive in position order, so a row
 * ranks above the kept w-th best only with a strictly larger score: each cluster admits
 * a row iff its score >= lo[t], one vector compare per row for the whole group.
 *   lo == NULL: the first w rows all enter (NaN as −inf), exact for any input.
 *   lo given:   only scores >= lo[t] ever enter (a lower bound guessed from a sample);
 *               cnt[t] < w on return means the guess was too high for cluster t.
 * A full buffer is cut back to w, raising lo.  kth[t] = value of the w-th best kept. */
static void FN(top_pass)(RaMat s, int n, int g, int w, const T *lo_init, FN(RaScored) *buf,
                         FN(RaScored) *tmp, int *cnt, T *kth)
{
    T lo[RA_GROUP] __attribute__((aligned(64))), row[RA_GROUP] __attribute__((aligned(64)));
    for (int t = 0; t < RA_GROUP; t++) {          /* lanes >= g never admit */
        cnt[t] = 0;
        lo[t] = t >= g ? INFINITY : lo_init ? lo_init[t] : -INFINITY;
        row[t] = 0;
    }
    const int full = g == RA_GROUP && s.s1 == (ptrdiff_t)sizeof(T);
    for (int i = 0; i < n; i++) {
        const char *p = s.data + (ptrdiff_t)i * s.s0;
        if (full) memcpy(row, p, sizeof(row));
        else for (int t = 0; t < g; t++) row[t] = *(const T *)(p + (ptrdiff_t)t * s.s1);
        if (!lo_init && i < w) {                  /* exact mode: the first w rows enter */
            for (int t = 0; t < g; t++)
                buf[(size_t)t * 2 * w + cnt[t]++] = (FN(RaScored)){row[t] == row[t] ? row[t] : -INFINITY, i};
            if (i == w - 1)
                for (int t = 0; t < g; t++)
                    lo[t] = FN(next_up)(FN(cut_back)(buf + (size_t)t * 2 * w, w, w, tmp).v);
            continue;
        }
        /* one vector test for the group; NaN -> −inf first (quiet ==), so the ordered
           compare sees no NaN and a NaN score is never admitted */
        const FN(gvec) ninf = (FN(gvec)){0} - (T)INFINITY;
        FN(givec) hit = {0};
        for (int q = 0; q < RA_GVECS; q++) {
            FN(gvec) rv, lv;
            memcpy(&rv, row + q * (16 / sizeof(T)), sizeof(rv));
            memcpy(&lv, lo + q * (16 / sizeof(T)), sizeof(lv));
            const FN(givec) num = (FN(givec))(rv == rv);
            rv = (FN(gvec))(((FN(givec))rv & num) | ((FN(givec))ninf & ~num));
            memcpy(row + q * (16 / sizeof(T)), &rv, sizeof(rv));
            hit |= (FN(givec))(rv >= lv);
        }
        int any = 0;
        for (int l = 0; l < (int)(16 / sizeof(T)); l++) any |= hit[l] != 0;
        if (!any) continue;
        for (int t = 0; t < g; t++) {
            if (!(row[t] >= lo[t])) continue;
            FN(RaScored) *bt = buf + (size_t)t * 2 * w;
            bt[cnt[t]++] = (FN(RaScored)){row[t], i};
            if (cnt[t] == 2 * w) {
                lo[t] = FN(next_up)(FN(cut_back)(bt, cnt[t], w, tmp).v);
                cnt[t] = w;
            }
        }
    }
    for (int t = 0; t < g; t++) {
        if (cnt[t] < w) continue;
        kth[t] = FN(cut_back)(buf + (size_t)t * 2 * w, cnt[t], w, tmp).v;
        cnt[t] = w;
    }
}

/* scores (B; n, c) -> idx (B; c, w) int64: for each cluster the w rows with the largest
 * score (NaN counts as −inf), ties to the lower position, listed by position.
 *
 * Per group of RA_GROUP clusters (one cache line of a score row): when n is large
 * enough, a pass over a strided sample of 16w rows picks, per cluster, a score that
 * about 1.4w rows should reach; the full pass then admits only rows at or above it and
 * rarely has to cut its buffer back.  A cluster whose guess was too high is redone
 * exactly.  O(n) per cluster plus O(w) selections, never a sort of n. */
int FN(ra_top_members)(ptrdiff_t B, int n, int c, int w, RaBMat scores, RaBMat idx)
{
    const int nt = ra_num_threads();
    const int ngroups = (c + RA_GROUP - 1) / RA_GROUP;
    /* per thread: candidate buffers (RA_GROUP, 2w), a selection copy (2w) */
    const size_t buf_sz = ra_round_up(ra_mul(sizeof(FN(RaScored)), ra_mul(RA_GROUP, 2 * (size_t)w)));
    const size_t per_thread = ra_round_up(ra_add(buf_sz, ra_mul(sizeof(FN(RaScored)), 2 * (size_t)w)));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    if (!scratch) return RA_ERR_NOMEM;
    /* the sample: every k-th row, k = n / 16w; its w1-th best, w1 = 1.4·w·(rows/n) */
    const int k = n / (16 * w);
    const int ns = k >= 2 ? (n + k - 1) / k : 0;
    const int w1 = k >= 2 ? (int)(1.4 * w * ns / n) : 0;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * ngroups; unit++) {
        const ptrdiff_t b = unit / ngroups;
        const int j0 = (int)(unit % ngroups) * RA_GROUP;
        const int g = c - j0 < RA_GROUP ? c - j0 : RA_GROUP;
        char *base = scratch + (size_t)ra_thread_id() * per_thread;
        FN(RaScored) *buf = (FN(RaScored) *)base, *tmp = (FN(RaScored) *)(base + buf_sz);
        int cnt[RA_GROUP], c1[RA_GROUP];
        T kth[RA_GROUP], k1[RA_GROUP];
        RaMat s = ra_mat_at(scores, b), o = ra_mat_at(idx, b);
        s.data += (ptrdiff_t)j0 * s.s1;
        if (w1 >= 8) {
            /* 1. a lower bound per cluster from the sample, then the filtered pass */
            const RaMat sample = {s.data, s.s0 * k, s.s1};
            FN(top_pass)(sample, ns, g, w1, NULL, buf, tmp, cnt, kth);
            FN(top_pass)(s, n, g, w, kth, buf, tmp, cnt, kth);
        } else {
            FN(top_pass)(s, n, g, w, NULL, buf, tmp, cnt, kth);
        }
        for (int t = 0; t < g; t++) {
            FN(RaScored) *bt = buf + (size_t)t * 2 * w;
            if (cnt[t] < w) {               /* 2. the guess was too high: exact pass */
                const RaMat col = {s.data + (ptrdiff_t)t * s.s1, s.s0, s.s1};
                FN(top_pass)(col, n, 1, w, NULL, bt, tmp, c1, k1);
            }
            for (int r = 0; r < w; r++) RA_MAT_AT(int64_t, o, j0 + t, r) = bt[r].pos;
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
