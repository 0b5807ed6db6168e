/* clustered_body.h — typed clustered-attention planner; included by clustered.c per dtype
 * with T, KT, KSEL and FN(name) = name##_<suffix>. */

/* ------------------------------------------------------------------ top-k candidates */
/* One candidate key of a cluster's top-k: its centroid logit and position. */
typedef struct { T v; int64_t j; } FN(ClCand);

/* a ranks above b: larger logit, ties to the lower key; NaN ranks below any number. */
static inline int FN(cl_better)(FN(ClCand) a, FN(ClCand) b)
{
    if (a.v != a.v) return b.v != b.v && a.j < b.j;
    if (b.v != b.v) return 1;
    return a.v > b.v || (a.v == b.v && a.j < b.j);
}

static int FN(cl_cmp_key)(const void *a, const void *b)
{
    const int64_t x = ((const FN(ClCand) *)a)->j, y = ((const FN(ClCand) *)b)->j;
    return (x > y) - (x < y);
}

/* ------------------------------------------------------------------ per-problem buffers */
typedef struct {
    int64_t *order;      /* (n) query positions grouped by cluster, position order inside */
    int64_t *start;      /* (C+1) members of c are order[start[c] .. start[c+1]) */
    int64_t *cursor;     /* (C) counting-sort scratch */
    int64_t *info;       /* (2) unmasked key count, k = min(topk, unmasked) */
    T *cent;             /* (C, d) centroids, unscaled */
    T *oc, *lsec;        /* (C, e), (C) centroid attention output and log-sum-exp */
    T *part_o, *part_lse; /* (C, G, e), (C, G) the same over key group g only */
    T *r, *mhat;         /* (C, e), (C) residual r_c and top-k mass m̂_c */
    int64_t *sel;        /* (C, kmax) T_c sorted by position, -1 padded */
    T *aw;               /* (C, kmax) a_c[j] of the selected keys */
    T *cand_v;           /* (C, G, CL_LIST(kmax)) per key group candidate lists, best
                            first (top_offer's layout): logits */
    IT *cand_j;          /* (C, G, CL_LIST(kmax)) and key positions */
    int *cand_size;      /* (C, G) */
    FN(ClCand) *merged;  /* (C, G·kmax) the lists of a cluster merged */
    T *gsum;             /* backward: (C, e) Σ_{i∈c} dout_i */
    T *delta;            /* backward: (C) gsum_c · r_c */
    T *dcent_part;       /* backward: (G, C, d) dcent over key group g, scaled query */
    T *dcent;            /* backward: (C, d) gradient of the unscaled centroid */
    T *dkt, *dvt;        /* backward: (C, kmax, d), (C, kmax, e) gradients of T_c's keys */
} FN(ClProblem);

/* The buffers of one problem, laid out from `base` (NULL: only measure).  Returns the
 * byte size, SIZE_MAX on overflow. */
static size_t FN(cl_carve)(char *base, int n, int d, int e, int C, int kmax, int G,
                           int backward, FN(ClProblem) *p)
{
    RaArena a = {base, 0};
    p->order = RA_TAKE(&a, int64_t, (size_t)n);
    p->start = RA_TAKE(&a, int64_t, (size_t)C + 1);
    p->cursor = RA_TAKE(&a, int64_t, (size_t)C);
    p->info = RA_TAKE(&a, int64_t, 2);
    p->cent = RA_TAKE(&a, T, ra_mul(C, d));
    p->oc = RA_TAKE(&a, T, ra_mul(C, e));
    p->lsec = RA_TAKE(&a, T, (size_t)C);
    p->part_o = RA_TAKE(&a, T, ra_mul(ra_mul(C, G), e));
    p->part_lse = RA_TAKE(&a, T, ra_mul(C, G));
    p->r = RA_TAKE(&a, T, ra_mul(C, e));
    p->mhat = RA_TAKE(&a, T, (size_t)C);
    p->sel = RA_TAKE(&a, int64_t, ra_mul(C, kmax));
    p->aw = RA_TAKE(&a, T, ra_mul(C, kmax));
    p->cand_v = RA_TAKE(&a, T, ra_mul(ra_mul(C, G), CL_LIST(kmax)));
    p->cand_j = RA_TAKE(&a, IT, ra_mul(ra_mul(C, G), CL_LIST(kmax)));
    p->merged = RA_TAKE(&a, FN(ClCand), ra_mul(ra_mul(C, G), kmax));
    p->cand_size = RA_TAKE(&a, int, ra_mul(C, G));
    p->gsum = RA_TAKE(&a, T, backward ? ra_mul(C, e) : 0);
    p->delta = RA_TAKE(&a, T, backward ? (size_t)C : 0);
    p->dcent_part = RA_TAKE(&a, T, backward ? ra_mul(ra_mul(G, C), d) : 0);
    p->dcent = RA_TAKE(&a, T, backward ? ra_mul(C, d) : 0);
    p->dkt = RA_TAKE(&a, T, backward ? ra_mul(ra_mul(C, kmax), d) : 0);
    p->dvt = RA_TAKE(&a, T, backward ? ra_mul(ra_mul(C, kmax), e) : 0);
    return a.used;
}

typedef struct { ptrdiff_t b; int c, i0; } FN(ClUnit);   /* one query tile of a cluster */

/* ------------------------------------------------------------------ passes */
/* Plan of one problem: member lists by counting sort and the unmasked key count.
 * labels (n) int64 in [-1, C), key_mask (m) or NULL.  RA_ERR_INDEX for a bad label. */
static int FN(cl_plan)(int n, int m, int C, int topk, RaVec labels, RaVec key_mask,
                       FN(ClProblem) *p)
{
    memset(p->start, 0, sizeof(int64_t) * ((size_t)C + 1));
    for (int i = 0; i < n; i++) {
        const int64_t l = RA_VEC_AT(int64_t, labels, i);
        if (l < -1 || l >= C) return RA_ERR_INDEX;
        if (l >= 0) p->start[l + 1]++;
    }
    for (int c = 0; c < C; c++) {
        p->start[c + 1] += p->start[c];
        p->cursor[c] = p->start[c];
    }
    for (int i = 0; i < n; i++) {
        const int64_t l = RA_VEC_AT(int64_t, labels, i);
        if (l >= 0) p->order[p->cursor[l]++] = i;
    }
    int64_t valid = m;
    if (key_mask.data) {
        valid = 0;
        for (int j = 0; j < m; j++) valid += RA_VEC_AT(uint8_t, key_mask, j) != 0;
    }
    p->info[0] = valid;
    p->info[1] = topk < valid ? topk : valid;
    return RA_OK;
}

/* q (n, d) -> cent_c (d) = mean of the member rows of c (0 if empty), summed in order. */
/* Row i of m (n columns) += x (n); unit-stride rows in a vectorised loop. */
static inline void FN(cl_row_add)(RaMat m, int64_t i, const T *x, int n)
{
    char *row = m.data + (ptrdiff_t)i * m.s0;
    if (m.s1 == (ptrdiff_t)sizeof(T))
        for (int f = 0; f < n; f++) ((T *)row)[f] += x[f];
    else
        for (int f = 0; f < n; f++) *(T *)(row + (ptrdiff_t)f * m.s1) += x[f];
}

/* Row i of m (n columns) = x (n). */
static inline void FN(cl_row_write)(RaMat m, int64_t i, const T *x, int n)
{
    char *row = m.data + (ptrdiff_t)i * m.s0;
    if (m.s1 == (ptrdiff_t)sizeof(T))
        memcpy(row, x, sizeof(T) * (size_t)n);
    else
        for (int f = 0; f < n; f++) *(T *)(row + (ptrdiff_t)f * m.s1) = x[f];
}

/* dst (width) = the sum of cluster c's member rows of x (n, width), by increasing
 * position (scattered rows: the next ones are fetched ahead). */
static void FN(cl_member_sum)(RaMat x, int width, const FN(ClProblem) *p, int c, T *dst)
{
    const int64_t s0 = p->start[c], s1 = p->start[c + 1];
    memset(dst, 0, sizeof(T) * (size_t)width);
    for (int64_t s = s0; s < s1; s++) {
        if (s + RA_PREFETCH_ROWS < s1) {
            const char *ahead = x.data + (ptrdiff_t)p->order[s + RA_PREFETCH_ROWS] * x.s0;
            for (int f = 0; f < width; f += 64 / (int)sizeof(T))
                __builtin_prefetch(ahead + (ptrdiff_t)f * x.s1);
        }
        FN(ra_add_row)(dst, 1, x, p->order[s], width);
    }
}

static void FN(cl_centroid)(RaMat q, int d, const FN(ClProblem) *p, int c)
{
    T *dst = p->cent + (ptrdiff_t)c * d;
    const int64_t size = p->start[c + 1] - p->start[c];
    FN(cl_member_sum)(q, d, p, c, dst);
    if (size > 0) {
        const T inv = (T)1 / (T)size;
        for (int f = 0; f < d; f++) dst[f] *= inv;
    }
}

/* sums (C, d) = per cluster the sum of its rows of x (n, d), rows read in position order
 * (so each sum runs over its members by increasing position, as a loop over the
 * cluster's sorted member list does).  labels already validated. */
static void FN(cl_sums_scan)(RaMat x, RaVec labels, int n, int d, int C, T *sums)
{
    memset(sums, 0, sizeof(T) * (size_t)C * d);
    for (int i = 0; i < n; i++) {
        const int64_t l = RA_VEC_AT(int64_t, labels, i);
        if (l >= 0) FN(ra_add_row)(sums + (ptrdiff_t)l * d, 1, x, i, d);
    }
}

/* Every centroid of one problem at once: cl_sums_scan, then each sum divided by the
 * member count, as in cl_centroid. */
static void FN(cl_centroids_scan)(RaMat q, RaVec labels, int n, int d, int C,
                                  const FN(ClProblem) *p)
{
    FN(cl_sums_scan)(q, labels, n, d, C, p->cent);
    for (int c = 0; c < C; c++) {
        const int64_t size = p->start[c + 1] - p->start[c];
        if (size == 0) continue;
        const T inv = (T)1 / (T)size;
        for (int f = 0; f < d; f++) p->cent[(ptrdiff_t)c * d + f] *= inv;
    }
}

/* Cluster c, T_c and a_c[T_c] known: m̂_c = Σ_{T_c} a_c[j], r_c = o_c − Σ_{T_c} a_c[j] v_j.
 * v (m, e). */
static void FN(cl_residual)(RaMat v, int e, int kmax, const FN(ClProblem) *p, int c)
{
    const int64_t *sel = p->sel + (size_t)c * kmax;
    const T *aw = p->aw + (size_t)c * kmax;
    T *r = p->r + (ptrdiff_t)c * e, mass = 0;
    memcpy(r, p->oc + (ptrdiff_t)c * e, sizeof(T) * (size_t)e);
    for (int t = 0; t < kmax && sel[t] >= 0; t++) {
        if (t + RA_PREFETCH_ROWS < kmax && sel[t + RA_PREFETCH_ROWS] >= 0) {
            const char *ahead = v.data + (ptrdiff_t)sel[t + RA_PREFETCH_ROWS] * v.s0;
            for (int f = 0; f < e; f += 64 / (int)sizeof(T))
                __builtin_prefetch(ahead + (ptrdiff_t)f * v.s1);
        }
        mass += aw[t];
        FN(ra_add_row)(r, -aw[t], v, sel[t], e);
    }
    p->mhat[c] = mass;
}

/* Cluster c: merge its G candidate lists (of logits) into T_c (sorted by position), then
 * m̂_c = Σ_{T_c} a_c[j] and r_c = o_c − Σ_{T_c} a_c[j] v_j.  v (m, e). */
static void FN(cl_select)(RaMat v, int e, int G, int kmax, const FN(ClProblem) *p, int c)
{
    const int kc = (int)p->info[1];
    FN(ClCand) *all = p->merged + (size_t)c * G * kmax;
    /* the G best-first lists merged, best first, up to kc (G <= RA_CL_TARGET_UNITS) */
    int head[RA_CL_TARGET_UNITS] = {0}, kept = 0;
    for (; kept < kc; kept++) {
        int from = -1;
        FN(ClCand) best = {0, 0};
        for (int g = 0; g < G; g++) {
            const size_t at = ((size_t)c * G + g) * CL_LIST(kmax) + (size_t)head[g];
            if (head[g] == p->cand_size[(size_t)c * G + g]) continue;
            const FN(ClCand) x = {p->cand_v[at], p->cand_j[at]};
            if (from < 0 || FN(cl_better)(x, best)) { best = x; from = g; }
        }
        if (from < 0) break;
        all[kept] = best;
        head[from]++;
    }
    /* then by position: insertion sort of the few, qsort of many */
    if (kept > 64) {
        qsort(all, (size_t)kept, sizeof(FN(ClCand)), FN(cl_cmp_key));
    } else {
        for (int t = 1; t < kept; t++) {
            const FN(ClCand) x = all[t];
            int i = t;
            for (; i > 0 && all[i - 1].j > x.j; i--) all[i] = all[i - 1];
            all[i] = x;
        }
    }
    int64_t *sel = p->sel + (size_t)c * kmax;
    T *aw = p->aw + (size_t)c * kmax;
    const T lse = p->lsec[c];
    for (int t = 0; t < kmax; t++) {
        sel[t] = t < kept ? all[t].j : -1;
        aw[t] = t < kept ? (T)exp(all[t].v - lse) : 0;   /* a_c[j] from its logit */
    }
    FN(cl_residual)(v, e, kmax, p, c);
}

/* Per-thread tiles (R = RA_CL_ROWS rows): the engine's query tile, whose q (R, d) holds
 * member or centroid rows, and gradient tile (sharing its logits scratch); o', dout (R, e),
 * lse', delta (R), dq (R, d); T_c packed: kᵀ (d, kc), v (kc, e), k (kc, d), vᵀ (e, kc)
 * with kc = max(kmax, BK) (the centroid backward packs a key tile there); key positions
 * (BK) and the dk tile (kc, d) of the centroid backward; improved form: the logits of a
 * span of RA_CL_CHUNK keys (R, RA_CL_CHUNK) and their positions. */
typedef struct {
    FN(RaQTile) qt;
    FN(RaQGradTile) gt;
    T *qs, *o, *dout, *lse, *delta, *dq;
    T *kt, *v, *k, *vt;
    int64_t *kpos;
    T *dk;
    T *chunk;
    int64_t *chunk_pos;
} FN(ClTiles);

static void FN(cl_tiles)(RaArena *a, int d, int e, int kmax, FN(ClTiles) *w)
{
    const size_t kcols = (size_t)(kmax > RA_BK ? kmax : RA_BK), R = RA_CL_ROWS;
    w->qs = FN(ra_qtile_layout)(&w->qt, a, RA_CL_ROWS, d, e);
    FN(ra_qgrad_layout)(&w->gt, a, RA_CL_ROWS, &w->qt);
    w->dq = RA_TAKE(a, T, R * d);
    w->o = RA_TAKE(a, T, R * e);
    w->dout = RA_TAKE(a, T, R * e);
    w->lse = RA_TAKE(a, T, R);
    w->delta = RA_TAKE(a, T, R);
    w->kt = RA_TAKE(a, T, ra_mul(kcols, d));
    w->v = RA_TAKE(a, T, ra_mul(kcols, e));
    w->k = RA_TAKE(a, T, ra_mul(kcols, d));
    w->vt = RA_TAKE(a, T, ra_mul(kcols, e));
    w->kpos = RA_TAKE(a, int64_t, RA_BK);
    w->dk = RA_TAKE(a, T, ra_mul(kcols, d));
    w->chunk = kmax > 0 ? RA_TAKE(a, T, R * RA_CL_CHUNK) : NULL;
    w->chunk_pos = kmax > 0 ? RA_TAKE(a, int64_t, RA_CL_CHUNK) : NULL;
    w->gt.q = w->qs;
    w->gt.pos = NULL;
    w->gt.dout = w->dout;
    w->gt.lse = w->lse;
    w->gt.delta = w->delta;
    w->gt.dq = w->dq;
}

/* Bytes of one thread's tiles. */
static size_t FN(cl_thread_bytes)(int d, int e, int kmax)
{
    RaArena a = {NULL, 0};
    FN(ClTiles) w;
    FN(cl_tiles)(&a, d, e, kmax, &w);
    return a.used;
}

/* The packed T_c (kc keys, capacity kmax) as the engine's key list. */
static FN(RaKeys) FN(cl_topk_keys)(const FN(ClTiles) *w, int kc, int kmax, int d, int e)
{
    const FN(RaKeys) keys = {.count = kc, .kt = w->kt, .ldkt = kmax, .v = w->v, .ldv = e,
                             .k = w->k, .ldk = d, .vt = w->vt, .ldvt = kmax};
    return keys;
}

/* Exact softmax of member rows idx[0..rows) over T_c: o' (rows, e) and lse' (rows) in w.
 * q (n, d), k (m, d), v (m, e); T_c's keys already packed in w. */
static void FN(cl_topk_softmax)(const KT *K, FN(ClTiles) *w, RaMat q, const int64_t *idx,
                                int rows, int kc, int kmax, int d, int e, T sc)
{
    FN(ra_gather)(q, idx, 0, rows, d, sc, 0, w->qs, d);
    w->qt.rows = rows;
    FN(ra_fwd_init)(&w->qt, e);
    const FN(RaKeys) keys = FN(cl_topk_keys)(w, kc, kmax, d, e);
    FN(ra_attend)(K, &w->qt, &keys, d, e, 0);
    FN(ra_fwd_finish)(&w->qt, e, (char *)w->o, (ptrdiff_t)sizeof(T) * e, sizeof(T),
                      (char *)w->lse, sizeof(T));
}

/* What the centroid pass's key-list hooks need: where the keys come from (the group's
 * first key j_first of k, v, key_mask) and where the improved form's candidates go. */
typedef struct {
    FN(ClTiles) *w;
    RaMat k, v;
    RaVec key_mask;
    int j_first, d, e;
    const FN(ClProblem) *p;
    int kc, kmax, c0, g, G;
    size_t list;             /* the candidate list of centroid c0 in group g */
} FN(ClGroupKeys);

/* RaKeys.load of the centroid pass: key positions (j, or -1 where masked) into w->kpos,
 * kᵀ gathered into w->kt, and v gathered into w->v when the list does not read it in
 * place. */
static void FN(cl_group_load)(void *ctx, int j0, int rows, int need, FN(RaKTile) *t)
{
    const FN(ClGroupKeys) *c = ctx;
    FN(ClTiles) *w = c->w;
    const int jj = c->j_first + j0, cols = t->cols;
    (void)rows;
    for (int j = 0; j < cols; j++)
        w->kpos[j] = !c->key_mask.data || RA_VEC_AT(uint8_t, c->key_mask, jj + j) ? jj + j : -1;
    t->pos = w->kpos;
    if (need & RA_NEED_KT) {
        FN(ra_gather)(c->k, NULL, jj, cols, c->d, 1, 1, w->kt, RA_BK);
        t->kt = w->kt;
        t->ldkt = RA_BK;
    }
    if ((need & RA_NEED_V) && !t->v) {
        FN(ra_gather)(c->v, NULL, jj, cols, c->e, 1, 0, w->v, c->e);
        t->v = w->v;
        t->ldv = c->e;
    }
}

/* RaKeys.observe of the improved form: a span's centroid logits offered to the top-k
 * candidate lists of its centroids (group g). */
static void FN(cl_group_offer)(void *ctx, const T *s, ptrdiff_t lds, int rows, int width,
                               const int64_t *pos)
{
    const FN(ClGroupKeys) *c = ctx;
    const FN(ClProblem) *p = c->p;
    ra_kernels()->KSEL.top_offer(rows, width, s, lds, pos, c->kc, p->cand_v + c->list,
                                 p->cand_j + c->list, (ptrdiff_t)c->G * CL_LIST(c->kmax),
                                 p->cand_size + (size_t)c->c0 * c->G + c->g, c->G);
}

/* Centroid rows [c0, c0+rows) against key blocks [t0, t1) on the engine: the softmax
 * over this key group only, written to part_o (rows, e) and part_lse (rows) of group g;
 * improved form (kmax > 0): the logits are also offered to the group's top-k lists, a
 * span of RA_CL_CHUNK keys at a time (so top_offer sees whole rows of many keys before
 * the softmax turns them into weights in place).  k (m, d), v (m, e), cent (C, d). */
static void FN(cl_centroid_group)(const KT *K, FN(ClTiles) *w, RaMat k, RaMat v,
                                  RaVec key_mask, int m, int d, int e, T sc,
                                  const FN(ClProblem) *p, int c0, int rows, int t0, int t1,
                                  int g, int G, int kmax)
{
    const int kc = kmax > 0 ? (int)p->info[1] : 0;
    for (int r = 0; r < rows && kc > 0; r++) {   /* empty lists, no stale bits */
        const size_t list = ((size_t)(c0 + r) * G + g) * CL_LIST(kmax);
        p->cand_size[(size_t)(c0 + r) * G + g] = 0;
        memset(p->cand_v + list, 0, sizeof(T) * CL_LIST(kmax));
    }
    RaMat cm = {(char *)(p->cent + (ptrdiff_t)c0 * d), (ptrdiff_t)sizeof(T) * d, sizeof(T)};
    FN(ra_gather)(cm, NULL, 0, rows, d, sc, 0, w->qs, d);
    w->qt.rows = rows;
    FN(ra_fwd_init)(&w->qt, e);
    /* unit-stride rows of v: the engine reads v in place */
    const int v_rows = v.s1 == (ptrdiff_t)sizeof(T) && v.s0 > 0 && v.s0 % (ptrdiff_t)sizeof(T) == 0;
    const int j_first = t0 * RA_BK, j_end = t1 * RA_BK < m ? t1 * RA_BK : m;
    FN(ClGroupKeys) c = {w, k, v, key_mask, j_first, d, e, p, kc, kmax, c0, g, G,
                         ((size_t)c0 * G + g) * CL_LIST(kmax)};
    const FN(RaKeys) keys = {
        .count = j_end - j_first, .load = FN(cl_group_load), .ctx = &c,
        .v = v_rows ? (const T *)(v.data + (ptrdiff_t)j_first * v.s0) : NULL,
        .ldv = v_rows ? v.s0 / (ptrdiff_t)sizeof(T) : 0,
        .span = kc > 0 ? RA_CL_CHUNK : 0, .span_s = w->chunk, .span_pos = w->chunk_pos,
        .observe = kc > 0 ? FN(cl_group_offer) : NULL};
    FN(ra_attend)(K, &w->qt, &keys, d, e, 0);
    const ptrdiff_t ts = sizeof(T);
    FN(ra_fwd_finish)(&w->qt, e, (char *)(p->part_o + ((ptrdiff_t)c0 * G + g) * e),
                      ts * G * e, ts, (char *)(p->part_lse + (ptrdiff_t)c0 * G + g), ts * G);
}

/* Merge cluster c's G key-group softmaxes (the engine's log-sum-exp merge, in group
 * order): lse_c and o_c.  A row that saw no key: o_c = 0, lse_c = -inf. */
static void FN(cl_centroid_merge)(const FN(ClProblem) *p, int c, int G, int e)
{
    p->lsec[c] = FN(ra_lse_merge)(G, NULL, p->part_lse + (ptrdiff_t)c * G,
                                  p->part_o + (ptrdiff_t)c * G * e, e,
                                  (char *)(p->oc + (ptrdiff_t)c * e), sizeof(T));
}

/* Backward of the centroid softmax a_c·V over key blocks [t0, t1) (group g): writes
 * dk, dv of those keys and accumulates dcent_part[g] (w.r.t. the scaled centroid).
 * dout = gsum (C, e), delta (C), lse_c; k (m, d), v (m, e). */
static void FN(cl_centroid_group_backward)(const KT *K, FN(ClTiles) *w, RaMat k, RaMat v,
                                           RaVec key_mask, RaMat dk, RaMat dv, int m, int C,
                                           int d, int e, T sc, const FN(ClProblem) *p,
                                           int t0, int t1, int g)
{
    T *dq_g = p->dcent_part + (ptrdiff_t)g * C * d, *dv_t = w->v;
    memset(dq_g, 0, sizeof(T) * (size_t)C * d);
    for (int t = t0; t < t1; t++) {
        const int j0 = t * RA_BK, cols = m - j0 < RA_BK ? m - j0 : RA_BK;
        for (int j = 0; j < cols; j++)
            w->kpos[j] = !key_mask.data || RA_VEC_AT(uint8_t, key_mask, j0 + j) ? j0 + j : -1;
        FN(ra_gather)(k, NULL, j0, cols, d, 1, 0, w->k, d);
        FN(ra_gather)(k, NULL, j0, cols, d, 1, 1, w->kt, RA_BK);
        FN(ra_gather)(v, NULL, j0, cols, e, 1, 1, w->vt, RA_BK);
        const FN(RaKeys) tile = {.count = cols, .kt = w->kt, .ldkt = RA_BK, .k = w->k, .ldk = d,
                                 .vt = w->vt, .ldvt = RA_BK, .pos = w->kpos};
        memset(w->dk, 0, sizeof(T) * (size_t)cols * d);
        memset(dv_t, 0, sizeof(T) * (size_t)cols * e);
        for (int c0 = 0; c0 < C; c0 += RA_CL_ROWS) {
            const int rows = C - c0 < RA_CL_ROWS ? C - c0 : RA_CL_ROWS;
            RaMat cm = {(char *)(p->cent + (ptrdiff_t)c0 * d), (ptrdiff_t)sizeof(T) * d, sizeof(T)};
            FN(ra_gather)(cm, NULL, 0, rows, d, sc, 0, w->qs, d);
            w->gt.rows = rows;
            w->gt.dout = p->gsum + (ptrdiff_t)c0 * e;
            w->gt.lse = p->lsec + c0;
            w->gt.delta = p->delta + c0;
            w->gt.dq = dq_g + (ptrdiff_t)c0 * d;
            FN(ra_attend_backward)(K, &w->gt, &tile, w->dk, d, dv_t, e, d, e, 0, NULL);
        }
        for (int r = 0; r < cols; r++) {
            FN(cl_row_write)(dk, j0 + r, w->dk + (ptrdiff_t)r * d, d);
            FN(cl_row_write)(dv, j0 + r, dv_t + (ptrdiff_t)r * e, e);
        }
    }
}

/* Pack T_c's keys and values: kᵀ (d, kmax) and v (kmax, e); backward also k, vᵀ. */
static void FN(cl_pack_topk)(FN(ClTiles) *w, RaMat k, RaMat v, const int64_t *sel, int kc,
                             int kmax, int d, int e, int backward)
{
    FN(ra_pack_keys)(k, v, sel, kc, d, e, w->k, w->kt, w->v, backward ? w->vt : NULL, kmax);
}

/* ------------------------------------------------------------------ shared front end */
/* Steps 3-4 of cl_front from a forward's saved statistics: o_c, lse_c copied; T_c and
 * a_c[T_c] copied after checking that T_c's positions are increasing, in [0, m), and
 * exactly k = min(topk, unmasked keys) of them (RA_ERR_INDEX otherwise); then r_c, m̂_c. */
static int FN(cl_front_saved)(ptrdiff_t B, int m, int e, int C, int kmax, int G, RaBMat v,
                              char *packs, size_t per_problem, int backward,
                              const RaClusteredSaved *saved, int nt, int n, int d)
{
    int status = RA_OK;
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        const ptrdiff_t b = unit / C;
        const int c = (int)(unit % C);
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        RaMat so = ra_mat_at(saved->o, b);
        for (int f = 0; f < e; f++) p.oc[(ptrdiff_t)c * e + f] = RA_MAT_AT(T, so, c, f);
        p.lsec[c] = RA_VEC_AT(T, ra_vec_at(saved->lse, b), c);
        if (kmax > 0) {
            RaMat ss = ra_mat_at(saved->sel, b), sa = ra_mat_at(saved->aw, b);
            int64_t *sel = p.sel + (size_t)c * kmax, prev = -1;
            T *aw = p.aw + (size_t)c * kmax;
            const int kc = (int)p.info[1];
            int bad = 0;
            for (int t = 0; t < kmax; t++) {
                sel[t] = RA_MAT_AT(int64_t, ss, c, t);
                aw[t] = RA_MAT_AT(T, sa, c, t);
                bad |= t < kc ? (sel[t] <= prev || sel[t] >= m) : sel[t] != -1;
                if (t < kc) prev = sel[t];
            }
            if (bad) {
                #pragma omp atomic write
                status = RA_ERR_INDEX;
                sel[0] = -1;                     /* nothing is read through it */
            }
        }
        if (kmax > 0) {
            FN(cl_residual)(ra_mat_at(v, b), e, kmax, &p, c);
        } else {
            memcpy(p.r + (ptrdiff_t)c * e, p.oc + (ptrdiff_t)c * e, sizeof(T) * (size_t)e);
            p.mhat[c] = 0;
        }
    }
    return status;
}

/* Everything both directions need, for all B problems: plans, centroids, the centroid
 * attention (o_c, lse_c), and for the improved form T_c, a_c[T_c], m̂_c and r_c (plain:
 * r_c = o_c, m̂_c = 0).  Problem b's buffers start at packs + b·per_problem. */
static int FN(cl_front)(const KT *K, ptrdiff_t B, int n, int m, int d, int e, int C,
                        int topk, int kmax, int G, RaBMat q, RaBMat k, RaBMat v,
                        RaBVec labels, RaBVec key_mask, RaBVec scale, char *packs,
                        size_t per_problem, int backward, char *scratch, size_t per_thread,
                        int nt, const RaClusteredSaved *saved)
{
    const int nkb = (m + RA_BK - 1) / RA_BK, nct = (C + RA_CL_ROWS - 1) / RA_CL_ROWS;
    int status = RA_OK;

    /* 1. member lists */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        if (FN(cl_plan)(n, m, C, topk, ra_vec_at(labels, b), ra_vec_at(key_mask, b), &p)) {
            #pragma omp atomic write
            status = RA_ERR_INDEX;
        }
    }
    if (status != RA_OK) return status;

    /* 2. centroids: one problem per unit (its rows read in order) when there are
       problems for every thread, else one (problem, cluster) per unit; either way each
       centroid sums its members by increasing position, so the same bits */
    if (B >= nt) {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t b = 0; b < B; b++) {
            FN(ClProblem) p;
            FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
            FN(cl_centroids_scan)(ra_mat_at(q, b), ra_vec_at(labels, b), n, d, C, &p);
        }
    } else {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t unit = 0; unit < B * C; unit++) {
            const ptrdiff_t b = unit / C;
            FN(ClProblem) p;
            FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
            FN(cl_centroid)(ra_mat_at(q, b), d, &p, (int)(unit % C));
        }
    }

    if (saved && saved->o.data) return FN(cl_front_saved)(B, m, e, C, kmax, G, v, packs,
                                                          per_problem, backward, saved, nt, n, d);

    /* 3. centroid attention, one (problem, centroid tile, key group) per unit, so one
       problem keeps every thread busy, collecting the top-k candidates of the improved
       form on the way; then the groups merged by log-sum-exp */
    const int blocks_per_group = nkb ? (nkb + G - 1) / G : 0;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * nct * G; unit++) {
        const ptrdiff_t b = unit / ((ptrdiff_t)nct * G);
        const int ct = (int)(unit / G % nct), g = (int)(unit % G);
        const int c0 = ct * RA_CL_ROWS, rows = C - c0 < RA_CL_ROWS ? C - c0 : RA_CL_ROWS;
        const int t0 = g * blocks_per_group < nkb ? g * blocks_per_group : nkb;
        const int t1 = t0 + blocks_per_group < nkb ? t0 + blocks_per_group : nkb;
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        FN(ClTiles) w;
        FN(cl_tiles)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, d, e, kmax, &w);
        FN(cl_centroid_group)(K, &w, ra_mat_at(k, b), ra_mat_at(v, b), ra_vec_at(key_mask, b),
                              m, d, e, RA_VEC_AT(T, ra_vec_at(scale, b), 0), &p, c0, rows,
                              t0, t1, g, G, kmax);
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        FN(ClProblem) p;
        FN(cl_carve)(packs + unit / C * per_problem, n, d, e, C, kmax, G, backward, &p);
        FN(cl_centroid_merge)(&p, (int)(unit % C), G, e);
    }

    /* 4. T_c, m̂_c, r_c per (problem, cluster) */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        const ptrdiff_t b = unit / C;
        const int c = (int)(unit % C);
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        if (kmax > 0) {
            FN(cl_select)(ra_mat_at(v, b), e, G, kmax, &p, c);
        } else {
            memcpy(p.r + (ptrdiff_t)c * e, p.oc + (ptrdiff_t)c * e, sizeof(T) * (size_t)e);
            p.mhat[c] = 0;
        }
    }
    return RA_OK;
}

/* Key groups of the centroid passes: enough units for the threads, a function of the
 * shape only. */
static int FN(cl_groups)(ptrdiff_t B, int m, int C)
{
    const int nkb = (m + RA_BK - 1) / RA_BK, nct = (C + RA_CL_ROWS - 1) / RA_CL_ROWS;
    if (nkb == 0) return 1;
    ptrdiff_t G = (RA_CL_TARGET_UNITS + B * nct - 1) / (B * nct);
    return (int)(G > nkb ? nkb : G < 1 ? 1 : G);
}

/* The query tiles of every cluster of every problem: (b, c, first member) triples. */
static FN(ClUnit) *FN(cl_units)(ptrdiff_t B, int C, char *packs, size_t per_problem,
                                int n, int d, int e, int kmax, int G, int backward,
                                int whole_clusters, ptrdiff_t *count)
{
    /* at most n/BQ + C tiles per problem */
    FN(ClUnit) *units = ra_alloc(ra_mul(sizeof(FN(ClUnit)),
                                        ra_mul((size_t)B, (size_t)n / RA_BQ + C + 1)));
    if (!units) return NULL;
    ptrdiff_t u = 0;
    for (ptrdiff_t b = 0; b < B; b++) {
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, backward, &p);
        for (int c = 0; c < C; c++) {
            const int size = (int)(p.start[c + 1] - p.start[c]);
            for (int i0 = 0; i0 < size; i0 += whole_clusters ? size : RA_BQ) {
                FN(ClUnit) x = {b, c, i0};
                units[u++] = x;
            }
        }
    }
    *count = u;
    return units;
}

/* ------------------------------------------------------------------ forward */
/* q (B; n, d), k (B; m, d), v (B; m, e), labels (B; n), key_mask (B; m) or NULL,
 * scale (B) -> out (B; n, e) */
int FN(ra_clustered_forward)(ptrdiff_t B, int n, int m, int d, int e, int C, int topk,
                             RaBMat q, RaBMat k, RaBMat v, RaBVec labels, RaBVec key_mask,
                             RaBVec scale, RaBMat out, RaClusteredSaved saved)
{
    if (C < 1 || topk < 0) return RA_ERR_VALUE;
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    const int kmax = topk < m ? topk : m;
    const int G = FN(cl_groups)(B, m, C);
    FN(ClProblem) dummy;
    const size_t per_problem = FN(cl_carve)(NULL, n, d, e, C, kmax, G, 0, &dummy);
    const size_t per_thread = FN(cl_thread_bytes)(d, e, kmax);
    char *packs = ra_alloc(ra_mul(per_problem, (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    FN(ClUnit) *units = NULL;
    int status = RA_ERR_NOMEM;
    if (!packs || !scratch) goto done;

    status = FN(cl_front)(K, B, n, m, d, e, C, topk, kmax, G, q, k, v, labels, key_mask,
                          scale, packs, per_problem, 0, scratch, per_thread, nt, NULL);
    if (status != RA_OK) goto done;
    if (saved.o.data) {         /* what the backward would otherwise recompute */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t unit = 0; unit < B * C; unit++) {
            const ptrdiff_t b = unit / C;
            const int c = (int)(unit % C);
            FN(ClProblem) p;
            FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, 0, &p);
            RaMat so = ra_mat_at(saved.o, b), ss = ra_mat_at(saved.sel, b);
            RaMat sa = ra_mat_at(saved.aw, b);
            for (int f = 0; f < e; f++) RA_MAT_AT(T, so, c, f) = p.oc[(ptrdiff_t)c * e + f];
            RA_VEC_AT(T, ra_vec_at(saved.lse, b), c) = p.lsec[c];
            for (int t = 0; t < kmax; t++) {
                RA_MAT_AT(int64_t, ss, c, t) = p.sel[(size_t)c * kmax + t];
                RA_MAT_AT(T, sa, c, t) = p.aw[(size_t)c * kmax + t];
            }
        }
    }
    ptrdiff_t nunits;
    units = FN(cl_units)(B, C, packs, per_problem, n, d, e, kmax, G, 0, 0, &nunits);
    status = RA_ERR_NOMEM;
    if (!units) goto done;

    /* 6. every (problem, cluster, member tile): out_i = r_c + m̂_c · softmax_{T_c}(q_i·K_T)·V_T */
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t u = 0; u < nunits; u++) {
        const ptrdiff_t b = units[u].b;
        const int c = units[u].c;
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, 0, &p);
        const int kc = (int)p.info[1];
        const int64_t *idx = p.order + p.start[c] + units[u].i0;
        const int size = (int)(p.start[c + 1] - p.start[c]) - units[u].i0;
        const int rows = size < RA_BQ ? size : RA_BQ;
        const T *r = p.r + (ptrdiff_t)c * e, mh = p.mhat[c];
        FN(ClTiles) w;
        FN(cl_tiles)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, d, e, kmax, &w);
        if (kc > 0) {
            FN(cl_pack_topk)(&w, ra_mat_at(k, b), ra_mat_at(v, b), p.sel + (size_t)c * kmax,
                             kc, kmax, d, e, 0);
            FN(cl_topk_softmax)(K, &w, ra_mat_at(q, b), idx, rows, kc, kmax, d, e,
                                RA_VEC_AT(T, ra_vec_at(scale, b), 0));
        }
        RaMat o = ra_mat_at(out, b);
        for (int i = 0; i < rows; i++) {
            char *row = o.data + (ptrdiff_t)idx[i] * o.s0;
            const T *oi = w.o + (ptrdiff_t)i * e;
            if (kc == 0)
                for (int f = 0; f < e; f++) *(T *)(row + (ptrdiff_t)f * o.s1) = r[f];
            else if (o.s1 == (ptrdiff_t)sizeof(T))       /* unit stride: vectorised */
                for (int f = 0; f < e; f++) ((T *)row)[f] = r[f] + mh * oi[f];
            else
                for (int f = 0; f < e; f++) *(T *)(row + (ptrdiff_t)f * o.s1) = r[f] + mh * oi[f];
        }
    }

    /* 7. queries labelled -1 output 0 */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        RaVec l = ra_vec_at(labels, b);
        RaMat o = ra_mat_at(out, b);
        for (int i = 0; i < n; i++)
            if (RA_VEC_AT(int64_t, l, i) < 0)
                for (int f = 0; f < e; f++) RA_MAT_AT(T, o, i, f) = 0;
    }
    status = RA_OK;
done:
    ra_free(units);
    ra_free(packs);
    ra_free(scratch);
    return status;
}

/* ------------------------------------------------------------------ backward */
/* dout (B; n, e), q, k, v, labels, key_mask, scale as in the forward
 * -> dq (B; n, d), dk (B; m, d), dv (B; m, e)   (written, not accumulated) */
int FN(ra_clustered_backward)(ptrdiff_t B, int n, int m, int d, int e, int C, int topk,
                              RaBMat dout, RaBMat q, RaBMat k, RaBMat v, RaBVec labels,
                              RaBVec key_mask, RaBVec scale, RaClusteredSaved saved,
                              RaBMat dq, RaBMat dk, RaBMat dv)
{
    if (C < 1 || topk < 0) return RA_ERR_VALUE;
    const KT *K = &ra_kernels()->KSEL;
    const int nt = ra_num_threads();
    const int kmax = topk < m ? topk : m;
    const int nkb = (m + RA_BK - 1) / RA_BK;
    const int G = FN(cl_groups)(B, m, C);
    FN(ClProblem) p0;
    const size_t per_problem = FN(cl_carve)(NULL, n, d, e, C, kmax, G, 1, &p0);
    const size_t per_thread = FN(cl_thread_bytes)(d, e, kmax);
    const size_t ts = sizeof(T);
    char *packs = ra_alloc(ra_mul(per_problem, (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    FN(ClUnit) *units = NULL;
    int status = RA_ERR_NOMEM;
    if (!packs || !scratch) goto done;

    /* forward passes 1-4: recomputed, or from the forward's saved statistics */
    status = FN(cl_front)(K, B, n, m, d, e, C, topk, kmax, G, q, k, v, labels, key_mask,
                          scale, packs, per_problem, 1, scratch, per_thread, nt, &saved);
    if (status != RA_OK) goto done;

    /* forward 6 broadcast r_c to every member, so the cluster's gradient is their sum:
       gsum_c = Σ_{i∈c} dout_i */
    if (B >= nt) {            /* a problem per thread: its dout rows read in order */
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t b = 0; b < B; b++) {
            FN(ClProblem) p;
            FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, 1, &p);
            FN(cl_sums_scan)(ra_mat_at(dout, b), ra_vec_at(labels, b), n, e, C, p.gsum);
        }
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        const ptrdiff_t b = unit / C;
        const int c = (int)(unit % C);
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, 1, &p);
        T *gs = p.gsum + (ptrdiff_t)c * e;
        if (B < nt)           /* else summed above: the same sums, in the same order */
            FN(cl_member_sum)(ra_mat_at(dout, b), e, &p, c, gs);
        p.delta[c] = FN(ra_dot)((const char *)gs, sizeof(T),
                                (const char *)(p.r + (ptrdiff_t)c * e), sizeof(T), e);
    }

    /* forward 5 was r_c = a_c·V − Σ_{T_c} a_c[j] v_j: first the full a_c·V term, the
       softmax backward with dout = gsum_c and delta_c = gsum_c · r_c (its rowsum(dout ∘
       out)), one (problem, key group) per unit: dk, dv of the group's keys and a dcent
       partial, summed in group order */
    const int blocks_per_group = nkb ? (nkb + G - 1) / G : 0;
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t unit = 0; unit < B * G; unit++) {
        const ptrdiff_t b = unit / G;
        const int g = (int)(unit % G);
        const int t0 = g * blocks_per_group < nkb ? g * blocks_per_group : nkb;
        const int t1 = t0 + blocks_per_group < nkb ? t0 + blocks_per_group : nkb;
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, 1, &p);
        FN(ClTiles) w;
        FN(cl_tiles)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, d, e, kmax, &w);
        FN(cl_centroid_group_backward)(K, &w, ra_mat_at(k, b), ra_mat_at(v, b),
                                       ra_vec_at(key_mask, b), ra_mat_at(dk, b),
                                       ra_mat_at(dv, b), m, C, d, e,
                                       RA_VEC_AT(T, ra_vec_at(scale, b), 0), &p, t0, t1, g);
    }
    /* logits were (scale·q̄)·kᵀ: dcent = scale · Σ_g dcent_part[g] */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t unit = 0; unit < B * C; unit++) {
        const int c = (int)(unit % C);
        FN(ClProblem) p;
        FN(cl_carve)(packs + unit / C * per_problem, n, d, e, C, kmax, G, 1, &p);
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, unit / C), 0);
        for (int f = 0; f < d; f++) {
            T acc = 0;
            for (int g = 0; g < G; g++) acc += p.dcent_part[((ptrdiff_t)g * C + c) * d + f];
            p.dcent[(ptrdiff_t)c * d + f] = sc * acc;
        }
    }

    ptrdiff_t nunits;
    units = FN(cl_units)(B, C, packs, per_problem, n, d, e, kmax, G, 1, 1, &nunits);
    status = RA_ERR_NOMEM;
    if (!units) goto done;

    /* every (problem, cluster): the T_c terms, then dq of its members */
    #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (ptrdiff_t u = 0; u < nunits; u++) {
        const ptrdiff_t b = units[u].b;
        const int c = units[u].c;
        FN(ClProblem) p;
        FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, 1, &p);
        const int kc = (int)p.info[1];
        const T sc = RA_VEC_AT(T, ra_vec_at(scale, b), 0), mh = p.mhat[c];
        const int64_t *members = p.order + p.start[c];
        const int size = (int)(p.start[c + 1] - p.start[c]);
        const int64_t *sel = p.sel + (size_t)c * kmax;
        const T *aw = p.aw + (size_t)c * kmax, *gs = p.gsum + (ptrdiff_t)c * e;
        const T *cen = p.cent + (ptrdiff_t)c * d;
        T *dcen = p.dcent + (ptrdiff_t)c * d;
        T *dkt = p.dkt + (size_t)c * kmax * d, *dvt = p.dvt + (size_t)c * kmax * e;
        RaMat km = ra_mat_at(k, b), vm = ra_mat_at(v, b), dqm = ra_mat_at(dq, b);
        FN(ClTiles) w;
        FN(cl_tiles)(&(RaArena){scratch + (size_t)ra_thread_id() * per_thread, 0}, d, e, kmax, &w);

        /* in the forward: r_c −= a_c[j] v_j for j ∈ T_c, so the dense step above
           over-counted dv_j by a_c[j]·gsum_c and ds_j by a_c[j]·(gsum_c·v_j): undo both */
        if (kc > 0) {
            memset(dkt, 0, ts * (size_t)kc * d);
            memset(dvt, 0, ts * (size_t)kc * e);
        }
        /* T_c's keys and values packed: k (kc, d), v (kc, e) rows, and the transposes */
        if (kc > 0) FN(cl_pack_topk)(&w, km, vm, sel, kc, kmax, d, e, 1);
        for (int t = 0; t < kc; t++) {
            const T ds = -aw[t] * FN(ra_dot)((const char *)gs, sizeof(T),
                                             (const char *)(w.v + (ptrdiff_t)t * e), sizeof(T), e);
            const T *kr = w.k + (ptrdiff_t)t * d;
            for (int f = 0; f < e; f++) dvt[(ptrdiff_t)t * e + f] = -aw[t] * gs[f];
            for (int f = 0; f < d; f++) {
                dkt[(ptrdiff_t)t * d + f] = ds * sc * cen[f];
                dcen[f] += sc * ds * kr[f];
            }
        }
        /* forward 6 was out_i = r_c + m̂_c·o'_i with o'_i = softmax_{T_c}(s·q_i·K_T)·V_T
           and m̂_c constant: the engine backward with dout' = m̂_c·dout_i */
        const T inv = size ? (T)1 / (T)size : 0;
        for (int i0 = 0; i0 < size; i0 += RA_BQ) {
            const int rows = size - i0 < RA_BQ ? size - i0 : RA_BQ;
            const int64_t *idx = members + i0;
            if (kc > 0) {
                FN(cl_topk_softmax)(K, &w, ra_mat_at(q, b), idx, rows, kc, kmax, d, e, sc);
                FN(ra_gather)(ra_mat_at(dout, b), idx, 0, rows, e, mh, 0, w.dout, e);
                for (int i = 0; i < rows; i++)
                    w.delta[i] = FN(ra_dot)((const char *)(w.dout + (ptrdiff_t)i * e), sizeof(T),
                                            (const char *)(w.o + (ptrdiff_t)i * e), sizeof(T), e);
                memset(w.dq, 0, ts * (size_t)rows * d);
                w.gt.rows = rows;
                const FN(RaKeys) keys = FN(cl_topk_keys)(&w, kc, kmax, d, e);
                FN(ra_attend_backward)(K, &w.gt, &keys, dkt, d, dvt, e, d, e, 0, NULL);
            }
            /* forward 2 was q̄_c = mean of members: each gets dcent_c / |c| */
            for (int i = 0; i < rows; i++) {
                char *row = dqm.data + (ptrdiff_t)idx[i] * dqm.s0;
                const T *dqi = w.dq + (ptrdiff_t)i * d;
                if (dqm.s1 == (ptrdiff_t)sizeof(T) && kc > 0)   /* unit stride: vectorised */
                    for (int f = 0; f < d; f++) ((T *)row)[f] = dcen[f] * inv + sc * dqi[f];
                else
                    for (int f = 0; f < d; f++)
                        *(T *)(row + (ptrdiff_t)f * dqm.s1) = dcen[f] * inv + (kc > 0 ? sc * dqi[f] : 0);
            }
        }
    }

    /* queries labelled -1 get no gradient */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (ptrdiff_t b = 0; b < B; b++) {
        RaVec l = ra_vec_at(labels, b);
        RaMat g = ra_mat_at(dq, b);
        for (int i = 0; i < n; i++)
            if (RA_VEC_AT(int64_t, l, i) < 0)
                for (int f = 0; f < d; f++) RA_MAT_AT(T, g, i, f) = 0;
    }

    /* add the T_c key gradients into dk, dv: one (problem, key block) per unit, clusters
       in order, so the sums do not depend on the thread count */
    if (kmax > 0) {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (ptrdiff_t unit = 0; unit < B * nkb; unit++) {
            const ptrdiff_t b = unit / nkb;
            const int64_t j0 = (int64_t)(unit % nkb) * RA_BK, j1 = j0 + RA_BK;
            FN(ClProblem) p;
            FN(cl_carve)(packs + b * per_problem, n, d, e, C, kmax, G, 1, &p);
            const int kc = (int)p.info[1];
            RaMat dkm = ra_mat_at(dk, b), dvm = ra_mat_at(dv, b);
            for (int c = 0; c < C; c++) {
                if (p.start[c + 1] == p.start[c]) continue;   /* no members: no gradient */
                const int64_t *sel = p.sel + (size_t)c * kmax;
                int lo = 0, hi = kc;                 /* first t with sel[t] >= j0 */
                while (lo < hi) {
                    const int mid = (lo + hi) / 2;
                    if (sel[mid] < j0) lo = mid + 1; else hi = mid;
                }
                for (int t = lo; t < kc && sel[t] < j1; t++) {
                    const T *gk = p.dkt + ((size_t)c * kmax + t) * d;
                    const T *gv = p.dvt + ((size_t)c * kmax + t) * e;
                    FN(cl_row_add)(dkm, sel[t], gk, d);
                    FN(cl_row_add)(dvm, sel[t], gv, e);
                }
            }
        }
    }
    status = RA_OK;
done:
    ra_free(units);
    ra_free(packs);
    ra_free(scratch);
    return status;
}
