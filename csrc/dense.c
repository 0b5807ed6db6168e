/* dense.c — dense softmax attention (causal or not, key padding mask) on the tile engine. */
#include "methods.h"

/* Split of the backward's key blocks into groups, one unit of parallel work each.  The
 * count depends only on the problem shape, never on the thread count, so results are
 * bit-identical for any number of threads. */
#define RA_TARGET_UNITS 8

#define RA_TYPED_BODY "dense_body.h"
#include "typed.h"
