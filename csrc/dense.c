/* dense.c — dense softmax attention (causal or not, key padding mask) on the tile engine. */
#include "methods.h"

/* Split of the backward's key blocks into groups, one unit of parallel work each.  The
 * count depends only on the problem shape, never on the thread count, so results are
 * bit-identical for any number of threads. */
#define RA_TARGET_UNITS 8

/* From this many problems per thread on, each thread takes whole problems, packing one
 * at a time into its own scratch (which then stays in cache), instead of every problem
 * being packed up front: B·n = 512·128 attends 2× faster that way. */
#define RA_DENSE_PER_PROBLEM 4

#define RA_TYPED_BODY "dense_body.h"
#include "typed.h"
