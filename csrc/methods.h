/* methods.h — the planners: one driver per method and dtype, called by module.c.
 *
 * Every driver walks a flattened batch of B problems (the gufunc's outer loop) and
 * returns RA_OK or an RA_ERR_* code.  Operands are strided views (common.h); the
 * drivers copy what they need into contiguous scratch, so any strides work.
 */
#ifndef RA_METHODS_H
#define RA_METHODS_H

#include "engine.h"

#define RA_DENSE_DECLS(T, SUF)                                                            \
    /* q (B; n, d), k (B; m, d), v (B; m, e), key_mask (B; m) uint8 or data == NULL,     \
       scale (B), causal (B) uint8, pair terms (engine.h)  ->  out (B; n, e), lse (B; n) */\
    int ra_attention_forward_##SUF(ptrdiff_t B, int n, int m, int d, int e, RaBMat q,     \
                                   RaBMat k, RaBMat v, RaBVec key_mask, RaBVec scale,     \
                                   RaBVec causal, const RaBPairs *pairs, RaBMat out,      \
                                   RaBVec lse);                                           \
    /* dout (B; n, e), q, k, v, key_mask, out (B; n, e), lse (B; n), scale, causal, pair \
       terms ->  dq (B; n, d), dk (B; m, d), dv (B; m, e), pairs->dbias (written) */      \
    int ra_attention_backward_##SUF(ptrdiff_t B, int n, int m, int d, int e, RaBMat dout, \
                                    RaBMat q, RaBMat k, RaBMat v, RaBVec key_mask,        \
                                    RaBMat out, RaBVec lse, RaBVec scale, RaBVec causal,  \
                                    const RaBPairs *pairs, RaBMat dq, RaBMat dk, RaBMat dv);

RA_DENSE_DECLS(float, f32)
RA_DENSE_DECLS(double, f64)

/* ---- routing attention (routing.c) ---- */
/* Membership lists of one problem, compacted and validated, with each token's
 * occurrences (slot ids cl·w + r, cluster order) for the deterministic merges and each
 * slot's "token in several clusters" flag.  The forward builds the query side's
 * occurrences only (its keys need no merge). */
typedef struct {
    int n, m, d, e, c, w, u;
    int64_t *qlist, *klist;     /* (c, w), (c, u): valid members first, in list order */
    int *qcount, *kcount;       /* (c) valid members per cluster */
    int64_t *q_start, *q_occ;   /* (n + 1), (c·w): CSR of query occurrences */
    int64_t *k_start, *k_occ;   /* (m + 1), (c·u) */
    uint8_t *q_shared, *k_shared; /* (c·w), (c·u): the slot's token is in several clusters
                                     (read in cluster order, not through *_start) */
    int64_t *qstamp, *kstamp;   /* (n), (m): duplicate detection, one per side */
    int64_t qstamp_counter, kstamp_counter;
} RaRoutingPlan;

int ra_routing_plan_alloc(RaRoutingPlan *P, int n, int m, int d, int e, int c, int w, int u);
void ra_routing_plan_free(RaRoutingPlan *P);
/* RA_ERR_INDEX if an entry is outside [-1, n) / [-1, m) or repeated inside one list.
 * key_occurrences: build k_start, k_occ and k_shared too (the backward). */
int ra_routing_plan_build(RaRoutingPlan *P, RaMat q_idx, RaMat k_idx, int key_occurrences);
/* The masking rule of a routing problem, for the engine's key lists. */
static inline int ra_routing_flags(int causal, int exclude_self)
{
    return (causal ? RA_CAUSAL : 0) | (exclude_self ? RA_EXCLUDE_SELF : 0);
}

/* Per-slot statistics of a routing forward, slot (cl, r) = r-th valid member query of
 * cluster cl: output row o (c, w, e) (written only for a token in several clusters: a
 * token in one has its row in the merged output, which the backward reads instead), its
 * lse l (c, w), and self_only (c, w) bytes (the exclude_self fallback was taken).
 * Contiguous per problem, o_sb/l_sb/self_sb apart. */
typedef struct {
    char *o, *l, *self_only;
    ptrdiff_t o_sb, l_sb, self_sb;
} RaRoutingSlots;

#define RA_ROUTING_DECLS(T, SUF)                                                          \
    /* q (B; n, d), k (B; m, d), v (B; m, e), q_idx (B; c, w), k_idx (B; c, u) int64;    \
       scale (B), causal, exclude_self, merge_lse (B) uint8, pair terms (engine.h)        \
       -> out (B; n, e), lse (B; n), slot statistics (written) */                         \
    int ra_routing_forward_##SUF(ptrdiff_t B, int n, int m, int d, int e, int c, int w,  \
                                 int u, RaBMat q, RaBMat k, RaBMat v, RaBMat q_idx,       \
                                 RaBMat k_idx, RaBVec scale, RaBVec causal,               \
                                 RaBVec exclude_self, RaBVec merge_lse,                   \
                                 const RaBPairs *pairs, RaBMat out, RaBVec lse,           \
                                 RaRoutingSlots slots);                                   \
    /* dout (B; n, e) and the forward's inputs -> dq (B; n, d), dk (B; m, d),            \
       dv (B; m, e), pairs->dbias, written.  saved.o == NULL: the forward is recomputed; \
       saved_out (B; n, e), saved_lse (B; n) and saved slots are the forward's. */        \
    int ra_routing_backward_##SUF(ptrdiff_t B, int n, int m, int d, int e, int c, int w, \
                                  int u, RaBMat dout, RaBMat q, RaBMat k, RaBMat v,       \
                                  RaBMat q_idx, RaBMat k_idx, RaBVec scale, RaBVec causal,\
                                  RaBVec exclude_self, RaBVec merge_lse, RaBMat saved_out,\
                                  RaBVec saved_lse, RaRoutingSlots saved,                 \
                                  const RaBPairs *pairs, RaBMat dq, RaBMat dk, RaBMat dv);

RA_ROUTING_DECLS(float, f32)
RA_ROUTING_DECLS(double, f64)
/* ------------------------------------------------------------------ combiner attention */
/* plan (B) int64: 0 fixed, 1 axial, 2 logsparse, 3 mixture; block (B) int64 in [1, n]
 * (grid columns; ignored by logsparse); causal (B) uint8; scale (B).  RA_ERR_VALUE for
 * an invalid plan or block. */
#define RA_COMBINER_DECLS(T, SUF)                                                         \
    /* q, k (B; n, d), v (B; n, e)  ->  out (B; n, e), lse (B; n) (each query's softmax \
       log-sum-exp; lse.data may be NULL) */                                              \
    int ra_combiner_forward_##SUF(ptrdiff_t B, int n, int d, int e, RaBMat q, RaBMat k,    \
                                  RaBMat v, RaBVec plan, RaBVec block, RaBVec causal,      \
                                  RaBVec scale, const RaBPairs *pairs, RaBMat out,         \
                                  RaBVec lse);                                             \
    /* dout (B; n, e), q, k, v  ->  dq, dk (B; n, d), dv (B; n, e)  (written, not        \
       accumulated).  saved_out (B; n, e) / saved_lse (B; n): the forward's, or data     \
       NULL to recompute them (the region summaries are recomputed either way). */       \
    int ra_combiner_backward_##SUF(ptrdiff_t B, int n, int d, int e, RaBMat dout,         \
                                   RaBMat q, RaBMat k, RaBMat v, RaBMat saved_out,        \
                                   RaBVec saved_lse, RaBVec plan, RaBVec block,           \
                                   RaBVec causal, RaBVec scale, const RaBPairs *pairs,    \
                                   RaBMat dq, RaBMat dk, RaBMat dv);

RA_COMBINER_DECLS(float, f32)
RA_COMBINER_DECLS(double, f64)
/* ------------------------------------------------------------------ clustered attention */
/* What the clustered backward takes from its forward instead of recomputing it: the
 * centroid attention o (B; C, e) and lse (B; C); improved form, T_c as key positions
 * sel (B; C, K) int64 (-1 padded, increasing) and their centroid weights aw (B; C, K),
 * K = min(topk, m).  All data NULL: not given. */
typedef struct {
    RaBMat o, sel, aw;
    RaBVec lse;
} RaClusteredSaved;

#define RA_CLUSTERED_DECLS(T, SUF)                                                        \
    /* q (B; n, d), k (B; m, d), v (B; m, e), labels (B; n) int64 in [-1, C),            \
       key_mask (B; m) uint8 or data == NULL, scale (B); C clusters; topk = 0 for the    \
       plain form, >= 1 for the improved form  ->  out (B; n, e).  RA_ERR_INDEX for a    \
       label out of range.  saved: written when its data are set. */                    \
    int ra_clustered_forward_##SUF(ptrdiff_t B, int n, int m, int d, int e, int C,        \
                                   int topk, RaBMat q, RaBMat k, RaBMat v, RaBVec labels, \
                                   RaBVec key_mask, RaBVec scale, const RaBPairs *pairs,  \
                                   RaBMat out, RaClusteredSaved saved);                   \
    /* dout (B; n, e) and the forward's inputs  ->  dq (B; n, d), dk (B; m, d),           \
       dv (B; m, e) (written, not accumulated); m̂ held constant.  saved (data set): the \
       forward's statistics, checked (RA_ERR_INDEX for a bad position) and used. */     \
    int ra_clustered_backward_##SUF(ptrdiff_t B, int n, int m, int d, int e, int C,       \
                                    int topk, RaBMat dout, RaBMat q, RaBMat k, RaBMat v,  \
                                    RaBVec labels, RaBVec key_mask, RaBVec scale,         \
                                    const RaBPairs *pairs, RaClusteredSaved saved,        \
                                    RaBMat dq, RaBMat dk, RaBMat dv);

RA_CLUSTERED_DECLS(float, f32)
RA_CLUSTERED_DECLS(double, f64)
/* ---- routing decisions (clustering.c) ---- */
/* Labels, member lists and codes are int64; labels are in [-1, c), −1 = in no cluster.
 * Drivers that read labels return RA_ERR_INDEX for one outside that range. */
#define RA_CLUSTERING_DECLS(T, SUF)                                                       \
    /* x (B; n, d), mask (B; n) uint8 or data == NULL, init (B; c, d) read only when     \
       use_init, iters (B) int64, seed (B) uint64  ->  centroids (B; c, d) unit rows */   \
    int ra_spherical_kmeans_##SUF(ptrdiff_t B, int n, int d, int c, RaBMat x, RaBVec mask, \
                                  RaBMat init, int use_init, RaBVec iters, RaBVec seed,   \
                                  RaBMat centroids);                                      \
    /* x (B; n, d), centroids (B; c, d)  ->  labels (B; n): argmax, ties to lowest;      \
       optionally (data != NULL) scores (B; n, c) = x·μᵀ and best (B; n) = max score */   \
    int ra_assign_clusters_##SUF(ptrdiff_t B, int n, int d, int c, RaBMat x,              \
                                 RaBMat centroids, RaBVec labels, RaBMat scores,          \
                                 RaBVec best);                                            \
    /* centroids (B; c, d), x (B; n, d), labels (B; n), mask (B; n) uint8 or NULL,        \
       decay (B)  ->  out (B; c, d)  (out may alias centroids) */                         \
    int ra_update_centroids_##SUF(ptrdiff_t B, int n, int d, int c, RaBMat centroids,     \
                                  RaBMat x, RaBVec labels, RaBVec mask, RaBVec decay,     \
                                  RaBMat out);                                            \
    /* x (B; n, d), centroids (B; c, d), labels (B; n), mask (B; n) uint8 or NULL          \
       ->  loss (B): mean ‖x_i − μ_label‖² over labelled unmasked rows */                  \
    int ra_commitment_loss_##SUF(ptrdiff_t B, int n, int d, int c, RaBMat x,              \
                                 RaBMat centroids, RaBVec labels, RaBVec mask, RaBVec loss);\
    /* scores (B; n, c)  ->  idx (B; c, w): top-w rows per cluster, by position */        \
    int ra_top_members_##SUF(ptrdiff_t B, int n, int c, int w, RaBMat scores, RaBMat idx); \
    /* x (B; n, d), centroids (B; c, d)  ->  labels, best (B; n) as ra_assign_clusters     \
       and idx (B; c, w) as ra_top_members on x·μᵀ, without storing the scores */        \
    int ra_assign_top_##SUF(ptrdiff_t B, int n, int d, int c, int w, RaBMat x,            \
                            RaBMat centroids, RaBVec labels, RaBVec best, RaBMat idx);    \
    /* x (B; n, d), planes (B; bits, d + 1)  ->  codes (B; n), bits <= 64 */               \
    int ra_lsh_hash_##SUF(ptrdiff_t B, int n, int d, int bits, RaBMat x, RaBMat planes,   \
                          RaBVec codes);                                                  \
    /* x (B; n, d) -> xhat = x / |x| row by row (a row whose norm is not > 0 is divided  \
       by 1), norm (B; n) = |x|, sq (B; n) = |xhat|² */                                   \
    int ra_normalize_rows_##SUF(ptrdiff_t B, int n, int d, RaBMat x, RaBMat xhat,         \
                                RaBVec norm, RaBVec sq);

RA_CLUSTERING_DECLS(float, f32)
RA_CLUSTERING_DECLS(double, f64)

/* labels (B; n)  ->  members (B; c, s): rows of each cluster by position, −1 padded */
int ra_members_from_labels(ptrdiff_t B, int n, int c, int s, RaBVec labels, RaBMat members);
/* codes (B; n), mask (B; n) uint8 or NULL, iters (B) int64, seed (B) uint64
   ->  labels (B; n) (−1 for masked rows), centroids (B; c) codes */
int ra_hamming_kmeans(ptrdiff_t B, int n, int c, RaBVec codes, RaBVec mask, RaBVec iters,
                      RaBVec seed, RaBVec labels, RaBVec centroids);

/* ------------------------------------------------------------------ engine test hook */
/* masked_check.c: dense attention under an explicit boolean mask (n, m) through the
 * engine's visibility bitmap, forward and backward, logits q·k.  Tests only. */
#define RA_MASKED_CHECK_DECLS(T, SUF)                                                     \
    int ra_engine_masked_##SUF(int n, int m, int d, int e, RaMat q, RaMat k, RaMat v,      \
                               RaMat mask, RaMat dout, RaMat out, RaVec lse, RaMat dq,     \
                               RaMat dk, RaMat dv);

RA_MASKED_CHECK_DECLS(float, f32)
RA_MASKED_CHECK_DECLS(double, f64)

#endif /* RA_METHODS_H */
