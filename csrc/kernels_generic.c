/* kernels_generic.c — the tile kernels compiled for the baseline instruction set (128-bit vectors):
 * baseline x86-64 (SSE2), or whatever the compiler targets by default elsewhere. */

#define VEC_BYTES 16
#define GEMM_MR 4
#if defined(__x86_64__) || defined(__i386__)
#define RA_POPCOUNT ra_popcount64   /* baseline x86-64 has no popcnt instruction: SWAR */
#define RA_POPCOUNT32 ra_popcount64
#else
#define RA_POPCOUNT __builtin_popcountll   /* portable builtin (AArch64: CNT) */
#define RA_POPCOUNT32 __builtin_popcount
#endif
#define GEMM_NV 2
#define ISA generic
#include "kernels_isa.h"
