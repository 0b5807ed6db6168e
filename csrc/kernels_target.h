/* kernels_target.h — compile the functions that follow for an instruction set.
 *
 *   RA_TARGET_BEGIN("avx2,fma")  ...functions...  RA_TARGET_END
 *
 * GCC takes `#pragma GCC target` (in force to the end of the file; RA_TARGET_END does
 * nothing); clang ignores that pragma and takes `#pragma clang attribute`, which applies a
 * target attribute to every function until the matching pop. */
#ifndef RA_KERNELS_TARGET_H
#define RA_KERNELS_TARGET_H

#define RA_PRAGMA_(x) _Pragma(#x)
#if defined(__clang__)
#define RA_TARGET_BEGIN(isa) \
    RA_PRAGMA_(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define RA_TARGET_END _Pragma("clang attribute pop")
#else
#define RA_TARGET_BEGIN(isa) RA_PRAGMA_(GCC target(isa))
#define RA_TARGET_END
#endif

#endif
