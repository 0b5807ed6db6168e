/* masked_check.c — a test hook for the engine's explicit visibility bitmap (engine.h,
 * RaKTile.vis): dense attention under an arbitrary boolean mask, forward and backward,
 * single-threaded, straight on the engine.  Behind the private gufunc _engine_masked,
 * compared with a NumPy reference in tests/test_combiner.py. */
#include "methods.h"

#define RA_TYPED_BODY "masked_check_body.h"
#include "typed.h"
