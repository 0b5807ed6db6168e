/* clustered_passes_body.h — clustered attention's buffers and passes: per-problem
 * layout, plan, centroids, the centroid passes on the engine, top-k selection; what the
 * forward's query tiles and the backward's clusters share, and the rows each hints
 * before it runs.  Included by clustered_body.h (once per type, with its macros). */

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
        if (s + RA_PREFETCH_ROWS < s1)
            RA_PREFETCH_ROW(x, p->order[s + RA_PREFETCH_ROWS], width, sizeof(T), 3);
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

/* Cluster c, T_c and a_c[T_c] known: r (e) = o_c − Σ_{T_c} a_c[j] v_j; returns m̂_c =
 * Σ_{T_c} a_c[j].  v_j is row j of v (m, e), or with `packed` row t of T_c's values
 * packed in order (cl_pack_topk): the same sums either way. */
static T FN(cl_residual_into)(RaMat v, int packed, int e, int kmax, const FN(ClProblem) *p,
                              int c, const FN(RaPairs) *cpairs, T *r)
{
    const int64_t *sel = p->sel + (size_t)c * kmax;
    const T *aw = p->aw + (size_t)c * kmax;
    T mass = 0;
    memcpy(r, p->oc + (ptrdiff_t)c * e, sizeof(T) * (size_t)e);
    for (int t = 0; t < kmax && sel[t] >= 0; t++) {
        if (!packed && t + RA_PREFETCH_ROWS < kmax && sel[t + RA_PREFETCH_ROWS] >= 0)
            RA_PREFETCH_ROW(v, sel[t + RA_PREFETCH_ROWS], e, sizeof(T), 3);
        mass += aw[t];
        FN(ra_add_row)(r, -aw[t] * FN(ra_drop_factor)(cpairs, CL_CENTROID_ROW(c), sel[t]), v,
                       packed ? t : sel[t], e);
    }
    return mass;
}

/* The same into the problem's r_c and m̂_c.  v (m, e). */
static void FN(cl_residual)(RaMat v, int e, int kmax, const FN(ClProblem) *p, int c,
                            const FN(RaPairs) *cpairs)
{
    p->mhat[c] = FN(cl_residual_into)(v, 0, e, kmax, p, c, cpairs, p->r + (ptrdiff_t)c * e);
}

/* Cluster c: merge its G candidate lists (of logits) into T_c (sorted by position), then
 * with `residual` m̂_c = Σ_{T_c} a_c[j] and r_c = o_c − Σ_{T_c} a_c[j] v_j (the forward
 * computes them from T_c's packed values instead).  v (m, e). */
static void FN(cl_select)(RaMat v, int e, int G, int kmax, const FN(ClProblem) *p, int c,
                          int residual, const FN(RaPairs) *cpairs)
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
    if (residual) FN(cl_residual)(v, e, kmax, p, c, cpairs);
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
    FN(RaKeys) topk;         /* T_c as cl_pack_topk packed it into kt, v (and k, vt) */
    int64_t *kpos;
    T *dk;
    T *chunk;
    int64_t *chunk_pos;
    int64_t *rowpos;         /* (R) the dropout row ids of a centroid tile */
    T *res;                  /* (e) the residual r_c of the forward's query tile */
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
    w->kt = RA_TAKE(a, T, ra_spread_size(d, (int)kcols, sizeof(T)));
    w->v = RA_TAKE(a, T, ra_spread_size((int)kcols, e, sizeof(T)));
    w->k = RA_TAKE(a, T, ra_spread_size((int)kcols, d, sizeof(T)));
    w->vt = RA_TAKE(a, T, ra_spread_size(e, (int)kcols, sizeof(T)));
    w->kpos = RA_TAKE(a, int64_t, RA_BK);
    w->dk = RA_TAKE(a, T, ra_mul(kcols, d));
    w->chunk = kmax > 0 ? RA_TAKE(a, T, R * RA_CL_CHUNK) : NULL;
    w->chunk_pos = kmax > 0 ? RA_TAKE(a, int64_t, RA_CL_CHUNK) : NULL;
    w->rowpos = RA_TAKE(a, int64_t, R);
    w->res = RA_TAKE(a, T, (size_t)e);
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

/* The packed T_c as the engine's key list; pos: T_c's key positions when the pair terms
 * need them, else NULL. */
static FN(RaKeys) FN(cl_topk_keys)(const FN(ClTiles) *w, const int64_t *pos)
{
    FN(RaKeys) keys = w->topk;
    keys.pos = pos;
    return keys;
}

/* Exact softmax of member rows idx[0..rows) over T_c (positions sel) with the pair terms
 * `pairs` (or NULL), left in w's query tile unnormalised (acc, sum, mx).  q (n, d);
 * T_c's keys already packed in w. */
static void FN(cl_topk_attend)(const KT *K, FN(ClTiles) *w, RaMat q, const int64_t *idx,
                               int rows, int d, int e, T sc,
                               const int64_t *sel, const FN(RaPairs) *pairs)
{
    FN(ra_gather)(q, idx, 0, rows, d, sc, 0, w->qs, d);
    w->qt.rows = rows;
    w->qt.pos = pairs ? idx : NULL;
    w->qt.pairs = pairs;
    FN(ra_fwd_init)(&w->qt, e);
    const FN(RaKeys) keys = FN(cl_topk_keys)(w, pairs ? sel : NULL);
    FN(ra_attend)(K, &w->qt, &keys, d, e, 0);
}

/* The same, finished: o' (rows, e) and lse' (rows) in w. */
static void FN(cl_topk_softmax)(const KT *K, FN(ClTiles) *w, RaMat q, const int64_t *idx,
                                int rows, int d, int e, T sc,
                                const int64_t *sel, const FN(RaPairs) *pairs)
{
    FN(cl_topk_attend)(K, w, q, idx, rows, d, e, sc, sel, pairs);
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
        t->ldkt = ra_spread_ld(RA_BK, sizeof(T));
        FN(ra_gather)(c->k, NULL, jj, cols, c->d, 1, 1, w->kt, t->ldkt);
        t->kt = w->kt;
    }
    if ((need & RA_NEED_V) && !t->v) t->v = FN(ra_rows)(c->v, jj, cols, c->e, w->v, &t->ldv);
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
                                  int g, int G, int kmax, const FN(RaPairs) *cpairs)
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
    for (int r = 0; r < rows; r++) w->rowpos[r] = CL_CENTROID_ROW(c0 + r);
    w->qt.pos = cpairs ? w->rowpos : NULL;
    w->qt.pairs = cpairs;
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
                                           int t0, int t1, int g, const FN(RaPairs) *cpairs)
{
    T *dq_g = p->dcent_part + (ptrdiff_t)g * C * d, *dv_t = w->v;
    memset(dq_g, 0, sizeof(T) * (size_t)C * d);
    for (int t = t0; t < t1; t++) {
        const int j0 = t * RA_BK, cols = m - j0 < RA_BK ? m - j0 : RA_BK;
        for (int j = 0; j < cols; j++)
            w->kpos[j] = !key_mask.data || RA_VEC_AT(uint8_t, key_mask, j0 + j) ? j0 + j : -1;
        ptrdiff_t ldk;
        const T *krows = FN(ra_rows)(k, j0, cols, d, w->k, &ldk);   /* in place if it can */
        const int ldt = ra_spread_ld(RA_BK, sizeof(T));
        FN(ra_gather)(k, NULL, j0, cols, d, 1, 1, w->kt, ldt);
        FN(ra_gather)(v, NULL, j0, cols, e, 1, 1, w->vt, ldt);
        const FN(RaKeys) tile = {.count = cols, .kt = w->kt, .ldkt = ldt, .k = krows, .ldk = ldk,
                                 .vt = w->vt, .ldvt = ldt, .pos = w->kpos};
        memset(w->dk, 0, sizeof(T) * (size_t)cols * d);
        memset(dv_t, 0, sizeof(T) * (size_t)cols * e);
        for (int c0 = 0; c0 < C; c0 += RA_CL_ROWS) {
            const int rows = C - c0 < RA_CL_ROWS ? C - c0 : RA_CL_ROWS;
            RaMat cm = {(char *)(p->cent + (ptrdiff_t)c0 * d), (ptrdiff_t)sizeof(T) * d, sizeof(T)};
            FN(ra_gather)(cm, NULL, 0, rows, d, sc, 0, w->qs, d);
            w->gt.rows = rows;
            for (int r = 0; r < rows; r++) w->rowpos[r] = CL_CENTROID_ROW(c0 + r);
            w->gt.pos = cpairs ? w->rowpos : NULL;
            w->gt.pairs = cpairs;
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

/* Pack T_c's kc keys and values into w->topk: kᵀ and v; backward also k, vᵀ. */
static void FN(cl_pack_topk)(FN(ClTiles) *w, RaMat k, RaMat v, const int64_t *sel, int kc,
                             int d, int e, int backward)
{
    w->topk = FN(ra_pack_keys)(k, sel, v, sel, kc, d, e, 1, backward ? w->k : NULL, w->kt,
                               w->v, backward ? w->vt : NULL);
}

/* What the forward's query tiles share. */
typedef struct {
    int n, d, e, C, kmax, G;
    char *packs, *scratch;
    size_t per_problem, per_thread;
    RaBMat q, k, v, out;
    RaBVec scale;
    const RaBPairs *pairs;
    const KT *K;
    const FN(ClUnit) *units;
} FN(ClForward);

/* Query tile u: its problem's buffers, its members idx[0..rows) (cluster u->c). */
static int FN(cl_tile)(const FN(ClForward) *F, const FN(ClUnit) *u, FN(ClProblem) *p,
                       const int64_t **idx)
{
    FN(cl_carve)(F->packs + u->b * F->per_problem, F->n, F->d, F->e, F->C, F->kmax, F->G, 0, p);
    *idx = p->order + p->start[u->c] + u->i0;
    const int size = (int)(p->start[u->c + 1] - p->start[u->c]) - u->i0;
    return size < RA_BQ ? size : RA_BQ;
}

/* Hint (locality 2) T_c's rows of k and v: its kc keys at positions sel, up to an unfilled
 * entry (-1). */
static void FN(cl_hint_topk)(RaMat k, RaMat v, const int64_t *sel, int kc, int d, int e)
{
    for (int t = 0; t < kc && sel[t] >= 0; t++) {
        RA_PREFETCH_ROW(k, sel[t], d, sizeof(T), 2);
        RA_PREFETCH_ROW(v, sel[t], e, sizeof(T), 2);
    }
}

/* Hint (prefetch, locality 2) the rows query tile u will read and write — T_c's rows of
 * k and v, the members' rows of q and out; without T_c only out — so the scattered rows
 * arrive while another tile computes.  Only hints: no row is read or written. */
static void FN(cl_fetch_tile)(const void *ctx, ptrdiff_t unit)
{
    const FN(ClForward) *F = ctx;
    const FN(ClUnit) *u = &F->units[unit];
    FN(ClProblem) p;
    const int64_t *idx;
    const int rows = FN(cl_tile)(F, u, &p, &idx);
    const int kc = (int)p.info[1];
    const RaMat q = ra_mat_at(F->q, u->b), out = ra_mat_at(F->out, u->b);
    FN(cl_hint_topk)(ra_mat_at(F->k, u->b), ra_mat_at(F->v, u->b),
                     p.sel + (size_t)u->c * F->kmax, kc, F->d, F->e);
    for (int i = 0; i < rows; i++) {
        if (kc > 0) RA_PREFETCH_ROW(q, idx[i], F->d, sizeof(T), 2);
        RA_PREFETCH_ROW(out, idx[i], F->e, sizeof(T), 2);
    }
}

/* What the backward's parallel units share. */
typedef struct {
    int n, m, d, e, C, kmax, G;
    char *packs, *scratch;
    size_t per_problem, per_thread;
    RaBMat dout, q, k, v, dq, dk, dv;
    RaBVec labels, key_mask, scale;
    const RaBPairs *pairs;
    T *dbias_part;           /* (B, groups, r) the relative bias gradient of each group of
                                consecutive clusters (cl_bias_group), or NULL */
    int r;
    const KT *K;
    const FN(ClUnit) *units; /* whole clusters, set once listed */
    int direct;              /* one thread runs every cluster, in order: each cluster's T_c
                                key gradients go straight into dk, dv (see cl_backward_batch) */
} FN(ClBackward);

static FN(ClProblem) FN(cl_problem)(const FN(ClBackward) *A, ptrdiff_t b)
{
    FN(ClProblem) p;
    FN(cl_carve)(A->packs + b * A->per_problem, A->n, A->d, A->e, A->C, A->kmax, A->G, 1, &p);
    return p;
}

static FN(ClTiles) FN(cl_thread_tiles)(const FN(ClBackward) *A)
{
    FN(ClTiles) w;
    FN(cl_tiles)(&(RaArena){A->scratch + (size_t)ra_thread_id() * A->per_thread, 0}, A->d, A->e,
                 A->kmax, &w);
    return w;
}

/* Hint the rows cluster u's backward reads first: T_c's rows of k and v, its first
 * tile's members' rows of q and dout, their dq rows and (written directly) T_c's dk, dv. */
static void FN(cl_fetch_cluster)(const void *ctx, ptrdiff_t unit)
{
    const FN(ClBackward) *A = ctx;
    const FN(ClUnit) *u = &A->units[unit];
    const FN(ClProblem) p = FN(cl_problem)(A, u->b);
    const int kc = (int)p.info[1];
    const int64_t *idx = p.order + p.start[u->c];
    const int size = (int)(p.start[u->c + 1] - p.start[u->c]);
    const int rows = size < RA_BQ ? size : RA_BQ;
    const RaMat q = ra_mat_at(A->q, u->b), dout = ra_mat_at(A->dout, u->b);
    const RaMat dq = ra_mat_at(A->dq, u->b);
    FN(cl_hint_topk)(ra_mat_at(A->k, u->b), ra_mat_at(A->v, u->b),
                     p.sel + (size_t)u->c * A->kmax, kc, A->d, A->e);
    for (int i = 0; i < rows; i++) {
        if (kc > 0) {
            RA_PREFETCH_ROW(q, idx[i], A->d, sizeof(T), 2);
            RA_PREFETCH_ROW(dout, idx[i], A->e, sizeof(T), 2);
        }
        RA_PREFETCH_ROW(dq, idx[i], A->d, sizeof(T), 2);
    }
    if (A->direct) FN(cl_hint_topk)(ra_mat_at(A->dk, u->b), ra_mat_at(A->dv, u->b),
                                    p.sel + (size_t)u->c * A->kmax, kc, A->d, A->e);
}
