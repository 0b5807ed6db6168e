/* combiner_body.h — typed Combiner drivers; included by combiner.c per dtype with T, KT,
 * KSEL and FN(name) defined.  Everything runs on the engine (engine.h): region
 * summaries, the per-query softmax over direct keys and summaries, and both backwards.
 *
 * Logits use scaled queries q̃ = scale·q throughout; gradients are accumulated with
 * respect to q̃ and multiplied by scale once at the end. */

/* ------------------------------------------------------------------ scratch */
/* One thread's tiles.  _d: direct keys of a query unit, _s: its summary entries,
 * _m: members of a region.  Backward-only pieces stay NULL in the forward. */
typedef struct {
    int64_t *qidx, *didx, *kid, *vid, *kloc, *vloc, *spos, *sqpos, *vids, *midx;
    int64_t *sid;                               /* summary entries' pair ids: -1 - vid */
    FN(RaQTile) qt;                             /* the engine's query tile, q in qs */
    FN(RaQGradTile) gt;                         /* its gradient tile (backward) */
    T *qs;
    T *kt_d, *v_d, *kt_s, *v_s, *kt_m, *v_m;    /* kᵀ (d, L) and v (L, e) packs, their leading
                                                   dimensions by ra_spread_ld */
    T *q_m;                                     /* members' q (L, d), unscaled */
    T *k_d, *vt_d, *k_s, *vt_s, *k_m, *vt_m;    /* k (L, d), vᵀ (e, L) (backward; k_m always,
                                                   with rows of d: it is pooled too) */
    T *dk_d, *dv_d, *dk_s, *dv_s, *dk_m, *dv_m; /* their gradients (backward) */
    T *dout, *lse, *delta, *dq;                 /* gradient tile's rows (backward) */
    RaRange span;                               /* a region unit's positions */
    int win0, win1, fresh;                      /* span columns in the _m packs; their
                                                   gradients not yet started (backward) */
    int ldt_m, ldv_m;                           /* the _m packs' kᵀ, vᵀ and v leading
                                                   dimensions (ra_spread_ld) */
    /* region units: each region's run [rlo, rhi) of span columns, its pooled key and
       (scaled) query, the span columns they came from (backward), a running scan, the
       tile's bitmap and finished rows */
    int *rlo, *rhi, *head, *next;
    int32_t *barg, *warg;
    int32_t *ak, *aq;
    T *pk, *pq, *run, *wbest, *otile, *olse;
    uint64_t *vis;
} FN(CWs);

static void FN(cws_layout)(FN(CWs) *w, RaArena *a, const RaCSizes *z, int d, int e, int bwd)
{
    const size_t I = sizeof(int64_t), S = sizeof(T), BQ = RA_BQ, BK = RA_BK;
    memset(w, 0, sizeof(*w));
    w->qidx = ra_take(a, z->maxQ, I);
    w->didx = ra_take(a, z->maxD, I);
    w->kid = ra_take(a, z->maxS, I);
    w->vid = ra_take(a, z->maxS, I);
    w->kloc = ra_take(a, z->maxS, I);
    w->vloc = ra_take(a, z->maxS, I);
    w->spos = ra_take(a, z->maxS, I);
    w->sid = ra_take(a, z->maxS, I);
    w->sqpos = ra_take(a, BQ, I);
    w->vids = ra_take(a, z->maxV, I);
    w->midx = ra_take(a, z->maxMem, I);
    w->qs = FN(ra_qtile_layout)(&w->qt, a, RA_BQ, d, e);
    w->kt_d = ra_take(a, ra_spread_size(d, (int)z->maxD, S), S);
    w->v_d = ra_take(a, ra_spread_size((int)z->maxD, e, S), S);
    w->kt_s = ra_take(a, ra_spread_size(d, (int)z->maxS, S), S);
    w->v_s = ra_take(a, ra_spread_size((int)z->maxS, e, S), S);
    w->kt_m = ra_take(a, ra_spread_size(d, (int)z->maxMem, S), S);
    w->v_m = ra_take(a, ra_spread_size((int)z->maxMem, e, S), S);
    w->q_m = ra_take(a, ra_mul(z->maxMem, d), S);
    w->k_m = ra_take(a, ra_mul(z->maxMem, d), S);
    w->rlo = ra_take(a, z->maxV, sizeof(int));
    w->rhi = ra_take(a, z->maxV, sizeof(int));
    w->head = ra_take(a, z->maxMem, sizeof(int));
    w->next = ra_take(a, z->maxV, sizeof(int));
    w->barg = ra_take(a, d, sizeof(int32_t));
    w->warg = ra_take(a, d, sizeof(int32_t));
    w->wbest = ra_take(a, d, S);
    w->pk = ra_take(a, ra_mul(z->maxV, d), S);
    w->pq = ra_take(a, ra_mul(z->maxV, d), S);
    w->run = ra_take(a, d, S);
    w->otile = ra_take(a, BQ * e, S);
    w->olse = ra_take(a, BQ, S);
    w->vis = ra_take(a, BQ * (BK / 64), sizeof(uint64_t));
    if (bwd) {
        w->ak = ra_take(a, ra_mul(z->maxV, d), sizeof(int32_t));
        w->aq = ra_take(a, ra_mul(z->maxV, d), sizeof(int32_t));
        w->k_d = ra_take(a, ra_spread_size((int)z->maxD, d, S), S);
        w->vt_d = ra_take(a, ra_spread_size(e, (int)z->maxD, S), S);
        w->k_s = ra_take(a, ra_spread_size((int)z->maxS, d, S), S);
        w->vt_s = ra_take(a, ra_spread_size(e, (int)z->maxS, S), S);
        w->vt_m = ra_take(a, ra_spread_size(e, (int)z->maxMem, S), S);
        w->dk_d = ra_take(a, ra_mul(z->maxD, d), S);
        w->dv_d = ra_take(a, ra_mul(z->maxD, e), S);
        w->dk_s = ra_take(a, ra_mul(z->maxS, d), S);
        w->dv_s = ra_take(a, ra_mul(z->maxS, e), S);
        w->dk_m = ra_take(a, ra_mul(z->maxMem, d), S);
        w->dv_m = ra_take(a, ra_mul(z->maxMem, e), S);
        w->dout = ra_take(a, BQ * e, S);
        w->lse = ra_take(a, BQ, S);
        w->delta = ra_take(a, BQ, S);
        w->dq = ra_take(a, BQ * d, S);
        FN(ra_qgrad_layout)(&w->gt, a, RA_BQ, &w->qt);
        w->gt.q = w->qs;
        w->gt.dout = w->dout;
        w->gt.lse = w->lse;
        w->gt.delta = w->delta;
        w->gt.dq = w->dq;
    }
}

/* One problem's shared tables.  khat (nk, d), vhat (nv, e), rlse (nv): the region
 * summaries of one phase (ra_cplan_phase; row = id − kbase or vid − vbase);
 * st_acc (n, e), st_mx, st_sum (n): online-softmax state carried between passes (plans
 * with two passes only).  Backward: lse, delta (n), out (n, e) when it is recomputed;
 * dqs (n, d) w.r.t. q̃, dks (n, d), dvs (n, e) unless the outputs themselves are
 * contiguous and serve as the accumulators; dkhat (nk, d), dvhat (nv, e); slots of
 * summary gradients, unit offsets. */
typedef struct {
    T *khat, *vhat, *rlse, *st_acc, *st_mx, *st_sum;
    T *out, *lse, *delta, *dqs, *dks, *dvs, *dkhat, *dvhat, *slot_dk, *slot_dv;
    int64_t *slot_kid, *slot_vid, *offs;
    int64_t budget;        /* slots */
    int64_t kbase, vbase;  /* the phase whose summaries the tables hold */
    /* pair terms (engine.h): the direct keys' (dropout and bias) and the summary entries'
       (dropout only, column ids -1 - vid), NULL when none; backward: dbias (2n - 1, at
       offset n - 1 = same position) accumulates the direct pairs' bias gradient, or NULL */
    FN(RaPairs) pr, sp;
    const FN(RaPairs) *direct_pairs, *summary_pairs;
    T *dbias;
} FN(CTab);

static void FN(ctab_layout)(FN(CTab) *t, RaArena *a, const RaCPlan *p, const RaCSizes *z,
                            int d, int e, int mode)
{
    const size_t S = sizeof(T), n = (size_t)p->n;
    int64_t NK = 0, R = 0;   /* table rows: the largest phase */
    for (int ph = 0; ph < ra_cplan_nphases(p); ph++) {
        const RaCPhase f = ra_cplan_phase(p, ph);
        NK = f.nk > NK ? f.nk : NK;
        R = f.nv > R ? f.nv : R;
    }
    memset(t, 0, sizeof(*t));
    t->khat = ra_take(a, ra_mul(NK, d), S);
    t->vhat = ra_take(a, ra_mul(R, e), S);
    t->rlse = ra_take(a, R, S);
    if (ra_cplan_npasses(p) > 1) {
        t->st_acc = ra_take(a, ra_mul(n, e), S);
        t->st_mx = ra_take(a, n, S);
        t->st_sum = ra_take(a, n, S);
    }
    if (!(mode & RA_CT_BACKWARD)) return;
    t->budget = p->n < RA_SLOT_BUDGET ? p->n : RA_SLOT_BUDGET;
    t->budget = z->maxS > t->budget ? z->maxS : t->budget;
    if (mode & RA_CT_OUT) t->out = ra_take(a, ra_mul(n, e), S);
    t->lse = ra_take(a, n, S);
    t->delta = ra_take(a, n, S);
    if (mode & RA_CT_GRADS) {
        t->dqs = ra_take(a, ra_mul(n, d), S);
        t->dks = ra_take(a, ra_mul(n, d), S);
        t->dvs = ra_take(a, ra_mul(n, e), S);
    }
    t->dkhat = ra_take(a, ra_mul(NK, d), S);
    t->dvhat = ra_take(a, ra_mul(R, e), S);
    t->slot_dk = ra_take(a, ra_mul(t->budget, d), S);
    t->slot_dv = ra_take(a, ra_mul(t->budget, e), S);
    t->slot_kid = ra_take(a, t->budget, sizeof(int64_t));
    t->slot_vid = ra_take(a, t->budget, sizeof(int64_t));
    t->offs = ra_take(a, z->maxUnits + 1, sizeof(int64_t));
}

/* Grow-only buffer: *buf holds at least `bytes`.  RA_ERR_NOMEM on failure. */
static int FN(cgrow)(char **buf, size_t *have, size_t bytes)
{
    if (bytes <= *have) return RA_OK;
    ra_free(*buf);
    *buf = ra_alloc(bytes);
    *have = *buf ? bytes : 0;
    return *buf ? RA_OK : RA_ERR_NOMEM;
}

/* ------------------------------------------------------------------ small helpers */
static void FN(range_list)(RaRange r, int64_t *idx)
{
    for (int64_t j = 0; j < r.count; j++) idx[j] = r.start + j * r.stride;
}

static void FN(pool_emit)(const T *best, const int32_t *barg, int d, T mul, T *dst, int32_t *arg)
{
    for (int c = 0; c < d; c++) dst[c] = best[c] * mul;
    if (arg) memcpy(arg, barg, sizeof(int32_t) * (size_t)d);
}

/* Max-pool every region of a unit at once.  x (L, d) packed over the unit's span; region
 * r covers rows [lo[r], hi[r]).  dst (nv, d) = mul · element-wise max, arg (nv, d,
 * optional) = the row it came from (ties: the lowest).  Regions that start the span
 * (prefixes) share one running scan upwards, regions that end it (suffixes) one scan
 * downwards, so nested runs (fixed, axial, mixture) cost O((L + nv)·d), not O(Σ runs·d);
 * any other run is scanned on its own.  Scratch: best (d), barg (d), head (L), next (nv). */
static void FN(pool_regions)(const T *x, int L, int nv, const int *lo, const int *hi, int d,
                             T mul, T *dst, int32_t *arg, T *best, int32_t *barg, int *head,
                             int *next)
{
    const KT *K = &ra_kernels()->KSEL;       /* the running maxima: K->pool_scan */
    for (int dir = 0; dir < 2; dir++) {   /* 0: prefixes, 1: suffixes (not prefixes) */
        int reach = dir ? L : -1;          /* last row the scan must visit */
        for (int j = 0; j < L; j++) head[j] = -1;
        for (int r = nv - 1; r >= 0; r--) {
            const int in = dir ? lo[r] > 0 && hi[r] == L : lo[r] == 0;
            if (!in) continue;
            const int at = dir ? lo[r] : hi[r] - 1;   /* emit when the scan reaches it */
            next[r] = head[at];
            head[at] = r;
            reach = dir ? (at < reach ? at : reach) : (at > reach ? at : reach);
        }
        if (dir ? reach == L : reach < 0) continue;
        const int j0 = dir ? L - 1 : 0, step = dir ? -1 : 1;
        for (int c = 0; c < d; c++) best[c] = -INFINITY, barg[c] = j0;
        for (int j = j0;; ) {          /* scan to the next row that ends a region, emit */
            int stop = j;
            while (stop != reach && head[stop] < 0) stop += step;
            K->pool_scan(x, d, j, stop + step, step, d, best, barg, !dir);
            for (int r = head[stop]; r >= 0; r = next[r])
                FN(pool_emit)(best, barg, d, mul, dst + (ptrdiff_t)r * d, arg ? arg + (ptrdiff_t)r * d : NULL);
            if (stop == reach) break;
            j = stop + step;
        }
    }
    for (int r = 0; r < nv; r++) {
        if (lo[r] == 0 || hi[r] == L || hi[r] <= lo[r]) continue;
        for (int c = 0; c < d; c++) best[c] = -INFINITY, barg[c] = lo[r];
        K->pool_scan(x, d, lo[r], hi[r], 1, d, best, barg, 1);
        FN(pool_emit)(best, barg, d, mul, dst + (ptrdiff_t)r * d, arg ? arg + (ptrdiff_t)r * d : NULL);
    }
}

/* The span of a region unit is packed in windows of span columns: one window for the
 * whole span, except for a unit of one long region (longer than RA_SPAN_WINDOW; the upper
 * logsparse levels), which is pooled and attended window by window so that the scratch
 * stays bounded (ra_cplan_sizes).  A tile of keys never straddles two windows. */

/* span columns [x0, x1) -> their positions in midx */
static void FN(window_positions)(FN(CWs) *w, int x0, int x1)
{
    const RaRange r = {w->span.start + x0 * w->span.stride, x1 - x0, w->span.stride};
    FN(range_list)(r, w->midx);
}

/* Pack window [x0, x1): the forward kᵀ (d, W), v (W, e), and k (W, d) when with_k; the
 * backward (bwd) kᵀ, k and vᵀ (e, W).  Its gradients start afresh (FN(region_window)). */
static void FN(pack_window)(FN(CWs) *w, int x0, int x1, RaMat k, RaMat v, int d, int e,
                            int with_k, int bwd)
{
    const int W = x1 - x0;
    FN(window_positions)(w, x0, x1);
    w->ldt_m = ra_spread_ld(W, sizeof(T));
    w->ldv_m = ra_spread_ld(e, sizeof(T));
    FN(ra_gather)(k, w->midx, 0, W, d, 1, 1, w->kt_m, w->ldt_m);
    if (!bwd) FN(ra_gather)(v, w->midx, 0, W, e, 1, 0, w->v_m, w->ldv_m);
    if (with_k || bwd) FN(ra_gather)(k, w->midx, 0, W, d, 1, 0, w->k_m, d);   /* pooled too */
    if (bwd) FN(ra_gather)(v, w->midx, 0, W, e, 1, 1, w->vt_m, w->ldt_m);
    w->win0 = x0, w->win1 = x1, w->fresh = 1;
}

/* Running max-pool of a long region, one window (W rows of x) at a time: a window's
 * maximum replaces the running one only if greater, so ties keep the first row, as in
 * one scan.  best, arg (d): the running maxima and their span columns (arg optional). */
static void FN(pool_window)(FN(CWs) *w, const T *x, int x0, int W, int d, T *best, int32_t *arg)
{
    const int lo = 0;
    FN(pool_regions)(x, W, 1, &lo, &W, d, 1, w->wbest, w->warg, w->run, w->barg, w->head, w->next);
    for (int c = 0; c < d; c++)
        if (w->wbest[c] > best[c]) {
            best[c] = w->wbest[c];
            if (arg) arg[c] = x0 + w->warg[c];
        }
}

/* Set up region unit u of wave w: each region's run of span columns, pooled keys pk and
 * scaled queries pq (their span columns into ak, aq in the backward); one window unit
 * leaves its span packed. */
static int64_t FN(region_unit_setup)(const RaCPlan *p, FN(CWs) *w, int wave, int64_t u, RaMat q,
                                     RaMat k, RaMat v, T sc, int d, int e, int bwd)
{
    const int64_t nv = ra_cplan_wave_unit(p, wave, u, w->vids);
    if (nv == 0) return 0;
    w->span = ra_cplan_wave_span(p, wave, u);
    const int L = (int)w->span.count;
    for (int64_t r = 0; r < nv; r++) {
        const RaRange m = ra_cplan_region(p, w->vids[r]).members;
        w->rlo[r] = (int)((m.start - w->span.start) / w->span.stride);
        w->rhi[r] = w->rlo[r] + (int)m.count;
    }
    int32_t *ak = bwd ? w->ak : NULL, *aq = bwd ? w->aq : NULL;
    if (nv > 1 || L <= RA_SPAN_WINDOW || w->rlo[0] != 0 || w->rhi[0] != L) {
        FN(pack_window)(w, 0, L, k, v, d, e, 1, bwd);
        FN(ra_gather)(q, w->midx, 0, L, d, 1, 0, w->q_m, d);
        FN(pool_regions)(w->k_m, L, (int)nv, w->rlo, w->rhi, d, 1, w->pk, ak, w->run, w->barg,
                         w->head, w->next);
        FN(pool_regions)(w->q_m, L, (int)nv, w->rlo, w->rhi, d, sc, w->pq, aq, w->run, w->barg,
                         w->head, w->next);
        return nv;
    }
    for (int c = 0; c < d; c++) {   /* one region, covering the span */
        w->pk[c] = w->pq[c] = -INFINITY;
        if (bwd) ak[c] = aq[c] = 0;
    }
    for (int x0 = 0; x0 < L; x0 += RA_SPAN_WINDOW) {
        const int W = L - x0 < RA_SPAN_WINDOW ? L - x0 : RA_SPAN_WINDOW;
        FN(window_positions)(w, x0, x0 + W);
        FN(ra_gather)(k, w->midx, 0, W, d, 1, 0, w->k_m, d);
        FN(ra_gather)(q, w->midx, 0, W, d, 1, 0, w->q_m, d);
        FN(pool_window)(w, w->k_m, x0, W, d, w->pk, ak);
        FN(pool_window)(w, w->q_m, x0, W, d, w->pq, aq);
    }
    for (int c = 0; c < d; c++) w->pq[c] *= sc;
    w->win0 = w->win1 = 0;   /* nothing packed for the attention yet */
    return nv;
}

/* Make the window holding span column j0 the packed one; returns how many key columns
 * from j0 a tile may take (up to RA_BK, c1 and the window's end).  Backward: the window
 * left behind has its gradients added to dks, dvs (FN(region_flush)), and a fresh one
 * starts from the pooled keys' gradients dk̂ at their arg-max columns. */
static void FN(region_flush)(FN(CWs) *w, int d, int e, FN(CTab) *tb);
static int FN(region_window)(const RaCPlan *p, FN(CWs) *w, int64_t nv, int j0, int c1, RaMat k,
                             RaMat v, int d, int e, FN(CTab) *tb, int bwd)
{
    if (j0 < w->win0 || j0 >= w->win1) {
        if (bwd && w->win1 > w->win0 && !w->fresh) FN(region_flush)(w, d, e, tb);
        const int x0 = j0 / RA_SPAN_WINDOW * RA_SPAN_WINDOW, L = (int)w->span.count;
        FN(pack_window)(w, x0, L - x0 < RA_SPAN_WINDOW ? L : x0 + RA_SPAN_WINDOW, k, v, d, e, 0, bwd);
    }
    if (bwd && w->fresh) {
        const int W = w->win1 - w->win0;
        memset(w->dk_m, 0, sizeof(T) * (size_t)W * d);
        memset(w->dv_m, 0, sizeof(T) * (size_t)W * e);
        for (int64_t r = 0; r < nv; r++) {
            const RaCRegion h = ra_cplan_region(p, w->vids[r]);
            if (!h.owns_kid) continue;
            for (int c = 0; c < d; c++) {
                const int at = w->ak[r * d + c] - w->win0;
                if (at >= 0 && at < W)
                    w->dk_m[(ptrdiff_t)at * d + c] += tb->dkhat[(h.kid - tb->kbase) * d + c];
            }
        }
        w->fresh = 0;
    }
    const int room = (c1 < w->win1 ? c1 : w->win1) - j0;
    return room < RA_BK ? room : RA_BK;
}

/* Regions a..b of the unit as one query tile: rows = their queries (pooled, or the
 * region's query row), keys = the hull [*j0, *j1) of their runs.  Returns 1 when the
 * rows' runs differ, so each key tile needs the bitmap of FN(region_vis). */
static int FN(region_tile)(const RaCPlan *p, FN(CWs) *w, int64_t a, int64_t b, RaMat q, T sc,
                           int d, int *j0, int *j1)
{
    int ragged = 0;
    *j0 = w->rlo[a], *j1 = w->rhi[a];
    for (int64_t r = a; r < b; r++) {
        const RaCRegion h = ra_cplan_region(p, w->vids[r]);
        T *qr = w->qs + (ptrdiff_t)(r - a) * d;
        if (h.qsrc >= 0) FN(ra_gather)(q, NULL, h.qsrc, 1, d, sc, 0, qr, d);
        else memcpy(qr, w->pq + (ptrdiff_t)r * d, sizeof(T) * (size_t)d);
        ragged |= w->rlo[r] != w->rlo[a] || w->rhi[r] != w->rhi[a];
        *j0 = w->rlo[r] < *j0 ? w->rlo[r] : *j0;
        *j1 = w->rhi[r] > *j1 ? w->rhi[r] : *j1;
    }
    return ragged;
}

/* bitmap of the key tile of span columns [c0, c0 + cols): row r sees its own run */
static const uint64_t *FN(region_vis)(FN(CWs) *w, int64_t a, int rows, int c0, int cols)
{
    const int ld = RA_BK / 64;
    memset(w->vis, 0, sizeof(uint64_t) * (size_t)rows * ld);
    for (int r = 0; r < rows; r++) {
        const int lo = w->rlo[a + r] - c0 > 0 ? w->rlo[a + r] - c0 : 0;
        const int hi = w->rhi[a + r] - c0 < cols ? w->rhi[a + r] - c0 : cols;
        for (int j = lo; j < hi; j++) w->vis[r * ld + (j >> 6)] |= (uint64_t)1 << (j & 63);
    }
    return w->vis;
}

/* The key list of a region tile: span columns [c0, c1), packed a window at a time by
 * FN(region_window) as the engine reaches them (a tile never crosses a window). */
typedef struct {
    const RaCPlan *p;
    FN(CWs) *w;
    FN(CTab) *tb;
    RaMat k, v;
    int64_t nv, a;           /* regions of the unit; the tile's first region */
    int c0, c1, d, e, bwd;
} FN(CRegionKeys);

static void FN(region_load)(void *ctx, int j0, int rows, int need, FN(RaKTile) *t)
{
    const FN(CRegionKeys) *c = ctx;
    FN(CWs) *w = c->w;
    const int d = c->d, e = c->e;
    (void)rows, (void)need;
    t->cols = FN(region_window)(c->p, w, c->nv, c->c0 + j0, c->c1, c->k, c->v, d, e, c->tb,
                                c->bwd);
    const int x = c->c0 + j0 - w->win0;
    t->kt = w->kt_m + x;
    t->ldkt = w->ldt_m;
    if (!c->bwd) {
        t->v = w->v_m + (ptrdiff_t)x * w->ldv_m, t->ldv = w->ldv_m;
        return;
    }
    t->k = w->k_m + (ptrdiff_t)x * d, t->ldk = d;
    t->vt = w->vt_m + x, t->ldvt = w->ldt_m;
    t->dk = w->dk_m + (ptrdiff_t)x * d;
    t->dv = w->dv_m + (ptrdiff_t)x * e;
}

/* Ragged region tiles: row r of the tile sees its own region's run. */
static const uint64_t *FN(region_tile_vis)(void *ctx, int rows, int j0, int cols, ptrdiff_t *ldvis)
{
    const FN(CRegionKeys) *c = ctx;
    *ldvis = RA_BK / 64;
    return FN(region_vis)(c->w, c->a, rows, c->c0 + j0, cols);
}

static FN(RaKeys) FN(region_keys)(FN(CRegionKeys) *c, int ragged)
{
    const FN(RaKeys) keys = {.count = c->c1 - c->c0, .load = FN(region_load),
                             .tile_vis = ragged ? FN(region_tile_vis) : NULL, .ctx = c};
    return keys;
}

#include "combiner_passes_body.h"

