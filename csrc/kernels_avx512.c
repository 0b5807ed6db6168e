/* kernels_avx512.c — the tile kernels compiled for AVX-512 (512-bit vectors, 32 registers). */
/* x86 only: other architectures build kernels_generic.c (and kernels_neon.c) alone. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#include "kernels_target.h"
RA_TARGET_BEGIN("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,popcnt")

#define VEC_BYTES 64
#define GEMM_MR 6
#define RA_POPCOUNT __builtin_popcountll   /* the popcnt instruction (every AVX2 CPU has it) */
#define RA_POPCOUNT32 __builtin_popcount
#define GEMM_NV 4
#define ISA avx512
#include "kernels_isa.h"
RA_TARGET_END

/* Ice Lake, Zen 4 and later also count bits eight lanes at a time (VPOPCNTQ) and shift
   two words into one (VPSHLDD, VBMI2): the same table with the Hamming kernels compiled
   for that; kernels.c picks it when the CPU has both. */
RA_TARGET_BEGIN("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,popcnt,avx512vpopcntdq,avx512vbmi2")
#define RA_HAMMING_VPOPCNT 1
#define RA_HAMMING_VBMI2 1
#define RA_TYPED_SUFFIX avx512vp
#define RA_TYPED_BODY "kernels_hamming.h"
#define RA_TYPED_WORDS
#include "typed.h"
#undef RA_TYPED_SUFFIX
#undef RA_HAMMING_VPOPCNT
#undef RA_HAMMING_VBMI2
RA_TARGET_END
/* the word-wise Lloyd assign first: with VPOPCNTQ it beats the bit planes at every width
   (one iteration at n = 4096, H = 8, C = 100: 0.182-0.222 ms over 8-63 bits, the planes
   0.190-0.332) */
RA_KERNEL_TABLE(ra_kernels_avx512vp, "avx512-vpopcnt", avx512vp, 1);
#endif
