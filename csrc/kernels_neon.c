/* kernels_neon.c — the tile kernels compiled for AArch64 Advanced SIMD (NEON: 128-bit
 * vectors, 32 registers, fused multiply-add), from the same kernel source as the x86
 * tables.  NEON is part of every AArch64 CPU, so no target pragma is needed; what differs
 * from the generic table is a taller gemm micro-tile (more registers) and the hardware
 * popcount (CNT) in the Hamming kernels.  Empty on other architectures. */
#if defined(__aarch64__)

#define VEC_BYTES 16
#define GEMM_MR 8
#define RA_POPCOUNT __builtin_popcountll
#define RA_POPCOUNT32 __builtin_popcount
#define RA_HAMMING_BUILTIN 1
#define GEMM_NV 2
#define ISA neon
#include "kernels_isa.h"

#endif
