/* routing.c — routing attention (Routing Transformer) on the tile engine: the shared
 * membership plan, then the typed planner in routing_body.h. */
#include "methods.h"

/* ------------------------------------------------------------------ the plan */
int ra_routing_plan_alloc(RaRoutingPlan *P, int n, int m, int d, int e, int c, int w, int u)
{
    memset(P, 0, sizeof(*P));
    P->n = n; P->m = m; P->d = d; P->e = e; P->c = c; P->w = w; P->u = u;
    const size_t i64 = sizeof(int64_t);
    P->qlist = ra_alloc(ra_mul(i64, ra_mul((size_t)c, w)));
    P->klist = ra_alloc(ra_mul(i64, ra_mul((size_t)c, u)));
    P->q_occ = ra_alloc(ra_mul(i64, ra_mul((size_t)c, w)));
    P->k_occ = ra_alloc(ra_mul(i64, ra_mul((size_t)c, u)));
    P->q_start = ra_alloc(ra_mul(i64, (size_t)n + 1));
    P->k_start = ra_alloc(ra_mul(i64, (size_t)m + 1));
    P->qcount = ra_alloc(ra_mul(sizeof(int), (size_t)c));
    P->kcount = ra_alloc(ra_mul(sizeof(int), (size_t)c));
    P->q_shared = ra_alloc(ra_mul((size_t)c, w));
    P->k_shared = ra_alloc(ra_mul((size_t)c, u));
    P->qstamp = ra_alloc(ra_mul(i64, (size_t)n));
    P->kstamp = ra_alloc(ra_mul(i64, (size_t)m));
    if (!P->qlist || !P->klist || !P->q_occ || !P->k_occ || !P->q_start || !P->k_start ||
        !P->qcount || !P->kcount || !P->q_shared || !P->k_shared || !P->qstamp || !P->kstamp) {
        ra_routing_plan_free(P);
        return RA_ERR_NOMEM;
    }
    memset(P->qstamp, 0, i64 * (size_t)n);
    memset(P->kstamp, 0, i64 * (size_t)m);
    return RA_OK;
}

void ra_routing_plan_free(RaRoutingPlan *P)
{
    ra_free(P->qlist); ra_free(P->klist); ra_free(P->q_occ); ra_free(P->k_occ);
    ra_free(P->q_start); ra_free(P->k_start); ra_free(P->qcount); ra_free(P->kcount);
    ra_free(P->q_shared); ra_free(P->k_shared); ra_free(P->qstamp); ra_free(P->kstamp);
    memset(P, 0, sizeof(*P));
}

/* Copy the valid entries of idx (c, width) into list (c, width) row by row, checking
 * each against [0, limit) and for repeats inside its row (stamp (limit), with its
 * counter); count[cl] = valid entries.  Then, if start is given, token t's occurrences
 * (slot ids cl·width + r, in cluster order) go to occ[start[t] .. start[t+1]) and each
 * slot's shared flag says whether its token has more than one. */
static int ra_compact_members(int c, RaMat idx, int width, int64_t limit, int64_t *stamps,
                              int64_t *stamp_counter, int64_t *list, int *count,
                              int64_t *start, int64_t *occ, uint8_t *shared)
{
    if (start)
        for (int64_t t = 0; t <= limit; t++) start[t] = 0;
    for (int cl = 0; cl < c; cl++) {
        const int64_t stamp = ++*stamp_counter;     /* unique per list, never reset */
        int r = 0;
        for (int s = 0; s < width; s++) {
            const int64_t x = RA_MAT_AT(int64_t, idx, cl, s);
            if (x == -1) continue;
            if (x < 0 || x >= limit || stamps[x] == stamp) return RA_ERR_INDEX;
            stamps[x] = stamp;
            list[(ptrdiff_t)cl * width + r++] = x;
            if (start) start[x + 1]++;
        }
        count[cl] = r;
    }
    if (!start) return RA_OK;
    for (int64_t t = 0; t < limit; t++) start[t + 1] += start[t];
    /* in cluster order: the shared flags, then the occurrences (start[t] used as a
       cursor and restored afterwards) */
    for (int cl = 0; cl < c; cl++)
        for (int r = 0; r < count[cl]; r++) {
            const int64_t x = list[(ptrdiff_t)cl * width + r];
            shared[(ptrdiff_t)cl * width + r] = start[x + 1] - start[x] > 1;
        }
    for (int cl = 0; cl < c; cl++)
        for (int r = 0; r < count[cl]; r++) {
            const int64_t x = list[(ptrdiff_t)cl * width + r];
            occ[start[x]++] = (int64_t)cl * width + r;
        }
    for (int64_t t = limit; t > 0; t--) start[t] = start[t - 1];
    start[0] = 0;
    return RA_OK;
}

/* The query and the key side are independent (each its own stamps): on two threads
 * when there are two.  A bad query list is reported before a bad key list. */
int ra_routing_plan_build(RaRoutingPlan *P, RaMat q_idx, RaMat k_idx, int key_occurrences)
{
    int st[2];
    RA_PARALLEL_FOR(ra_num_threads() > 1 ? 2 : 1, side, 2, schedule(static),
        st[side] = side == 0
            ? ra_compact_members(P->c, q_idx, P->w, P->n, P->qstamp, &P->qstamp_counter,
                                 P->qlist, P->qcount, P->q_start, P->q_occ, P->q_shared)
            : ra_compact_members(P->c, k_idx, P->u, P->m, P->kstamp, &P->kstamp_counter,
                                 P->klist, P->kcount, key_occurrences ? P->k_start : NULL,
                                 P->k_occ, P->k_shared););
    return st[0] != RA_OK ? st[0] : st[1];
}

/* ------------------------------------------------------------------ typed planners */
#define RA_TYPED_BODY "routing_body.h"
#include "typed.h"
