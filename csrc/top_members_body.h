/* top_members_body.h — balanced membership: top_members (the w best rows
 * of each cluster's score column) and assign_top_members (scores and selection fused).
 * Included by clustering_body.h (once per type, with its macros). */

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
    (void)ra_worker_flags(nt, FE_INVALID);
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
        ptrdiff_t ldx;
        const T *xr = FN(ra_rows)(x, i0, rows, d, xs, &ldx);
        K->gemm(rows, nb, d, xr, ldx, ct + jb, c, cols + (size_t)i0 * 16, 16, 0);
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
        /* a product's flag raised on a worker, here before top_members clears its workers' */
        ra_lift_worker_flags(ra_num_threads(), FE_INVALID);
        if (status == RA_OK) status = FN(ra_top_members)(1, n, c, w, sv, ib);
    }
    ra_free(scores);
    return status;
}

/* One thread's scratch of assign_top's first and last steps: top_members' scratch (the
 * last step joins a cluster's part lists into list 0), then the x block (RA_ROWS, d), a
 * score tile (RA_ROWS, cb), and score_block's columns (n, 16). */
typedef struct { FN(TopScratch) ts; T *x, *scores, *cols; } FN(AssignTopTile);

static void FN(assign_top_tile)(RaArena *a, int n, int w, int d, int cb, int cap,
                                FN(AssignTopTile) *t)
{
    FN(top_scratch)(a, n, w, cb, cap, &t->ts);
    t->x = RA_TAKE(a, T, ra_mul(RA_ROWS, d));
    t->scores = RA_TAKE(a, T, ra_mul(RA_ROWS, cb));
    t->cols = RA_TAKE(a, T, ra_mul(n, 16));
}

/* One row part of assign_top's second step: its own copy of the thresholds (c) — top_admit
 * closes a full list by setting its threshold to NaN — list counts (c + 1), candidate
 * lists (c + 1 of cap + RA_TOP_SLACK slots), and assign_rows' tile over all c columns. */
typedef struct { T *thr; int *cnt; int32_t *pos; T *val; FN(AssignTile) tile; } FN(AssignTopPart);

static void FN(assign_top_part)(RaArena *a, int d, int c, int cap, FN(AssignTopPart) *p)
{
    const size_t L = (size_t)cap + RA_TOP_SLACK;
    p->thr = RA_TAKE(a, T, (size_t)c);
    p->cnt = RA_TAKE(a, int, (size_t)c + 1);
    p->pos = RA_TAKE(a, int32_t, ra_mul((size_t)c + 1, L));
    p->val = RA_TAKE(a, T, ra_mul((size_t)c + 1, L));
    FN(assign_tile)(a, d, c, &p->tile);
}

/* Step 3 of assign_top for the clusters [j0, j0 + 16) of one problem: each cluster's part
 * lists (parts of them, per_part bytes apart) joined in row order into list 0 of at's
 * scratch, then its w best from there; a list that fell short, overflowed in some part,
 * or had θ = −inf: the exact path on the block's columns, scored again (score_block). */
static void FN(assign_top_select)(const KT *K, RaMat xb, RaMat o, int n, int d, int c, int w,
                                  int cap, const T *ct, int j0, const char *part_mem,
                                  size_t per_part, int parts, FN(AssignTopTile) *at)
{
    const int j1 = j0 + 16 < c ? j0 + 16 : c;
    const size_t L = (size_t)cap + RA_TOP_SLACK;
    FN(TopScratch) ts = at->ts;
    int scored = 0;
    for (int j = j0; j < j1; j++) {
        FN(AssignTopPart) pp;
        int total = 0;
        for (int part = 0; part < parts; part++) {
            FN(assign_top_part)(&(RaArena){(char *)part_mem + (size_t)part * per_part, 0}, d, c,
                                cap, &pp);
            total += pp.cnt[j];
        }
        if (total >= w && total < cap) {     /* no part overflowed: join them */
            ts.cnt[0] = 0;
            for (int part = 0; part < parts; part++) {
                FN(assign_top_part)(&(RaArena){(char *)part_mem + (size_t)part * per_part, 0}, d,
                                    c, cap, &pp);
                const int cnt = pp.cnt[j];
                memcpy(ts.pos + ts.cnt[0], pp.pos + (size_t)j * L, sizeof(int32_t) * (size_t)cnt);
                memcpy(ts.val + ts.cnt[0], pp.val + (size_t)j * L, sizeof(T) * (size_t)cnt);
                ts.cnt[0] += cnt;
            }
            FN(top_from_list)(&ts, 0, cap, w, o, j);
            continue;
        }
        if (!scored) FN(score_block)(K, xb, n, d, ct, c, j0, at->x, at->cols);
        scored = 1;
        FN(top_column_exact)((const char *)(at->cols + (j - j0)), 16 * sizeof(T), n, w, ts.tmp,
                             ts.tmp2, ts.sel, o, j);
    }
}

/* x (B; n, d), centroids (B; c, d) -> labels (B; n) int64, best (B; n), idx (B; c, w)
 * int64: bit for bit ra_assign_clusters (labels and best) followed by ra_top_members on
 * the scores x·μᵀ, without storing the (n, c) scores.  Per problem:
 *  1. the sampled rows 0, k, 2k, ... are scored and set each cluster's threshold θ
 *     (units of the adjacent clusters ra_top_group gives a thread, a multiple of 16, so
 *     every score comes out of the same vector or tail path of the gemm as in assign_rows);
 *  2. the rows, split into as many contiguous parts as threads, RA_ROWS at a time: the
 *     scores of all c clusters into a tile that stays in cache, its argmax (assign_rows'
 *     computation: the labels and best scores), and top_admit appends the rows reaching θ
 *     to the part's list of each cluster;
 *  3. per cluster, its part lists joined in row order are the one list a single pass would
 *     make, and the w best are selected from it; the clusters whose list fell short,
 *     overflowed, or whose θ is −inf take the exact path on their column, scored again
 *     16 columns at a time (score_block).
 * A thread reads only its part's rows (the rows the caller's parallel loops wrote on
 * the same thread, when they split the same way), and no result depends on the split or
 * the thread count.  The caller's FE_INVALID is kept, and raised if a product raised it
 * (as assign_clusters would), never by the comparisons.  Without a sampling plan (w <=
 * RA_TOPM, or n small against w), below RA_FUSE_SCORES scores (where storing them costs
 * less), or where the parts' lists would take more memory than the scores (many threads),
 * the scores are stored instead: the same result either way. */
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
    const int cb = ra_top_group(c, nt), units = (c + cb - 1) / cb;
    const int ldt = (cb + 15) / 16 * 16, S = (n + k - 1) / k;
    const int nblk = (n + RA_ROWS - 1) / RA_ROWS, parts = nt < nblk ? nt : nblk;
    RaArena measure = {NULL, 0}, measure_part = {NULL, 0};
    FN(AssignTopTile) t0;
    FN(assign_top_tile)(&measure, n, w, d, cb, cap, &t0);
    FN(AssignTopPart) p0;
    FN(assign_top_part)(&measure_part, d, c, cap, &p0);
    const size_t per_thread = measure.used, per_part = measure_part.used;
    /* the parts' lists (about c lists of cap + RA_TOP_SLACK per thread) must cost less
       memory than the scores they replace, else the scores are stored (many threads) */
    if ((double)per_part * parts > (double)n * c * sizeof(T))
        return FN(assign_top_stored)(B, n, d, c, w, x, centroids, labels, best, idx);
    fexcept_t fe_saved;
    fegetexceptflag(&fe_saved, FE_INVALID);
    int invalid = 0;                   /* a product raised FE_INVALID */
    T *ct = ra_alloc(ra_mul(sizeof(T), ra_mul((size_t)d, c)));
    T *thr = ra_alloc(ra_mul(sizeof(T), (size_t)c));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    char *part_mem = ra_alloc(ra_mul(per_part, (size_t)parts));
    if (!ct || !thr || !scratch || !part_mem) {
        ra_free(ct); ra_free(thr); ra_free(scratch); ra_free(part_mem);
        return RA_ERR_NOMEM;
    }
    for (ptrdiff_t b = 0; b < B; b++) {
        const RaMat xb = ra_mat_at(x, b), o = ra_mat_at(idx, b);
        const RaMat xk = {xb.data, xb.s0 * k, xb.s1};      /* the sampled rows */
        const RaVec lv = ra_vec_at(labels, b), bv = ra_vec_at(best, b);
        FN(pack_transposed)(ra_mat_at(centroids, b), c, d, ct);
        /* 1. thresholds from the sampled rows */
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int unit = 0; unit < units; unit++) {
            const int j0 = unit * cb, g = c - j0 < cb ? c - j0 : cb;
            FN(AssignTopTile) at;
            FN(assign_top_tile)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, n,
                                w, d, cb, cap, &at);
            FN(TopScratch) ts = at.ts;
            for (int q = 0; q < RA_TOPM * ldt; q++) ts.top[q] = -(T)INFINITY;
            for (int s0 = 0; s0 < S; s0 += RA_ROWS) {
                const int rows = S - s0 < RA_ROWS ? S - s0 : RA_ROWS;
                ptrdiff_t ldx;
                const T *xr = FN(ra_rows)(xk, s0, rows, d, at.x, &ldx);
                K->gemm(rows, g, d, xr, ldx, ct + j0, c, at.scores, cb, 0);
                K->top_sample(rows, g, at.scores, cb, RA_TOPM, ts.top, ldt, NULL);
            }
            FN(top_thresholds)(g, &ts, ldt);
            memcpy(thr + j0, ts.thr, sizeof(T) * (size_t)g);
        }
        /* 2. every row: labels, best scores, and admission into its part's lists */
        #pragma omp parallel for num_threads(nt) schedule(static) reduction(|:invalid)
        for (int part = 0; part < parts; part++) {
            FN(AssignTopPart) ap;
            FN(assign_top_part)(&(RaArena){part_mem + (size_t)part * per_part, 0}, d, c, cap, &ap);
            memcpy(ap.thr, thr, sizeof(T) * (size_t)c);
            memset(ap.cnt, 0, sizeof(int) * ((size_t)c + 1));
            const int blk1 = (int)((int64_t)(part + 1) * nblk / parts);
            for (int blk = (int)((int64_t)part * nblk / parts); blk < blk1; blk++) {
                const int i0 = blk * RA_ROWS, rows = n - i0 < RA_ROWS ? n - i0 : RA_ROWS;
                ptrdiff_t ldx;
                const T *xr = FN(ra_rows)(xb, i0, rows, d, ap.tile.x, &ldx);
                feclearexcept(FE_INVALID);
                K->gemm(rows, c, d, xr, ldx, ct, c, ap.tile.scores, c, 0);
                invalid |= fetestexcept(FE_INVALID) != 0;
                K->argmax_rows(rows, c, ap.tile.scores, c, ap.tile.arg, ap.tile.best);
                for (int r = 0; r < rows; r++) {
                    RA_VEC_AT(int64_t, lv, i0 + r) = ap.tile.arg[r];
                    RA_VEC_AT(T, bv, i0 + r) = ap.tile.best[r];
                }
                K->top_admit(rows, c, ap.tile.scores, c, i0, ap.thr, cap, ap.cnt, ap.pos, ap.val);
            }
        }
        /* 3. selection: from the joined lists, or exact on columns scored again */
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int blk = 0; blk < (c + 15) / 16; blk++) {
            FN(AssignTopTile) at;
            FN(assign_top_tile)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, n,
                                w, d, cb, cap, &at);
            FN(assign_top_select)(K, xb, o, n, d, c, w, cap, ct, blk * 16, part_mem, per_part,
                                  parts, &at);
        }
    }
    ra_free(ct);
    ra_free(thr);
    ra_free(scratch);
    ra_free(part_mem);
    (void)ra_worker_flags(nt, FE_INVALID);    /* a product's is in `invalid` */
    fesetexceptflag(&fe_saved, FE_INVALID);
    if (invalid) feraiseexcept(FE_INVALID);
    return RA_OK;
}
