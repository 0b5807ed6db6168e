/* kernels_avx2.c — the tile kernels compiled for AVX2 + FMA (256-bit vectors, 16 registers). */
/* x86 only: other architectures build kernels_generic.c (and kernels_neon.c) alone. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include "kernels_target.h"
RA_TARGET_BEGIN("avx2,fma,popcnt")

#define VEC_BYTES 32
#define GEMM_MR 6
#define RA_POPCOUNT __builtin_popcountll   /* the popcnt instruction (every AVX2 CPU has it) */
#define RA_POPCOUNT32 __builtin_popcount
#define GEMM_NV 2
#define ISA avx2
#include "kernels_isa.h"
RA_TARGET_END
#endif
