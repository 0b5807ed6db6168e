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
       scale (B), causal (B) uint8  ->  out (B; n, e), lse (B; n) */                      \
    int ra_attention_forward_##SUF(ptrdiff_t B, int n, int m, int d, int e, RaBMat q,     \
                                   RaBMat k, RaBMat v, RaBVec key_mask, RaBVec scale,     \
                                   RaBVec causal, RaBMat out, RaBVec lse);                \
    /* dout (B; n, e), q, k, v, key_mask, out (B; n, e), lse (B; n), scale, causal        \
       ->  dq (B; n, d), dk (B; m, d), dv (B; m, e)   (written, not accumulated) */       \
    int ra_attention_backward_##SUF(ptrdiff_t B, int n, int m, int d, int e, RaBMat dout, \
                                    RaBMat q, RaBMat k, RaBMat v, RaBVec key_mask,        \
                                    RaBMat out, RaBVec lse, RaBVec scale, RaBVec causal,  \
                                    RaBMat dq, RaBMat dk, RaBMat dv);

RA_DENSE_DECLS(float, f32)
RA_DENSE_DECLS(double, f64)

/* ------------------------------------------------------------------ clustered attention */
#define RA_CLUSTERED_DECLS(T, SUF)                                                        \
    /* q (B; n, d), k (B; m, d), v (B; m, e), labels (B; n) int64 in [-1, C),            \
       key_mask (B; m) uint8 or data == NULL, scale (B); C clusters; topk = 0 for the    \
       plain form, >= 1 for the improved form  ->  out (B; n, e).  RA_ERR_INDEX for a    \
       label out of range. */                                                           \
    int ra_clustered_forward_##SUF(ptrdiff_t B, int n, int m, int d, int e, int C,        \
                                   int topk, RaBMat q, RaBMat k, RaBMat v, RaBVec labels, \
                                   RaBVec key_mask, RaBVec scale, RaBMat out);            \
    /* dout (B; n, e) and the forward's inputs  ->  dq (B; n, d), dk (B; m, d),           \
       dv (B; m, e) (written, not accumulated); m̂ held constant */                       \
    int ra_clustered_backward_##SUF(ptrdiff_t B, int n, int m, int d, int e, int C,       \
                                    int topk, RaBMat dout, RaBMat q, RaBMat k, RaBMat v,  \
                                    RaBVec labels, RaBVec key_mask, RaBVec scale,         \
                                    RaBMat dq, RaBMat dk, RaBMat dv);

RA_CLUSTERED_DECLS(float, f32)
RA_CLUSTERED_DECLS(double, f64)

#endif /* RA_METHODS_H */
