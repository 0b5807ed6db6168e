/* combiner.h — the region-list planner behind Combiner attention (see combiner.c).
 * Private to combiner.c / combiner_body.h; the drivers are declared in methods.h. */
#ifndef RA_COMBINER_H
#define RA_COMBINER_H

#include "methods.h"

enum { RA_PLAN_FIXED = 0, RA_PLAN_AXIAL = 1, RA_PLAN_LOGSPARSE = 2, RA_PLAN_MIXTURE = 3 };
/* mixture region kinds: vid = kind·(nr·M) + r·M + c */
enum { RA_MIX_COL_ABOVE = 0, RA_MIX_COL_BELOW = 1, RA_MIX_ROW_LEFT = 2, RA_MIX_ROW_RIGHT = 3 };
/* which coordinate of a query its summary entries' spos is compared with */
enum { RA_SQ_NONE = 0, RA_SQ_ROW = 1, RA_SQ_COL = 2, RA_SQ_VIS = 3 };
/* RA_SQ_VIS: no position mask; visibility of every (query, key) pair, direct keys and
   summary entries alike, is an explicit bitmap from ra_cplan_vis */

/* positions start, start + stride, …  (count of them) */
typedef struct { int64_t start, count, stride; } RaRange;

typedef struct {
    int kind, causal;
    int64_t n, M, nr;      /* length, grid columns (block), grid rows */
    int64_t R, NK;         /* value regions, summary keys */
    int L;                 /* logsparse: levels, 2^L >= n */
    int64_t off[2][64];    /* logsparse: first vid of (direction, level) */
} RaCPlan;

typedef struct {
    RaRange members;       /* count 0: an empty region, never referenced */
    int64_t qsrc;          /* region query: -1 = max-pool over members, else that query row */
    int64_t kid;           /* its summary key (max-pool of the members' keys) */
    int owns_kid;          /* this region computes k̂_kid (one region per kid) */
} RaCRegion;

typedef struct {
    RaRange q, direct;     /* the unit's queries; its direct keys */
    int dflags, sflags;    /* engine flags for the direct keys and the summary entries */
    int sq;                /* RA_SQ_*: query coordinate matched against summary spos */
} RaCUnit;

typedef struct {
    int64_t maxQ, maxD, maxS;   /* per query unit: queries, direct keys, summary entries */
    int64_t maxV, maxMem;       /* per region unit: regions, span columns packed at once */
    int64_t maxUnits;           /* units of the largest query pass */
} RaCSizes;

/* kind RA_PLAN_*, block = grid columns (ignored by logsparse); RA_ERR_VALUE if invalid */
int ra_cplan_init(RaCPlan *p, int kind, int64_t n, int64_t block, int causal);
RaCRegion ra_cplan_region(const RaCPlan *p, int64_t vid);
int ra_cplan_nwaves(const RaCPlan *p);
int64_t ra_cplan_wave_units(const RaCPlan *p, int w);
/* vids of region unit u of wave w (vids NULL: count only); returns the count */
int64_t ra_cplan_wave_unit(const RaCPlan *p, int w, int64_t u, int64_t *vids);
/* positions covering every region of that unit (each region's members are a sub-run) */
RaRange ra_cplan_wave_span(const RaCPlan *p, int w, int64_t u);
int ra_cplan_npasses(const RaCPlan *p);

/* Phases: the waves that compute a set of summaries and the query passes that read them,
   run together so the tables hold one phase's summaries at a time: region ids vid in
   [vbase, vbase + nv), summary keys kid in [kbase, kbase + nk). */
typedef struct { int wave0, wave1, pass0, pass1; int64_t vbase, nv, kbase, nk; } RaCPhase;
int ra_cplan_nphases(const RaCPlan *p);
RaCPhase ra_cplan_phase(const RaCPlan *p, int ph);
int64_t ra_cplan_pass_units(const RaCPlan *p, int pass);
/* query unit u of a pass; fills U and its summary entries (kid NULL: count only) */
int64_t ra_cplan_unit(const RaCPlan *p, int pass, int64_t u, RaCUnit *U, int64_t *kid,
                      int64_t *vid, int64_t *spos);
void ra_cplan_sizes(const RaCPlan *p, RaCSizes *s);
/* RA_SQ_VIS units: bitmap (rows, ldvis words) of which key is visible to which query;
   key = direct positions (summary 0) or summary vids (summary 1) */
void ra_cplan_vis(const RaCPlan *p, const int64_t *qpos, int rows, const int64_t *key, int cols,
                  int summary, uint64_t *vis, ptrdiff_t ldvis);
/* The engine's bitmap callback (RaKeys.tile_vis) for a query unit's key list: ra_cplan_vis
 * of the keys [j0, j0 + cols) of `key` for the current query rows `qpos`, into vis. */
typedef struct {
    const RaCPlan *p;
    uint64_t *vis;            /* (RA_BQ, RA_BK / 64) */
    const int64_t *qpos;      /* the current query tile's positions */
    const int64_t *key;       /* key or summary ids of the list */
    int summary;
} RaCVisCtx;
const uint64_t *ra_cunit_vis(void *ctx, int rows, int j0, int cols, ptrdiff_t *ldvis);

/* what a problem's tables hold: the forward's, the backward's, and in the backward the
   recomputed output (RA_CT_OUT) and gradient accumulators (RA_CT_GRADS) */
enum { RA_CT_FORWARD = 0, RA_CT_BACKWARD = 1, RA_CT_OUT = 2, RA_CT_GRADS = 4 };

/* span columns packed at once for a region unit of a single long region (combiner_body.h) */
#define RA_SPAN_WINDOW 512

/* summary-gradient slots per chunk of query units (raised to one unit's worth) */
#define RA_SLOT_BUDGET 8192


#endif /* RA_COMBINER_H */
