/* kernels_isa.h — one instruction set's kernels and table.  Included once by each
 * kernels_<isa>.c after its target pragma and these macros:
 *   ISA          the suffix token (avx512, avx2, generic): names ra_kernels_<ISA>
 *   VEC_BYTES, GEMM_MR, GEMM_NV   see kernels_body.h
 *   RA_POPCOUNT, RA_POPCOUNT32    see kernels_hamming.h
 * and compiles kernels_body.h (per float type) and kernels_hamming.h (per code-word
 * width) through typed.h, every name ending in _<ISA>. */
#include "kernels.h"

#define RA_CAT3_(a, b, c) a##b##c
#define RA_CAT3(a, b, c) RA_CAT3_(a, b, c)
#define RA_STR_(x) #x
#define RA_STR(x) RA_STR_(x)

#define RA_TYPED_SUFFIX ISA
#define RA_TYPED_BODY "kernels_body.h"
#include "typed.h"
#define RA_TYPED_BODY "kernels_hamming.h"
#define RA_TYPED_WORDS
#include "typed.h"
#undef RA_TYPED_SUFFIX

#define RA_TYPED_TABLE(S)                                                                 \
    {.gemm = RA_CAT3(gemm, S, ISA), .gemm_hinting = RA_CAT3(gemm_hinting, S, ISA),        \
     .gemm_tn = RA_CAT3(gemm_tn, S, ISA),                                                 \
     .softmax_step = RA_CAT3(softmax_step, S, ISA), .exp_shift = RA_CAT3(exp_shift, S, ISA), \
     .mask_tile = RA_CAT3(mask_tile, S, ISA), .bias_tile = RA_CAT3(bias_tile, S, ISA),    \
     .dropout_tile = RA_CAT3(dropout_tile, S, ISA), .gather_t = RA_CAT3(gather_t, S, ISA),      \
     .softmax_grad = RA_CAT3(softmax_grad, S, ISA), .argmax_rows = RA_CAT3(argmax_rows, S, ISA), \
     .argmax_cols = RA_CAT3(argmax_cols, S, ISA), \
     .top_sample = RA_CAT3(top_sample, S, ISA), .top_admit = RA_CAT3(top_admit, S, ISA), \
     .top_offer = RA_CAT3(top_offer, S, ISA), .pool_scan = RA_CAT3(pool_scan, S, ISA), \
     .normalize_row = RA_CAT3(normalize_row, S, ISA),                                     \
     .threshold_bits = RA_CAT3(threshold_bits, S, ISA),                                   \
     .seed_potential = RA_CAT3(seed_potential, S, ISA)}

/* The table NAME, called LABEL, with the Hamming kernels of HISA (WORDS_FIRST: see
 * RaHammingKernels.words_first). */
#define RA_KERNEL_TABLE(NAME, LABEL, HISA, WORDS_FIRST)                                   \
    const RaKernels NAME = {                                                              \
        LABEL, RA_TYPED_TABLE(_f32_), RA_TYPED_TABLE(_f64_), RA_CAT3(fma_probe, _f32_, ISA), \
        {RA_CAT3(hamming_assign64, _, HISA), RA_CAT3(hamming_potential64, _, HISA),       \
         RA_CAT3(hamming_min64, _, HISA),                                                 \
         RA_CAT3(hamming_slice64, _, HISA), RA_CAT3(hamming_assign_sliced64, _, HISA),    \
         WORDS_FIRST},                                                                    \
        {RA_CAT3(hamming_assign32, _, HISA), RA_CAT3(hamming_potential32, _, HISA),       \
         RA_CAT3(hamming_min32, _, HISA),                                                 \
         RA_CAT3(hamming_slice32, _, HISA), RA_CAT3(hamming_assign_sliced32, _, HISA),    \
         WORDS_FIRST}}

RA_KERNEL_TABLE(RA_CAT3(ra_kernels, _, ISA), RA_STR(ISA), ISA, 0);
