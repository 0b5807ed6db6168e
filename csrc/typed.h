/* typed.h — the one way typed code is compiled, once per type:
 *
 *     #define RA_TYPED_BODY "dense_body.h"    the body to instantiate
 *     #define RA_TYPED_WORDS                  optional: over code words instead of floats
 *     #define RA_TYPED_SUFFIX avx2            optional: every name also ends in _avx2
 *     #include "typed.h"                      (RA_TYPED_BODY, RA_TYPED_WORDS are undefined
 *                                              after; RA_TYPED_SUFFIX is the includer's)
 *
 * Float bodies see T (float, double), IT / UT (the signed / unsigned integer of T's
 * width), RA_IS_F32, KT (the kernel table type), KSEL (its f32 / f64 member) and
 * FN(name) = name_f32 / name_f64 (then _suffix).  Word bodies see W (uint64_t, uint32_t),
 * WPOP (RA_POPCOUNT / RA_POPCOUNT32 of one word, where the includer defines them), WSEL
 * (the hamming64 / hamming32 member of RaKernels) and FN(name) = name64 / name32 (then
 * _suffix).  csrc/typed_names.txt lists every name made this way, with the file that
 * defines it (tools/typed_names.py writes it; a test keeps it current).
 * No include guard: one use per instantiation. */
#ifndef RA_PASTE
#define RA_PASTE_(a, b) a##b
#define RA_PASTE(a, b) RA_PASTE_(a, b)
#endif
#undef RA_TYPED_NAME
#ifdef RA_TYPED_SUFFIX
#define RA_TYPED_NAME(name, type) RA_PASTE(RA_PASTE(name, type), RA_PASTE(_, RA_TYPED_SUFFIX))
#else
#define RA_TYPED_NAME(name, type) RA_PASTE(name, type)
#endif

#ifdef RA_TYPED_WORDS
#define W uint64_t
#define WPOP RA_POPCOUNT
#define WSEL hamming64
#define FN(name) RA_TYPED_NAME(name, 64)
#include RA_TYPED_BODY
#undef W
#undef WPOP
#undef WSEL
#undef FN

#define W uint32_t
#define WPOP RA_POPCOUNT32
#define WSEL hamming32
#define FN(name) RA_TYPED_NAME(name, 32)
#include RA_TYPED_BODY
#undef W
#undef WPOP
#undef WSEL
#undef FN
#undef RA_TYPED_WORDS

#else
#define T float
#define IT int32_t
#define UT uint32_t
#define RA_IS_F32 1
#define KT RaKernelsF32
#define KSEL f32
#define FN(name) RA_TYPED_NAME(name, _f32)
#include RA_TYPED_BODY
#undef T
#undef IT
#undef UT
#undef RA_IS_F32
#undef KT
#undef KSEL
#undef FN

#define T double
#define IT int64_t
#define UT uint64_t
#define RA_IS_F32 0
#define KT RaKernelsF64
#define KSEL f64
#define FN(name) RA_TYPED_NAME(name, _f64)
#include RA_TYPED_BODY
#undef T
#undef IT
#undef UT
#undef RA_IS_F32
#undef KT
#undef KSEL
#undef FN
#endif
#undef RA_TYPED_BODY
