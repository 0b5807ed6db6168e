/* kernels.c — pick the SIMD kernel table for the running CPU. */
#include "kernels.h"

static const RaKernels *ra_selected = NULL;

#if defined(__x86_64__) || defined(__i386__)
static int ra_cpu_has_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("popcnt");
}

static int ra_cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("popcnt");
}
#endif

const RaKernels *ra_kernels(void)
{
    if (ra_selected) return ra_selected;
    const char *force = getenv("RA_SIMD");
    const RaKernels *k = &ra_kernels_generic;
#if defined(__x86_64__) || defined(__i386__)
    const int lower = force && (strcmp(force, "avx2") == 0 || strcmp(force, "generic") == 0);
    if (ra_cpu_has_avx512() && !lower)
        /* RA_SIMD=avx512 keeps the scalar-popcnt Hamming kernels of pre-Ice Lake CPUs */
        k = __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512vbmi2") &&
            !(force && strcmp(force, "avx512") == 0)
            ? &ra_kernels_avx512vp : &ra_kernels_avx512;
    else if (ra_cpu_has_avx2() && !(force && strcmp(force, "generic") == 0))
        k = &ra_kernels_avx2;
#elif defined(__aarch64__)
    if (!(force && strcmp(force, "generic") == 0)) k = &ra_kernels_neon;   /* every AArch64 CPU */
#else
    (void)force;
#endif
    ra_selected = k;
    return k;
}
