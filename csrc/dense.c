/* dense.c — dense softmax attention (causal or not, key padding mask) on the tile engine. */
#include "methods.h"

/* Split of the backward's key blocks into groups, one unit of parallel work each.  The
 * count depends only on the problem shape, never on the thread count, so results are
 * bit-identical for any number of threads. */
#define RA_TARGET_UNITS 8

#define T float
#define KT RaKernelsF32
#define KSEL f32
#define FN(name) name##_f32
#include "dense_body.h"
#undef T
#undef KT
#undef KSEL
#undef FN

#define T double
#define KT RaKernelsF64
#define KSEL f64
#define FN(name) name##_f64
#include "dense_body.h"
