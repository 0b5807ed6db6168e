/* clustered.c — clustered and improved clustered attention (Vyas, Katharopoulos, Fleuret
 * 2020, "Fast Transformers with Clustered Attention"), docs/design.md (Clustered), on the tile engine.
 *
 * Both forms share one planner; `topk` = 0 selects the plain form:
 *
 *   plan       labels -> member lists (counting sort), centroid q̄_c = mean of members
 *   centroid   a_c = softmax(scale·q̄_c·Kᵀ) over unmasked keys, o_c = a_c·V, lse_c: the
 *              engine on (centroid tile × key group) units, groups merged by the engine's
 *              log-sum-exp merge; the backward is the engine's on the same units
 *   top-k      (improved) T_c = the k = min(topk, unmasked) keys of largest a_c, ties to
 *              the lower key; a_c[j] = exp(scale·q̄_c·k_j − lse_c) from gemm + exp_shift
 *   residual   r_c = o_c − Σ_{j∈T_c} a_c[j] v_j,  m̂_c = Σ_{j∈T_c} a_c[j]
 *   queries    out_i = r_c + m̂_c · softmax_{j∈T_c}(scale·q_i·k_j)·V_T   (plain: out_i = o_c)
 */
#include "methods.h"

/* Work split of the centroid passes over key blocks (a function of the shape only, so
 * results are bit-identical for any thread count). */
#define RA_CL_TARGET_UNITS 8
/* Problems per thread from which each thread takes whole problems (see cl_whole_from). */
#define RA_CL_PER_PROBLEM 4
/* Centroid rows per tile of the centroid passes (the engine takes any row count): with
 * C ≤ 128 clusters every key tile is gathered once per key group. */
#define RA_CL_ROWS 128
/* Keys whose centroid logits go to top_offer together (a multiple of RA_BK). */
#define RA_CL_CHUNK (8 * RA_BK)
/* Stride of a top-k candidate list of capacity k (top_offer's layout). */
#define CL_LIST(k) ((size_t)((k) + RA_OFFER_ALIGN - 1) / RA_OFFER_ALIGN * RA_OFFER_ALIGN)
/* Attention dropout: centroid c's weights a_c[j] draw their decisions as row -1 - c, so
 * no centroid shares a mask with a query (rows >= 0, the improved form's exact part). */
#define CL_CENTROID_ROW(c) (-1 - (int64_t)(c))

#define RA_TYPED_BODY "clustered_body.h"
#include "typed.h"
