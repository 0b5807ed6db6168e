/* engine.h — the one tile engine every attention method runs on.
 *
 * A planner (dense, local, routing, clustered, combiner) decides which rows meet: it
 * gathers query rows into a QTile and packs key rows into a key list (RaKeys), then calls
 *
 *   forward:   ra_fwd_init (or ra_attend_restore) → ra_attend (once per key list)
 *              → ra_fwd_finish (or ra_attend_save, to continue in a later pass)
 *   backward:  ra_attend_backward (once per query gradient tile × key list)
 *
 * ra_attend and ra_attend_backward walk the list in tiles of RA_BK keys.  The engine never
 * sees the original arrays, only contiguous tiles plus the original positions of their
 * rows, from which it applies the masking rule (flags RA_CAUSAL, RA_EXCLUDE_SELF):
 *
 *   key j is visible to query i  iff  kpos[j] >= 0                       (not padding)
 *                                 and (!RA_CAUSAL       || kpos[j] <= qpos[i])
 *                                 and (!RA_EXCLUDE_SELF || kpos[j] != qpos[i])
 *
 * Per tile the engine masks only when the rule can hide a pair (RA_MASKED, internal),
 * and skips a tile the rule hides entirely.  A planner whose visibility is not a function
 * of positions supplies an explicit bitmap per tile (RaKeys.tile_vis): key j of the tile
 * is visible to query i only if bit j%64 of word vis[i*ldvis + j/64] is set, on top of
 * the position rule.  Logits are q·k with q pre-scaled, so `scale` is folded into the
 * query tile.  The exclude_self fallback (a query that sees nothing attends to itself)
 * is ra_attend_self_fallback, differentiated by ra_attend_backward.
 *
 * Planners that stream their keys (gathered tile by tile, or packed a window at a time)
 * give the list a load hook; clustered's improved form, which offers a wide span of logits
 * to its top-k lists before the softmax, uses spans with an observe hook.  The one-tile
 * steps behind ra_attend are private to the engine.
 *
 * Tile contract (T = float or double, suffix _f32 / _f64):
 *   QTile   q  (rows, d)  contiguous, already multiplied by scale
 *           acc (rows, e) contiguous accumulator; mx, sum (rows) running statistics
 *           s   (rows, RA_BK) logits scratch, leading dimension lds (0: RA_BK); a tile has
 *               any number of rows its planner laid out (RA_BQ, or 128: clustered's and
 *               the routing forward's)
 *   KTile   kt (d, cols)  Kᵀ with leading dimension ldkt
 *           v  (cols, e)  with leading dimension ldv
 *   Backward additionally: k (cols, d) ld ldk, vt (e, cols) ld ldvt.
 * Backward *accumulates* into dq (rows, d), dk (cols, d), dv (cols, e); dq is the
 * gradient with respect to the *scaled* query, i.e. the caller multiplies by scale.
 */
#ifndef RA_ENGINE_H
#define RA_ENGINE_H

#include "kernels.h"

#define RA_BQ 64    /* query rows per tile */
#define RA_BK 256   /* keys per tile */
#define RA_PREFETCH_ROWS 8   /* gathers of scattered rows fetch this many rows ahead */
/* for each cache line `line` (const char *) of row `row` of m (RaMat; cols elements of
 * elem bytes): BODY.  A unit-stride row: every line its bytes touch — a row that does not
 * start on a line boundary (NumPy's large arrays start 16 bytes into a page) reaches one
 * line more than its length in lines.  A strided row: the line of every 64 / elem-th
 * element. */
#define RA_FOR_ROW_LINES(m, row, cols, elem, line, BODY)                                   \
    do {                                                                                  \
        const char *ra_row_ = (m).data + (ptrdiff_t)(row) * (m).s0;                       \
        if ((m).s1 == (ptrdiff_t)(elem)) {                                                \
            const uintptr_t ra_end_ = (uintptr_t)ra_row_ + (uintptr_t)(cols) * (elem);    \
            for (uintptr_t ra_p_ = (uintptr_t)ra_row_ & ~(uintptr_t)63; ra_p_ < ra_end_;  \
                 ra_p_ += 64) {                                                           \
                const char *line = (const char *)ra_p_;                                   \
                BODY;                                                                     \
            }                                                                             \
        } else {                                                                          \
            for (int ra_f_ = 0; ra_f_ < (cols); ra_f_ += 64 / (int)(elem)) {              \
                const char *line = ra_row_ + (ptrdiff_t)ra_f_ * (m).s1;                   \
                BODY;                                                                     \
            }                                                                             \
        }                                                                                 \
    } while (0)

/* Hint the cache lines of row `row` of m (RA_FOR_ROW_LINES).  Only a hint. */
#define RA_PREFETCH_ROW(m, row, cols, elem, locality)                                      \
    RA_FOR_ROW_LINES(m, row, cols, elem, ra_line_, __builtin_prefetch(ra_line_, 0, (locality)))

/* Queue in h (room for cap runs) the lines RA_PREFETCH_ROW hints for row `row` of m: a
 * unit-stride row as one run, a strided one a run per line. */
static inline void ra_hints_add_row(RaHints *h, int cap, RaMat m, int64_t row, int cols,
                                    size_t elem)
{
    const char *start = m.data + (ptrdiff_t)row * m.s0;
    if (m.s1 == (ptrdiff_t)elem) {
        const uintptr_t first = (uintptr_t)start & ~(uintptr_t)63;
        const uintptr_t end = (uintptr_t)start + (uintptr_t)cols * elem;
        ra_hints_add_lines(h, cap, start, (end - first + 63) / 64);
        return;
    }
    RA_FOR_ROW_LINES(m, row, cols, elem, line, ra_hints_add_lines(h, cap, line, 1));
}

/* What a key list's load hook must provide for a tile. */
enum { RA_NEED_KT = 1, RA_NEED_V = 2, RA_NEED_BACKWARD = 4 /* k and vt */ };

enum {
    RA_MASKED = 1,        /* engine-internal: this tile needs the position mask */
    RA_CAUSAL = 2,        /* key j visible to query i only if j <= i */
    RA_EXCLUDE_SELF = 4,  /* key i hidden from query i */
    RA_OWN_STATS = 8,     /* ra_attend_backward: the list is one tile (count <= RA_BK) and
                             the gradient tile's lse and delta are not read but written,
                             worked out from that tile (no forward statistics needed); a
                             longer list gets NaN statistics, so NaN gradients */
};

/* The pair terms of a batch of problems (see RaPairs): drop (B) int64 dropout thresholds
 * out of 2^24, key (B) uint64 dropout streams, bias (B; r) the relative position bias with
 * unit core stride, r = n + m - 1, entry j - i + n - 1 for query i and key j (data NULL:
 * none), dbias (B; r) where a backward writes its gradient (data NULL: not wanted). */
typedef struct { RaBVec drop, key, bias, dbias; } RaBPairs;
/* The pair terms of the batch from problem b on. */
static inline RaBPairs ra_pairs_from(const RaBPairs *p, ptrdiff_t b)
{
    RaBPairs r = {ra_bvec_from(p->drop, b), ra_bvec_from(p->key, b), ra_bvec_from(p->bias, b),
                  ra_bvec_from(p->dbias, b)};
    return r;
}
#define RA_DROP_ONE (1u << 24)   /* dropout thresholds are out of this */

#define RA_ENGINE_DECLS(T, SUF, KT)                                                       \
    /* Terms on the weights of the pairs a planner attends directly, given per problem:  \
       a relative position bias added to the logit of (query position i, key position j),\
       bias[j - i], and attention dropout: the weight p_ij (after the softmax) becomes    \
       p_ij · keep, or 0 when ra_pair_bits(key, i, j) < drop (common.h).  Both read the   \
       tiles' positions, so a query tile with pairs needs pos — or ids, when a planner's \
       masking positions are not the pairs' identities (Combiner's summaries: row and    \
       column coordinates mask them, the query position and -1 - region id name them).   \
       The backward regenerates the dropout and accumulates dbias[j - i] += ∂loss/∂logit_ij\
       when dbias is set. */                                                              \
    typedef struct {                                                                      \
        const T *bias;         /* at offset 0 = same position; NULL: no bias */           \
        T *dbias;              /* backward, same offsets; NULL: not wanted */             \
        uint64_t key;          /* this problem's dropout stream */                        \
        uint32_t drop;         /* threshold out of 2^24; 0: no dropout */                 \
        T keep;                /* 1 / (1 - drop / 2^24) */                                \
    } RaPairs_##SUF;                                                                      \
    typedef struct {                                                                      \
        int rows;                                                                         \
        const T *q;            /* (rows, d) scaled queries */                             \
        const int64_t *pos;    /* (rows) original positions, NULL if never masked */      \
        T *mx, *sum;           /* (rows) */                                               \
        T *acc;                /* (rows, e) */                                            \
        T *s;                  /* (rows, RA_BK) */                                        \
        ptrdiff_t lds;         /* s's leading dimension; 0 means RA_BK */                 \
        const RaPairs_##SUF *pairs;   /* NULL: none */                                    \
        const int64_t *ids;    /* (rows) the pairs' row ids; NULL: pos */                 \
        RaHints *hints;        /* lines the forward's products hint (common.h); NULL: none */\
    } RaQTile_##SUF;                                                                      \
    typedef struct RaKTile_##SUF {                                                        \
        int cols;                                                                         \
        const T *kt; ptrdiff_t ldkt;   /* (d, cols) */                                    \
        const T *v;  ptrdiff_t ldv;    /* (cols, e) */                                    \
        const T *k;  ptrdiff_t ldk;    /* (cols, d)  backward only */                     \
        const T *vt; ptrdiff_t ldvt;   /* (e, cols)  backward only */                     \
        const int64_t *pos;            /* (cols) original positions, -1 = padding */      \
        const int64_t *ids;            /* (cols) the pairs' column ids; NULL: pos */      \
        const uint64_t *vis;           /* optional (rows, ldvis) bitmap, NULL = none */   \
        ptrdiff_t ldvis;               /* words per query row of vis */                   \
        T *dk, *dv;    /* key lists, backward: where a load hook wants this tile's dk, dv \
                          (leading dimensions lddk, lddv); NULL: the list's own rows */   \
    } RaKTile_##SUF;                                                                      \
    typedef struct {                                                                      \
        int rows;                                                                         \
        const T *q;            /* (rows, d) scaled queries */                             \
        const T *dout;         /* (rows, e) */                                            \
        T *lse, *delta;        /* (rows): log-sum-exp, rowsum(dout ∘ out); written       \
                                  instead of read under RA_OWN_STATS */                   \
        const int64_t *pos;                                                               \
        T *dq;                 /* (rows, d) accumulated, w.r.t. the scaled query */       \
        T *s, *dp;             /* scratch (rows, RA_BK) each */                           \
        const RaPairs_##SUF *pairs;   /* NULL: none */                                    \
        const int64_t *ids;    /* (rows) the pairs' row ids; NULL: pos */                 \
        RaHints *hints;        /* lines its products hint (common.h); NULL: none */       \
    } RaQGradTile_##SUF;                                                                  \
    /* dst (n) += a · row i of m (n columns); unit-stride rows in a loop the compiler    \
       vectorises (the same operations either way, so the same result). */               \
    void ra_add_row_##SUF(T *dst, T a, RaMat m, int64_t i, int n);                         \
    /* Σ a[f]·b[f], f < n, over byte strides sa, sb: eight partial sums combined in a     \
       fixed order (vectorised for unit strides; the same result for any strides). */     \
    T ra_dot_##SUF(const char *a, ptrdiff_t sa, const char *b, ptrdiff_t sb, int n);       \
    /* Gather rows of src (a strided 2-D view) into a contiguous tile.  Row r of the    \
       tile is src row idx[r] (idx NULL: row first + r); idx[r] < 0 gives a zero row.   \
       Values are multiplied by mul.  transposed = 0: dst is (rows, cols) with leading  \
       dimension ld; transposed = 1: dst is (cols, rows), i.e. dst[c*ld + r]. */         \
    void ra_gather_##SUF(RaMat src, const int64_t *idx, int64_t first, int rows,        \
                         int cols, T mul, int transposed, T *dst, ptrdiff_t ld);          \
    /* Rows [first, first + rows) of src as a (rows, cols) matrix with leading dimension \
       *ld: src itself where its rows are unit-stride and ascending, else a copy in dst   \
       (rows, cols).  The same values either way: a product over them gives the same bits.*/\
    const T *ra_rows_##SUF(RaMat src, int64_t first, int rows, int cols, T *dst,         \
                           ptrdiff_t *ld);                                                \
    /* A key list: `count` keys for the engine, attended in tiles of RA_BK.  Forward   \
       reads kt, v; backward kt, k, vt.  pos (count) gives the positions the masking    \
       rule reads (NULL: every key visible).  Set fields by name; unused ones stay 0.    \
       Optional hooks, all given ctx:                                                    \
       load      fills the tile of keys [j0, j0 + t->cols) that the list's own pointers  \
                 do not hold (need: RA_NEED_* bits): gathers rows into the planner's     \
                 buffers, sets the tile's pointers and positions; it may shorten cols.   \
       tile_vis  the explicit bitmap of the tile's keys for the current `rows` queries.  \
       span      keys per softmax step (a multiple of RA_BK; 0: RA_BK): the logits of a  \
                 span are computed tile by tile into span_s (the tile's rows, leading     \
                 dimension span; positions into span_pos), shown to observe, then folded \
                 in one step (v from the list when it has v, else tile by tile); within \
                 spans no tile is skipped (a hidden pair's logit is -inf).               \
       Outside spans a tile whose pairs are all hidden is skipped after its load. */     \
    typedef struct RaKeys_##SUF {                                                         \
        int count;                                                                        \
        const T *kt; ptrdiff_t ldkt;   /* (d, count) */                                   \
        const T *v;  ptrdiff_t ldv;    /* (count, e)  forward */                          \
        const T *k;  ptrdiff_t ldk;    /* (count, d)  backward */                         \
        const T *vt; ptrdiff_t ldvt;   /* (e, count)  backward */                         \
        const int64_t *pos;                                                               \
        const int64_t *ids;    /* (count) the pairs' column ids; NULL: pos (not with spans) */\
        void (*load)(void *ctx, int j0, int rows, int need, struct RaKTile_##SUF *t);     \
        const uint64_t *(*tile_vis)(void *ctx, int rows, int j0, int cols,                \
                                    ptrdiff_t *ldvis);                                    \
        int span;                                                                         \
        T *span_s;                                                                        \
        int64_t *span_pos;                                                                \
        void (*observe)(void *ctx, const T *s, ptrdiff_t lds, int rows, int width,        \
                        const int64_t *pos);                                              \
        void *ctx;                                                                        \
    } RaKeys_##SUF;                                                                       \
    /* Key rows kidx[0..rows) of k and vidx[0..rows) of v (as a rule the same list;     \
       Combiner's summaries keep keys and values apart) packed for the engine (an index  \
       < 0: a zero row) into the buffers given (NULL: not wanted): kᵀ (d, ·) times      \
       kt_mul (the forward folds the logits' scale into it), vᵀ (e, ·), and the rows k   \
       (rows, ·), unscaled, and v (rows, ·), each with the leading dimension ra_spread_ld\
       of its width, so a buffer for up to u keys holds ra_spread_size(d, u) elements    \
       for kᵀ, ra_spread_size(u, d) for k.  Returns them as a key list of `rows` keys    \
       (pos and the rest unset). */                                                      \
    RaKeys_##SUF ra_pack_keys_##SUF(RaMat k, const int64_t *kidx, RaMat v,                \
                                    const int64_t *vidx, int rows, int d, int e, T kt_mul,\
                                    T *kp, T *kt, T *vp, T *vt);                          \
    /* The buffers of a query tile of up to `rows` rows, taken from an arena: q (rows, d)\
       — returned, for the planner to gather its scaled queries into — and the engine's  \
       own acc (rows, e), s (rows, RA_BK), mx, sum (rows). */                            \
    T *ra_qtile_layout_##SUF(RaQTile_##SUF *qt, RaArena *a, int rows, int d, int e);      \
    /* The engine's scratch of a gradient tile of up to `rows` rows: s, dp (rows, RA_BK);\
       s shared with the query tile `share` (NULL: its own) when the two never run at once.*/\
    void ra_qgrad_layout_##SUF(RaQGradTile_##SUF *g, RaArena *a, int rows,                \
                               const RaQTile_##SUF *share);                               \
    /* The dropout factor of pair (i, j) under pr: keep, 0 when dropped, 1 without. */   \
    static inline T ra_drop_factor_##SUF(const RaPairs_##SUF *pr, int64_t i, int64_t j)   \
    {                                                                                     \
        if (!pr || !pr->drop) return 1;                                                   \
        return ra_pair_bits(pr->key, i, j) >= pr->drop ? pr->keep : 0;                    \
    }                                                                                     \
    /* Problem b's pair terms into *pr, for n queries: NULL when it has none.  dbias     \
       (r entries, zeroed by the caller) is where a backward accumulates, or NULL. */     \
    const RaPairs_##SUF *ra_pairs_at_##SUF(const RaBPairs *bp, ptrdiff_t b, int n, T *dbias,\
                                           RaPairs_##SUF *pr);                            \
    /* dbias of problem b (r entries, through its strides) = Σ_g part[g·r ..] over the   \
       `parts` partial gradients, summed in order g = 0, 1, ... */                        \
    void ra_pairs_write_dbias_##SUF(const RaBPairs *bp, ptrdiff_t b, int r, const T *part,\
                                    int parts);                                           \
    /* acc = 0, mx = -inf, sum = 0 */                                                     \
    void ra_fwd_init_##SUF(RaQTile_##SUF *qt, int e);                                     \
    /* Fold every key of the list into the running softmax of qt (rows of qt already    \
       initialised, or restored).  flags: RA_CAUSAL, RA_EXCLUDE_SELF; the engine decides \
       per tile whether the rule hides anything, and skips tiles it hides entirely. */   \
    void ra_attend_##SUF(const KT *K, RaQTile_##SUF *qt, const RaKeys_##SUF *keys, int d, \
                         int e, int flags);                                               \
    /* The exclude_self fallback: a row of qt that saw no key (sum 0) attends to its own \
       key if the list holds it (weight 1); self_only[r] records whether it did. */      \
    void ra_attend_self_fallback_##SUF(RaQTile_##SUF *qt, const RaKeys_##SUF *keys,       \
                                       int d, int e, uint8_t *self_only);                  \
    /* A softmax carried across key lists: save rows r < rows of qt to slot at[r] of    \
       (mx, sum, acc) arrays, and restore them. */                                       \
    void ra_attend_save_##SUF(const RaQTile_##SUF *qt, int e, const int64_t *at, T *mx,   \
                              T *sum, T *acc);                                            \
    void ra_attend_restore_##SUF(RaQTile_##SUF *qt, int e, const int64_t *at,              \
                                 const T *mx, const T *sum, const T *acc);                \
    /* Backward of ra_attend for one query gradient tile: dq += over the list, dk (count,\
       d) and dv (count, e) accumulate.  self_only (rows) or NULL: rows whose forward     \
       took the exclude_self fallback (their one term is differentiated too).  flags:   \
       RA_CAUSAL, RA_EXCLUDE_SELF, RA_OWN_STATS. */                                       \
    void ra_attend_backward_##SUF(const KT *K, RaQGradTile_##SUF *g, const RaKeys_##SUF *keys,\
                                  T *dk, ptrdiff_t lddk, T *dv, ptrdiff_t lddv, int d,     \
                                  int e, int flags, const uint8_t *self_only);            \
    /* The one log-sum-exp merge of softmaxes over disjoint key sets: rows at[t] (t when\
       at is NULL), t < count, of lse and of o (normalised outputs, (·, e) contiguous) -> \
       out (e, byte stride os) = Σ_t exp(lse_t − L)·o_t, computed as Σ_t w_t·o_t / Σ_t w_t \
       with w_t = exp(lse_t − max), in order t = 0, 1, ...; returns L = log Σ_t exp(lse_t).\
       Nothing seen (count 0 or every lse -inf): out 0, L -inf; a NaN lse: NaN.  With o \
       NULL only L is computed. */                                                        \
    T ra_lse_merge_##SUF(int count, const int64_t *at, const T *lse, const T *o, int e,    \
                         char *out, ptrdiff_t os);                                        \
    /* out = acc / sum (0 when nothing was visible), lse = mx + log(sum) (-inf); both    \
       written through byte strides; lse may be NULL */                                   \
    void ra_fwd_finish_##SUF(const RaQTile_##SUF *qt, int e, char *out, ptrdiff_t os0,   \
                             ptrdiff_t os1, char *lse, ptrdiff_t ls0);                    \
    /* ra_fwd_finish of row i alone, into the row o (stride os1) and *lse (or NULL) */    \
    void ra_fwd_finish_row_##SUF(const RaQTile_##SUF *qt, int i, int e, char *o,          \
                                 ptrdiff_t os1, T *lse);

RA_ENGINE_DECLS(float, f32, RaKernelsF32)
RA_ENGINE_DECLS(double, f64, RaKernelsF64)

#endif /* RA_ENGINE_H */
