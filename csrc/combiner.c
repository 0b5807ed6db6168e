/* combiner.c — Combiner attention (Ren et al. 2021; docs/design.md, Combiner) on the tile engine.
 *
 * Every plan is described by one "region list" planner, shared by the typed drivers in
 * combiner_body.h:
 *
 *   regions   value regions vid ∈ [0, R): a member set (an arithmetic progression of
 *             positions), a region query (max-pooled over the members, or one given
 *             query row), and the summary key kid it belongs to.  Summary key k̂_kid is
 *             the max-pool of the members' keys; summary value v̂_vid is the region's own
 *             softmax expectation of the members' values under the region query.
 *   waves     the regions grouped into units whose member sets are disjoint inside a
 *             wave, so the backward can scatter member gradients without races; waves
 *             run one after the other.
 *   passes    the queries grouped into units that share their key lists: a direct key
 *             range (masked by position) and a list of summary entries (kid, vid, spos),
 *             masked by spos against the query's row or column.  Plans whose direct
 *             keys and summaries cannot share a unit (axial, mixture: own row vs own
 *             column) use two passes; the second continues the first pass's online
 *             softmax state, so every query still has exactly one softmax.
 *
 * Grid (fixed, axial, mixture): M = block columns, row-major i = r·M + c, nr rows, the
 * last one possibly shorter.  Logsparse: span (l, a) covers [a·2^{l+1}, a·2^{l+1}+2^l);
 * mirror spans (bidirectional) are the same spans of the reversed sequence.
 */
#include "combiner.h"

/* ------------------------------------------------------------------ plan geometry */
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* cells in grid row t; rows holding column c */
static int64_t row_len(const RaCPlan *p, int64_t t) { return min64(p->M, p->n - t * p->M); }
static int64_t col_rows(const RaCPlan *p, int64_t c) { return (p->n - c + p->M - 1) / p->M; }

int ra_cplan_init(RaCPlan *p, int kind, int64_t n, int64_t block, int causal)
{
    if (kind < RA_PLAN_FIXED || kind > RA_PLAN_MIXTURE || n < 1) return RA_ERR_VALUE;
    if (kind != RA_PLAN_LOGSPARSE && (block < 1 || block > n)) return RA_ERR_VALUE;
    memset(p, 0, sizeof(*p));
    p->kind = kind;
    p->causal = causal != 0;
    p->n = n;
    p->M = kind == RA_PLAN_LOGSPARSE ? 1 : block;
    p->nr = (n + p->M - 1) / p->M;
    if (kind == RA_PLAN_LOGSPARSE) {
        while (((int64_t)1 << p->L) < n) p->L++;
        int64_t off = 0;
        for (int dir = 0; dir < 2; dir++)
            for (int l = 0; l < p->L; l++) {
                p->off[dir][l] = off;
                off += (n + ((int64_t)2 << l) - 1) >> (l + 1);
            }
        p->R = p->NK = off;
    } else if (kind == RA_PLAN_FIXED) {
        p->R = p->NK = p->nr;
    } else if (kind == RA_PLAN_AXIAL) {
        p->R = p->nr * p->M;
        p->NK = p->nr;
    } else {
        p->R = p->NK = 4 * p->nr * p->M;
    }
    return RA_OK;
}

/* logsparse span vid -> direction, level, index a within the level */
static void ls_decode(const RaCPlan *p, int64_t vid, int *dir, int *l, int64_t *a)
{
    *dir = p->L > 0 && vid >= p->off[1][0] ? 1 : 0;
    *l = p->L - 1;
    while (*l > 0 && vid < p->off[*dir][*l]) (*l)--;
    *a = vid - p->off[*dir][*l];
}

/* logsparse: spans at level l, and how many of them one region unit takes (short spans
   are batched into one engine tile of up to 32 regions) */
static int64_t ls_spans(const RaCPlan *p, int l) { return (p->n + ((int64_t)2 << l) - 1) >> (l + 1); }
static int64_t ls_group(int l) { return l >= 5 ? 1 : 32 >> l; }

RaCRegion ra_cplan_region(const RaCPlan *p, int64_t vid)
{
    RaCRegion g = {{0, 0, 1}, -1, vid, 1};
    const int64_t M = p->M;
    switch (p->kind) {
    case RA_PLAN_FIXED:
        g.members = (RaRange){vid * M, row_len(p, vid), 1};
        break;
    case RA_PLAN_AXIAL: {   /* U[t, c]: all of row t under the query of cell (t, c) */
        const int64_t t = vid / M, c = vid % M;
        if (c < row_len(p, t)) {
            g.members = (RaRange){t * M, row_len(p, t), 1};
            g.qsrc = vid;
        }
        g.kid = t;
        g.owns_kid = c == 0;
        break;
    }
    case RA_PLAN_MIXTURE: {
        const int64_t kind = vid / (p->nr * M), rem = vid % (p->nr * M);
        const int64_t r = rem / M, c = rem % M;
        if (kind == RA_MIX_COL_ABOVE)        /* column c, rows < r */
            g.members = (RaRange){c, min64(r, col_rows(p, c)), M};
        else if (kind == RA_MIX_COL_BELOW)   /* column c, rows > r */
            g.members = (RaRange){(r + 1) * M + c, max64(0, col_rows(p, c) - r - 1), M};
        else if (kind == RA_MIX_ROW_LEFT)    /* row r, columns < c */
            g.members = (RaRange){r * M, min64(c, row_len(p, r)), 1};
        else                                 /* row r, columns > c */
            g.members = (RaRange){r * M + c + 1, max64(0, row_len(p, r) - c - 1), 1};
        break;
    }
    default: {  /* logsparse */
        int dir, l;
        int64_t a;
        ls_decode(p, vid, &dir, &l, &a);
        const int64_t len = (int64_t)1 << l, s = a * 2 * len;   /* reversed coords if dir */
        int64_t lo = dir ? p->n - s - len : s, hi = lo + len;
        lo = max64(lo, 0);
        hi = min64(hi, p->n);
        g.members = (RaRange){lo, max64(0, hi - lo), 1};
        break;
    }
    }
    return g;
}

/* ------------------------------------------------------------------ region waves */
int ra_cplan_nwaves(const RaCPlan *p)
{
    if (p->kind == RA_PLAN_MIXTURE) return 2;
    if (p->kind == RA_PLAN_LOGSPARSE) return p->L * (p->causal ? 1 : 2);
    return 1;
}

int64_t ra_cplan_wave_units(const RaCPlan *p, int w)
{
    if (p->kind == RA_PLAN_MIXTURE) return w == 0 ? p->M : p->nr;
    if (p->kind == RA_PLAN_LOGSPARSE) {
        const int l = w % p->L;
        return (ls_spans(p, l) + ls_group(l) - 1) / ls_group(l);
    }
    return p->nr;
}

int64_t ra_cplan_wave_unit(const RaCPlan *p, int w, int64_t u, int64_t *vids)
{
    int64_t cnt = 0;
#define PUSH(x) do { if (vids) vids[cnt] = (x); cnt++; } while (0)
    const int64_t M = p->M, G = p->nr * M;
    switch (p->kind) {
    case RA_PLAN_FIXED: PUSH(u); break;
    case RA_PLAN_AXIAL:
        for (int64_t c = 0; c < row_len(p, u); c++) PUSH(u * M + c);
        break;
    case RA_PLAN_MIXTURE:
        if (w == 0) {   /* column u: the regions above (and below) every row */
            /* every row r >= 1 has cells above it in column u, even rows the column
               lacks (a short last row sees the whole column as one region) */
            for (int64_t r = 1; r < p->nr; r++) PUSH(RA_MIX_COL_ABOVE * G + r * M + u);
            if (!p->causal)
                for (int64_t r = 0; r + 1 < col_rows(p, u); r++) PUSH(RA_MIX_COL_BELOW * G + r * M + u);
        } else {        /* row u: the regions left and right of every column */
            for (int64_t c = 1; c < M; c++) PUSH(RA_MIX_ROW_LEFT * G + u * M + c);
            for (int64_t c = 0; c + 1 < row_len(p, u); c++) PUSH(RA_MIX_ROW_RIGHT * G + u * M + c);
        }
        break;
    default: {  /* logsparse: wave (dir, level), unit = a group of consecutive spans */
        const int dir = w / p->L, l = w % p->L;
        const int64_t a1 = min64((u + 1) * ls_group(l), ls_spans(p, l));
        for (int64_t a = u * ls_group(l); a < a1; a++)
            if (ra_cplan_region(p, p->off[dir][l] + a).members.count > 0) PUSH(p->off[dir][l] + a);
        break;
    }
    }
#undef PUSH
    return cnt;
}

RaRange ra_cplan_wave_span(const RaCPlan *p, int w, int64_t u)
{
    const int64_t M = p->M;
    switch (p->kind) {
    case RA_PLAN_MIXTURE:
        if (w == 0) return (RaRange){u, col_rows(p, u), M};
        return (RaRange){u * M, row_len(p, u), 1};
    case RA_PLAN_LOGSPARSE: {   /* the hull of the group's spans */
        const int dir = w / p->L, l = w % p->L;
        const int64_t a1 = min64((u + 1) * ls_group(l), ls_spans(p, l));
        int64_t lo = p->n, hi = 0;
        for (int64_t a = u * ls_group(l); a < a1; a++) {
            const RaRange m = ra_cplan_region(p, p->off[dir][l] + a).members;
            if (m.count == 0) continue;
            lo = min64(lo, m.start);
            hi = max64(hi, m.start + m.count);
        }
        return (RaRange){lo, max64(0, hi - lo), 1};
    }
    default:
        return (RaRange){u * M, row_len(p, u), 1};
    }
}

/* ------------------------------------------------------------------ query passes */
int ra_cplan_npasses(const RaCPlan *p)
{
    return p->kind == RA_PLAN_AXIAL || p->kind == RA_PLAN_MIXTURE ? 2 : 1;
}

int64_t ra_cplan_pass_units(const RaCPlan *p, int pass)
{
    if (p->kind == RA_PLAN_LOGSPARSE) return (p->n + RA_BQ - 1) / RA_BQ;
    return pass == 0 ? p->nr : p->M;
}

int64_t ra_cplan_unit(const RaCPlan *p, int pass, int64_t u, RaCUnit *U, int64_t *kid,
                      int64_t *vid, int64_t *spos)
{
    int64_t cnt = 0;
#define PUSH(k, v, s) do { if (kid) { kid[cnt] = (k); vid[cnt] = (v); spos[cnt] = (s); } cnt++; } while (0)
    const int64_t M = p->M, G = p->nr * M, n = p->n;
    const int causal = p->causal;
    U->sq = RA_SQ_NONE;
    U->sflags = 0;
    if (p->kind == RA_PLAN_LOGSPARSE) {
        /* RA_BQ consecutive queries; direct = {i} and the dyadic spans tiling [0, i) (and
           mirrored, (i, n)) of each query: the union of their lists, with an explicit
           per-(query, key) bitmap (ra_cplan_vis) */
        const int64_t q0 = u * RA_BQ, q1 = min64(n, q0 + RA_BQ);
        U->q = U->direct = (RaRange){q0, q1 - q0, 1};
        U->dflags = 0;
        U->sq = RA_SQ_VIS;
        for (int dir = 0; dir < (causal ? 1 : 2); dir++) {
            const int64_t c0 = dir ? n - q1 : q0, c1 = dir ? n - 1 - q0 : q1 - 1;
            for (int l = 0; l < p->L; l++)
                for (int64_t a = c0 >> (l + 1); a <= c1 >> (l + 1); a++) {
                    /* queries whose span at level l is a: bit l set, i >> (l+1) == a */
                    const int64_t lo = (a << (l + 1)) | ((int64_t)1 << l), hi = ((a + 1) << (l + 1)) - 1;
                    if (max64(lo, c0) <= min64(hi, c1)) PUSH(p->off[dir][l] + a, p->off[dir][l] + a, 0);
                }
        }
        return cnt;
    }
    if (pass == 0) {
        /* grid row u (fixed: block u): direct = the row, position-masked when causal */
        U->q = U->direct = (RaRange){u * M, row_len(p, u), 1};
        U->dflags = causal ? RA_MASKED | RA_CAUSAL : 0;
        if (p->kind == RA_PLAN_FIXED) {   /* every other block (causal: earlier ones) */
            for (int64_t g = 0; g < (causal ? u : p->nr); g++)
                if (g != u) PUSH(g, g, g);
        } else if (p->kind == RA_PLAN_MIXTURE) {
            /* every other column's cells above (bidirectional: and below) row u */
            U->sq = RA_SQ_COL;
            U->sflags = RA_MASKED | RA_EXCLUDE_SELF;
            for (int64_t c = 0; c < M; c++) {
                const int64_t a = RA_MIX_COL_ABOVE * G + u * M + c, b = RA_MIX_COL_BELOW * G + u * M + c;
                if (ra_cplan_region(p, a).members.count > 0) PUSH(a, a, c);
                if (!causal && ra_cplan_region(p, b).members.count > 0) PUSH(b, b, c);
            }
        }
        return cnt;
    }
    /* pass 1 (axial, mixture): grid column u */
    const int64_t rows = col_rows(p, u);
    U->q = (RaRange){u, rows, M};
    U->sq = RA_SQ_ROW;
    U->sflags = causal ? RA_MASKED | RA_CAUSAL | RA_EXCLUDE_SELF : RA_MASKED | RA_EXCLUDE_SELF;
    /* causal: only rows t < r are visible, r < rows */
    const int64_t t_end = causal ? rows - 1 : p->nr;
    if (p->kind == RA_PLAN_AXIAL) {
        /* every other row t: key k̂_t, value U[t, c] (a short row offers its last column) */
        U->direct = (RaRange){u, 0, M};
        U->dflags = 0;
        for (int64_t t = 0; t < t_end; t++) PUSH(t, t * M + min64(u, row_len(p, t) - 1), t);
    } else {
        /* own column above the query (bidirectional: all of it, self excluded: the row
           pass has it); every other row's cells left and right of column u */
        U->direct = (RaRange){u, rows, M};
        U->dflags = U->sflags;
        for (int64_t t = 0; t < t_end; t++) {
            const int64_t a = RA_MIX_ROW_LEFT * G + t * M + u, b = RA_MIX_ROW_RIGHT * G + t * M + u;
            if (ra_cplan_region(p, a).members.count > 0) PUSH(a, a, t);
            if (ra_cplan_region(p, b).members.count > 0) PUSH(b, b, t);
        }
    }
#undef PUSH
    return cnt;
}

/* ------------------------------------------------------------------ phases */
int ra_cplan_nphases(const RaCPlan *p) { return p->kind == RA_PLAN_MIXTURE ? 2 : 1; }

RaCPhase ra_cplan_phase(const RaCPlan *p, int ph)
{
    if (p->kind == RA_PLAN_MIXTURE) {
        /* wave 0 (columns) makes the column regions that pass 0 (rows) reads; wave 1
           (rows) the row regions of pass 1 (columns); kid = vid */
        const int64_t half = 2 * p->nr * p->M;
        return (RaCPhase){ph, ph + 1, ph, ph + 1, ph * half, half, ph * half, half};
    }
    return (RaCPhase){0, ra_cplan_nwaves(p), 0, ra_cplan_npasses(p), 0, p->R, 0, p->NK};
}

void ra_cplan_vis(const RaCPlan *p, const int64_t *qpos, int rows, const int64_t *key, int cols,
                  int summary, uint64_t *vis, ptrdiff_t ldvis)
{
    for (int i = 0; i < rows; i++) memset(vis + (ptrdiff_t)i * ldvis, 0, sizeof(uint64_t) * (size_t)ldvis);
    for (int j = 0; j < cols; j++) {
        int dir = 0, l = 0;
        int64_t a = key[j];
        if (summary) ls_decode(p, key[j], &dir, &l, &a);
        for (int i = 0; i < rows; i++) {
            const int64_t x = dir ? p->n - 1 - qpos[i] : qpos[i];
            const int on = summary ? ((x >> l) & 1) && (x >> (l + 1)) == a : a == x;
            if (on) vis[(ptrdiff_t)i * ldvis + (j >> 6)] |= (uint64_t)1 << (j & 63);
        }
    }
}

const uint64_t *ra_cunit_vis(void *ctx, int rows, int j0, int cols, ptrdiff_t *ldvis)
{
    const RaCVisCtx *c = ctx;
    ra_cplan_vis(c->p, c->qpos, rows, c->key + j0, cols, c->summary, c->vis, RA_BK / 64);
    *ldvis = RA_BK / 64;
    return c->vis;
}

void ra_cplan_sizes(const RaCPlan *p, RaCSizes *s)
{
    memset(s, 0, sizeof(*s));
    for (int pass = 0; pass < ra_cplan_npasses(p); pass++) {
        s->maxUnits = max64(s->maxUnits, ra_cplan_pass_units(p, pass));
        for (int64_t u = 0; u < ra_cplan_pass_units(p, pass); u++) {
            RaCUnit U;
            s->maxS = max64(s->maxS, ra_cplan_unit(p, pass, u, &U, NULL, NULL, NULL));
            s->maxQ = max64(s->maxQ, U.q.count);
            s->maxD = max64(s->maxD, U.direct.count);
        }
    }
    for (int w = 0; w < ra_cplan_nwaves(p); w++)
        for (int64_t u = 0; u < ra_cplan_wave_units(p, w); u++) {
            int64_t vid;
            const int64_t nv = ra_cplan_wave_unit(p, w, u, NULL), L = ra_cplan_wave_span(p, w, u).count;
            s->maxV = max64(s->maxV, nv);
            /* a unit of one region spanning it is packed in windows (combiner_body.h) */
            const int windows = nv == 1 && ra_cplan_wave_unit(p, w, u, &vid) == 1 &&
                                ra_cplan_region(p, vid).members.count == L;
            s->maxMem = max64(s->maxMem, windows ? min64(L, RA_SPAN_WINDOW) : L);
        }
    s->maxMem = max64(s->maxMem, 1);
    s->maxQ = max64(s->maxQ, 1);
    s->maxD = max64(s->maxD, 1);
    s->maxS = max64(s->maxS, 1);
    s->maxV = max64(s->maxV, 1);
}

/* ------------------------------------------------------------------ typed drivers */
#define RA_TYPED_BODY "combiner_body.h"
#include "typed.h"
