/* typed.h — compile a typed body header once for float and once for double.
 *
 *     #define RA_TYPED_BODY "dense_body.h"
 *     #include "typed.h"
 *
 * The body sees T (float / double), IT (int32_t / int64_t, an integer of T's width),
 * KT (the kernel table type), KSEL (the f32 / f64 member of RaKernels) and
 * FN(name) = name##_f32 / name##_f64.  No include guard: one use per body. */
#define T float
#define IT int32_t
#define KT RaKernelsF32
#define KSEL f32
#define FN(name) name##_f32
#include RA_TYPED_BODY
#undef T
#undef IT
#undef KT
#undef KSEL
#undef FN

#define T double
#define IT int64_t
#define KT RaKernelsF64
#define KSEL f64
#define FN(name) name##_f64
#include RA_TYPED_BODY
#undef T
#undef IT
#undef KT
#undef KSEL
#undef FN
#undef RA_TYPED_BODY
