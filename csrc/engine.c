/* engine.c — instantiate the tile engine and its row movement for float32 and float64. */
#include "engine.h"

#define RA_TYPED_BODY "engine_body.h"
#include "typed.h"

#define RA_TYPED_BODY "rows_body.h"
#include "typed.h"
