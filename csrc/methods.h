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

/* ------------------------------------------------------------------ combiner attention */
/* plan (B) int64: 0 fixed, 1 axial, 2 logsparse, 3 mixture; block (B) int64 in [1, n]
 * (grid columns; ignored by logsparse); causal (B) uint8; scale (B).  RA_ERR_VALUE for
 * an invalid plan or block. */
#define RA_COMBINER_DECLS(T, SUF)                                                         \
    /* q, k (B; n, d), v (B; n, e)  ->  out (B; n, e) */                                  \
    int ra_combiner_forward_##SUF(ptrdiff_t B, int n, int d, int e, RaBMat q, RaBMat k,    \
                                  RaBMat v, RaBVec plan, RaBVec block, RaBVec causal,      \
                                  RaBVec scale, RaBMat out);                               \
    /* dout (B; n, e), q, k, v  ->  dq, dk (B; n, d), dv (B; n, e)  (written, not        \
       accumulated; the forward is recomputed) */                                         \
    int ra_combiner_backward_##SUF(ptrdiff_t B, int n, int d, int e, RaBMat dout,         \
                                   RaBMat q, RaBMat k, RaBMat v, RaBVec plan,             \
                                   RaBVec block, RaBVec causal, RaBVec scale, RaBMat dq,  \
                                   RaBMat dk, RaBMat dv);

RA_COMBINER_DECLS(float, f32)
RA_COMBINER_DECLS(double, f64)

#endif /* RA_METHODS_H */
