/* kernels_avx512.c — the tile kernels compiled for AVX-512 (512-bit vectors, 32 registers). */
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,popcnt")

#include "kernels.h"

#define VEC_BYTES 64
#define GEMM_MR 6
#define RA_POPCOUNT __builtin_popcountll   /* the popcnt instruction (every AVX2 CPU has it) */
#define GEMM_NV 4

#define T float
#define UT uint32_t
#define RA_IS_F32 1
#define FN(name) name##_f32_avx512
#include "kernels_body.h"
#undef T
#undef UT
#undef RA_IS_F32
#undef FN

#define T double
#define UT uint64_t
#define RA_IS_F32 0
#define FN(name) name##_f64_avx512
#include "kernels_body.h"

const RaKernels ra_kernels_avx512 = {
    "avx512",
    {.gemm = gemm_f32_avx512, .gemm_tn = gemm_tn_f32_avx512, .softmax_step = softmax_step_f32_avx512,
     .exp_shift = exp_shift_f32_avx512, .mask_tile = mask_tile_f32_avx512, .gather_t = gather_t_f32_avx512,
     .softmax_grad = softmax_grad_f32_avx512, .argmax_rows = argmax_rows_f32_avx512, .top_sample = top_sample_f32_avx512,
     .top_admit = top_admit_f32_avx512},
    {.gemm = gemm_f64_avx512, .gemm_tn = gemm_tn_f64_avx512, .softmax_step = softmax_step_f64_avx512,
     .exp_shift = exp_shift_f64_avx512, .mask_tile = mask_tile_f64_avx512, .gather_t = gather_t_f64_avx512,
     .softmax_grad = softmax_grad_f64_avx512, .argmax_rows = argmax_rows_f64_avx512, .top_sample = top_sample_f64_avx512,
     .top_admit = top_admit_f64_avx512},
    fma_probe_f32_avx512,
    hamming_assign_f32_avx512,
    hamming_potential_f32_avx512,
    hamming_min_f32_avx512,
};
