/* kernels_generic.c — the tile kernels compiled for the baseline instruction set (128-bit vectors). */
/* baseline x86-64 (SSE2) or whatever the compiler targets by default */

#include "kernels.h"

#define VEC_BYTES 16
#define GEMM_MR 4
#define RA_POPCOUNT ra_popcount64   /* baseline x86-64 has no popcnt instruction: SWAR */
#define GEMM_NV 2

#define T float
#define UT uint32_t
#define RA_IS_F32 1
#define FN(name) name##_f32_generic
#include "kernels_body.h"
#undef T
#undef UT
#undef RA_IS_F32
#undef FN

#define T double
#define UT uint64_t
#define RA_IS_F32 0
#define FN(name) name##_f64_generic
#include "kernels_body.h"

const RaKernels ra_kernels_generic = {
    "generic",
    {.gemm = gemm_f32_generic, .gemm_tn = gemm_tn_f32_generic, .softmax_step = softmax_step_f32_generic,
     .exp_shift = exp_shift_f32_generic, .mask_tile = mask_tile_f32_generic, .gather_t = gather_t_f32_generic,
     .softmax_grad = softmax_grad_f32_generic, .argmax_rows = argmax_rows_f32_generic, .top_sample = top_sample_f32_generic,
     .top_admit = top_admit_f32_generic},
    {.gemm = gemm_f64_generic, .gemm_tn = gemm_tn_f64_generic, .softmax_step = softmax_step_f64_generic,
     .exp_shift = exp_shift_f64_generic, .mask_tile = mask_tile_f64_generic, .gather_t = gather_t_f64_generic,
     .softmax_grad = softmax_grad_f64_generic, .argmax_rows = argmax_rows_f64_generic, .top_sample = top_sample_f64_generic,
     .top_admit = top_admit_f64_generic},
    fma_probe_f32_generic,
    hamming_assign_f32_generic,
    hamming_potential_f32_generic,
    hamming_min_f32_generic,
};
