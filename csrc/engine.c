/* engine.c — instantiate the tile engine for float32 and float64. */
#include "engine.h"

#define T float
#define KT RaKernelsF32
#define KSEL f32
#define FN(name) name##_f32
#include "engine_body.h"
#undef T
#undef KT
#undef KSEL
#undef FN

#define T double
#define KT RaKernelsF64
#define KSEL f64
#define FN(name) name##_f64
#include "engine_body.h"
