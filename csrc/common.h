/* common.h — shared helpers for every kernel: threads, aligned scratch, strided views.
 *
 * Nothing here touches Python.  Kernels report failure by returning a RA_ERR_* code;
 * the gufunc adapters in module.c turn codes into Python exceptions.
 */
#ifndef RA_COMMON_H
#define RA_COMMON_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <fenv.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------ error codes */
enum {
    RA_OK = 0,
    RA_ERR_NOMEM = 1,   /* scratch allocation failed -> MemoryError */
    RA_ERR_INDEX = 2,   /* index out of range or repeated -> ValueError */
    RA_ERR_VALUE = 3,   /* other invalid argument -> ValueError */
};

/* ------------------------------------------------------------------ threads */
/* Number of threads every parallel region uses (0 = OpenMP default). */
extern int ra_requested_threads;
/* GNU libgomp cannot start a thread team in a child forked after the parent ran one (the
 * child waits forever on the parent's pool).  ra_omp_started is set before the first
 * parallel region; a fork child handler (module.c) then sets ra_omp_broken, and every
 * region of that child runs on one thread, which needs no pool. */
extern int ra_omp_started, ra_omp_broken;

static inline int ra_num_threads(void)
{
#ifdef _OPENMP
    if (__atomic_load_n(&ra_omp_broken, __ATOMIC_RELAXED)) return 1;
    if (!__atomic_load_n(&ra_omp_started, __ATOMIC_RELAXED))
        __atomic_store_n(&ra_omp_started, 1, __ATOMIC_RELAXED);
    return ra_requested_threads > 0 ? ra_requested_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

/* Which of the floating-point `flags` the OpenMP workers of a team of `threads` have
 * raised; cleared there.  A call's flags live on the threads that raised them, and NumPy
 * reads the calling thread's only: module.c raises the workers' on it after every call
 * (so warnings do not depend on the thread count), and a kernel that hides the flags its
 * comparisons raise clears its workers' before that (lifting the flags its earlier steps
 * raised there to the calling thread first).  The pool's threads serve every
 * region in order, so a team of the call's size meets every worker it used. */
static inline int ra_worker_flags(int threads, int flags)
{
    int raised = 0;
#ifdef _OPENMP
    if (threads <= 1) return 0;
    #pragma omp parallel num_threads(threads) reduction(| : raised)
    if (omp_get_thread_num() != 0) {
        raised |= fetestexcept(flags);
        feclearexcept(flags);
    }
#else
    (void)threads; (void)flags;
#endif
    return raised;
}

/* The workers' `flags` (ra_worker_flags) raised on the calling thread. */
static inline void ra_lift_worker_flags(int threads, int flags)
{
    const int raised = ra_worker_flags(threads, flags);
    if (raised) feraiseexcept(raised);
}

/* for (int k = 0; k < count; k++) BODY on nt threads with the given OpenMP clauses, or
 * as a plain loop in this thread when there is one thread or one iteration: an OpenMP
 * region costs ~0.3 µs even on one thread and ~0.6 µs nested in another region
 * (libgomp 12, measured), which loops called thousands of times per call — the
 * k-means++ steps of one problem — cannot afford.  The iterations, and so the results,
 * are the same either way. */
#define RA_PRAGMA_(x) _Pragma(#x)
#define RA_PRAGMA(x) RA_PRAGMA_(x)
#define RA_PARALLEL_FOR(nt, k, count, clauses, ...)                                      \
    do {                                                                                 \
        const int ra_nt_ = (nt), ra_count_ = (count);                                    \
        if (ra_nt_ > 1 && ra_count_ > 1) {                                               \
            RA_PRAGMA(omp parallel for num_threads(ra_nt_) clauses)                      \
            for (int k = 0; k < ra_count_; k++) { __VA_ARGS__ }                          \
        } else {                                                                         \
            for (int k = 0; k < ra_count_; k++) { __VA_ARGS__ }                          \
        }                                                                                \
    } while (0)

/* run(ctx, u) for every unit u < count on nt threads, the units handed out one at a time
 * from a shared counter: a thread claims its next unit before it runs the current one and
 * calls fetch(ctx, next) meanwhile (to hint the rows that unit will read, say).  Which
 * thread runs a unit varies, so run's results must not depend on it. */
typedef void (*RaUnitFn)(const void *ctx, ptrdiff_t unit);
static inline void ra_lookahead_for(int nt, ptrdiff_t count, RaUnitFn fetch, RaUnitFn run,
                                    const void *ctx)
{
    ptrdiff_t next_unit = 0;
    #pragma omp parallel num_threads(nt)
    {
        ptrdiff_t u, after;
        #pragma omp atomic capture
        u = next_unit++;
        while (u < count) {
            #pragma omp atomic capture
            after = next_unit++;
            if (after < count) fetch(ctx, after);
            run(ctx, u);
            u = after;
        }
    }
}

static inline int ra_thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ bits */
/* Bits set in x.  Branch-free SWAR arithmetic: the baseline x86-64 target has no popcnt
 * instruction, and __builtin_popcountll there is a call into libgcc per word. */
static inline int ra_popcount64(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (int)((x * 0x0101010101010101ULL) >> 56);
}

/* ------------------------------------------------------------------ attention dropout */
/* The dropout decision of pair (query position i, key position j) in the stream `key`
 * (one per problem, see ra_dropout_key): the SplitMix64 output for the counter
 * (i << 32 | j), i.e. the finaliser of key + (i·2³² + j)·γ.  Its top 24 bits, compared
 * with a threshold of round(p·2²⁴), drop the pair (below) or keep it.  Counter-based:
 * the same for any tile order or thread count, regenerated by the backward, never stored.
 * routing_attention/reference.py computes the same bits with NumPy. */
#define RA_GOLDEN 0x9E3779B97F4A7C15ULL
/* 1 if pos[j] = pos[0] + j >= 0 for j < count (count >= 1): a run of consecutive keys. */
static inline int ra_positions_run(const int64_t *pos, int count)
{
    int run = pos[0] >= 0;
    for (int j = 1; j < count; j++) run &= pos[j] == pos[0] + j;
    return run;
}
static inline uint64_t ra_splitmix_final(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static inline uint32_t ra_pair_bits(uint64_t key, int64_t i, int64_t j)
{
    const uint64_t counter = ((uint64_t)i << 32) + (uint64_t)j;
    return (uint32_t)(ra_splitmix_final(key + counter * RA_GOLDEN) >> 40);
}

/* ------------------------------------------------------------------ scratch */
#define RA_ALIGN 64

/* Round a byte count up to a whole number of cache lines (SIZE_MAX stays SIZE_MAX). */
static inline size_t ra_round_up(size_t bytes)
{
    if (bytes > SIZE_MAX - (RA_ALIGN - 1)) return SIZE_MAX;
    return (bytes + RA_ALIGN - 1) / RA_ALIGN * RA_ALIGN;
}

/* Overflow-checked product of non-negative sizes; returns SIZE_MAX on overflow. */
static inline size_t ra_mul(size_t a, size_t b)
{
    if (a != 0 && b > SIZE_MAX / a) return SIZE_MAX;
    return a * b;
}

static inline size_t ra_add(size_t a, size_t b)
{
    return (a > SIZE_MAX - b) ? SIZE_MAX : a + b;
}

/* Aligned allocation; NULL on failure or on an impossible (overflowed) size. */
static inline void *ra_alloc(size_t bytes)
{
    if (bytes == SIZE_MAX) return NULL;
    void *p = NULL;
    if (posix_memalign(&p, RA_ALIGN, ra_round_up(bytes ? bytes : 1)) != 0) return NULL;
    return p;
}

static inline void ra_free(void *p) { free(p); }

/* A batch of problems in two schedules.  run(ctx, b0, count, nt, packs, scratch) does
 * problems [b0, b0 + count) on nt threads in packs (count · per_problem bytes) and
 * scratch (nt · per_thread).  Many problems (B >= whole_from · threads; whole_from 0:
 * never): each thread takes one problem at a time, in its own packs and scratch slice
 * (run's regions then run on one thread, whose ra_thread_id() is 0: every ra_thread_id()
 * in run must be taken inside one of its own regions); fewer: one run over the whole
 * batch.  run's results must not depend on the schedule.  The status is the lowest
 * failing problem's.  (Dense attention has the same rule in its own loops.) */
typedef int (*RaBatchFn)(const void *ctx, ptrdiff_t b0, ptrdiff_t count, int nt, char *packs,
                         char *scratch);
static inline int ra_run_problems(ptrdiff_t B, int whole_from, size_t per_problem,
                                  size_t per_thread, RaBatchFn run, const void *ctx)
{
    const int nt = ra_num_threads();
    const int whole = whole_from > 0 && B >= (ptrdiff_t)whole_from * nt;
    char *packs = ra_alloc(ra_mul(per_problem, whole ? (size_t)nt : (size_t)B));
    char *scratch = ra_alloc(ra_mul(per_thread, (size_t)nt));
    int status = RA_ERR_NOMEM;
    if (packs && scratch && !whole) {
        status = run(ctx, 0, B, nt, packs, scratch);
    } else if (packs && scratch) {
        ptrdiff_t failed = B;
        status = RA_OK;
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (ptrdiff_t b = 0; b < B; b++) {
            const size_t id = (size_t)ra_thread_id();
            const int st = run(ctx, b, 1, 1, packs + id * per_problem, scratch + id * per_thread);
            if (st != RA_OK) {
                #pragma omp critical(ra_run_problems_status)
                if (b < failed) { failed = b; status = st; }
            }
        }
    }
    ra_free(packs);
    ra_free(scratch);
    return status;
}

/* The one way scratch is laid out.  A planner writes one layout function that takes its
 * pieces from an arena, and runs it twice: over an arena with base NULL it only measures
 * (`used` = the bytes needed, SIZE_MAX on overflow; the pieces come back NULL), then over
 * a buffer of that many bytes it carves the same pieces, each cache-line aligned. */
typedef struct { char *base; size_t used; } RaArena;

static inline void *ra_take(RaArena *a, size_t count, size_t size)
{
    void *r = a->base && a->used != SIZE_MAX ? a->base + a->used : NULL;
    a->used = ra_add(a->used, ra_round_up(ra_mul(count, size)));
    return r;
}

#define RA_TAKE(a, type, count) ((type *)ra_take((a), (count), sizeof(type)))

/* Leading dimension (in elements of `size` bytes) for a packed tile of `cols` columns whose
 * rows the gemm reads one after another down a panel (kᵀ, vᵀ): whole cache lines, an odd
 * number of them, so consecutive rows fall in different L1 sets.  A power-of-two stride
 * (kᵀ of 4096 keys: 16 KB) puts a panel's rows in one or a few sets of an 8-way L1, and
 * the panel is fetched again from L2 for every micro-tile (dense forward on a Zen 3: 12 %). */
static inline int ra_spread_ld(int cols, size_t size)
{
    const int64_t per_line = (int64_t)(64 / size);
    int64_t lines = ((int64_t)cols + per_line - 1) / per_line;
    lines += lines % 2 == 0;
    return lines * per_line <= INT_MAX ? (int)(lines * per_line) : cols;   /* no int overflow */
}

/* Elements of a (rows, cols) tile of `size`-byte elements stored with ra_spread_ld(cols). */
static inline size_t ra_spread_size(int rows, int cols, size_t size)
{
    return ra_mul((size_t)rows, (size_t)ra_spread_ld(cols, size));
}

/* ------------------------------------------------------------------ hints */
/* Cache lines to hint while a kernel computes: the gemm issues some after each of its
 * micro-tiles, in proportion to the micro-tile's multiply-adds, so the next unit's rows
 * are requested steadily over the current unit's products rather than in one burst
 * before them, which the memory system partly drops.  Only hints. */
typedef struct {
    /* runs of consecutive lines: the first line's address, its low 6 bits the run's
       length less one (a run per row, not a pointer per line: the queue of a 128-row
       cluster is then ~7 KB, not ~36 KB of the L1 the products use) */
    uintptr_t *run;
    int next, count;      /* runs [next, count) are still to hint */
    float per_fma;        /* runs to hint per multiply-add of the products (ra_hints_pace) */
    float owed;           /* the fraction of a run owed so far */
} RaHints;

/* Queue the `lines` lines from the one holding address p (room for cap runs in all). */
static inline void ra_hints_add_lines(RaHints *h, int cap, const char *p, uintptr_t lines)
{
    uintptr_t first = (uintptr_t)p & ~(uintptr_t)63;
    int count = h->count;
    for (; lines > 0 && count < cap; count++) {
        const uintptr_t take = lines < 64 ? lines : 64;
        h->run[count] = first | (take - 1);
        first += 64 * take;
        lines -= take;
    }
    h->count = count;
}

/* Hint up to n more runs of h (NULL: none). */
static inline void ra_hints_issue(RaHints *h, int n)
{
    if (!h) return;
    const int stop = h->count - h->next > n ? h->next + n : h->count;
    for (int i = h->next; i < stop; i++) {
        const char *line = (const char *)(h->run[i] & ~(uintptr_t)63);
        for (int l = (int)(h->run[i] & 63); l >= 0; l--, line += 64)
            __builtin_prefetch(line, 0, 2);
    }
    h->next = stop;
}

/* Spread the runs queued in h over the next `fmas` multiply-adds of the products. */
static inline void ra_hints_pace(RaHints *h, double fmas)
{
    if (!h) return;
    h->per_fma = fmas > 0 ? (float)((h->count - h->next) / fmas) : 0;
    h->owed = 0;
}

/* After `fmas` multiply-adds: hint the runs they are owed (NULL: none). */
static inline void ra_hints_after(RaHints *h, double fmas)
{
    if (!h) return;
    const float owed = h->owed + h->per_fma * (float)fmas;
    const int n = owed < (float)INT_MAX ? (int)owed : INT_MAX;
    h->owed = owed - (float)n;
    ra_hints_issue(h, n);
}

/* ------------------------------------------------------------------ strided views */
/* A 2-D operand as NumPy hands it over: base pointer and byte strides. */
typedef struct {
    char *data;
    ptrdiff_t s0, s1;   /* byte strides of the two core axes */
} RaMat;

/* A 1-D operand (lse, masks, labels). */
typedef struct {
    char *data;
    ptrdiff_t s0;
} RaVec;

/* Batched operands: one more (outer) stride sb over the gufunc's loop dimension. */
typedef struct {
    char *data;
    ptrdiff_t sb, s0, s1;
} RaBMat;

typedef struct {
    char *data;
    ptrdiff_t sb, s0;
} RaBVec;

static inline RaMat ra_mat_at(RaBMat m, ptrdiff_t b) { RaMat r = {m.data + b * m.sb, m.s0, m.s1}; return r; }
/* A NULL operand (an optional input left out) stays NULL. */
static inline RaVec ra_vec_at(RaBVec v, ptrdiff_t b) { RaVec r = {v.data ? v.data + b * v.sb : NULL, v.s0}; return r; }

/* The batch from problem b on (NULL stays NULL). */
static inline RaBMat ra_bmat_from(RaBMat m, ptrdiff_t b)
{
    RaBMat r = {m.data ? m.data + b * m.sb : NULL, m.sb, m.s0, m.s1};
    return r;
}
static inline RaBVec ra_bvec_from(RaBVec v, ptrdiff_t b)
{
    RaBVec r = {v.data ? v.data + b * v.sb : NULL, v.sb, v.s0};
    return r;
}

#define RA_MAT_AT(T, M, i, j) (*(T *)((M).data + (ptrdiff_t)(i) * (M).s0 + (ptrdiff_t)(j) * (M).s1))
#define RA_VEC_AT(T, V, i) (*(T *)((V).data + (ptrdiff_t)(i) * (V).s0))

#endif /* RA_COMMON_H */
