/* masked_check.c — a test hook for the engine's explicit visibility bitmap (engine.h,
 * RaKTile.vis): dense attention under an arbitrary boolean mask, forward and backward,
 * single-threaded, straight on the engine.  Behind the private gufunc _engine_masked,
 * compared with a NumPy reference in tests/test_combiner.py. */
#include "methods.h"

#define T float
#define KT RaKernelsF32
#define KSEL f32
#define FN(name) name##_f32
#include "masked_check_body.h"
#undef T
#undef KT
#undef KSEL
#undef FN

#define T double
#define KT RaKernelsF64
#define KSEL f64
#define FN(name) name##_f64
#include "masked_check_body.h"
