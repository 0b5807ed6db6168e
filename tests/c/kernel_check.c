/* kernel_check.c — run every entry of a SIMD kernel table, and the tile engine's forward
 * and backward on top of it, on fixed pseudo-random inputs; dump every output.
 *
 *   kernel_check TABLE OUT.bin      TABLE: generic, avx2, avx512, avx512-vpopcnt, neon
 *                                   (exit status 3 if this build/CPU has no such table)
 *
 * Exit status 1 when a check against a plain computation in this file fails.
 * The dump is a sequence of records (name[32], kind 'f' float32 / 'd' float64 / 'i'
 * integer, int64 count, count doubles), read by tools/compare_kernel_dumps.py, which
 * compares a table's dump (e.g. NEON under qemu-aarch64) with the x86 generic table's.
 * Built by tools/cross_aarch64.sh with csrc/kernels*.c and csrc/engine.c, no Python. */
#include <fenv.h>
#include <stdio.h>
#include "engine.h"

static FILE *out_file;

static void dump(const char *name, char kind, int64_t n, const double *x)
{
    char label[32] = {0};
    snprintf(label, sizeof label, "%s", name);   /* at most 31 characters, NUL padded */
    fwrite(label, 1, sizeof(label), out_file);
    fwrite(&kind, 1, 1, out_file);
    fwrite(&n, sizeof(n), 1, out_file);
    fwrite(x, sizeof(double), (size_t)n, out_file);
}

#define DUMP_AS(name, kind, ptr, n)                                                      \
    do {                                                                                 \
        double *d_ = malloc(sizeof(double) * (size_t)((n) > 0 ? (n) : 1));               \
        for (int64_t i_ = 0; i_ < (int64_t)(n); i_++) d_[i_] = (double)(ptr)[i_];        \
        dump(name, kind, (n), d_);                                                       \
        free(d_);                                                                        \
    } while (0)

/* Checks against a plain computation that failed (exit status 1). */
static int self_check_failures;

/* 1 for the x86 vector tables, whose top_offer must raise no FP invalid flag for NaN
 * offers (their compares are the quiet predicates; plain C compares signal). */
static int quiet_offers;

static uint64_t rng_state = 88172645463325252ull;

static uint64_t rng_next(void)   /* xorshift64: the same sequence on every machine */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* uniform in [-1, 1), a multiple of 2^-20 (exact in float32) */
static double rng_unit(void) { return (double)(int64_t)(rng_next() >> 43) / (1 << 20) - 1.0; }

/* The kernels and the engine for float, then double. */
#define T float
#define SUF 32
#include "kernel_check_body.h"
#define T double
#define SUF 64
#include "kernel_check_body.h"

/* Hamming kernels for one word width W. */
#define HAMMING_CHECK(W)                                                                  \
    static void hamming_check##W(const RaHammingKernels *H)                               \
    {                                                                                     \
        enum { N = 203, C = 7 };                                                          \
        uint##W##_t code[N], cent[C];                                                     \
        uint32_t dist[N];                                                                 \
        uint8_t valid[N];                                                                 \
        int64_t lab[N];                                                                   \
        for (int i = 0; i < N; i++) {                                                     \
            code[i] = (uint##W##_t)rng_next();                                            \
            valid[i] = (uint8_t)(i % 11 != 3);                                            \
            lab[i] = i % 3 - 1;                                                           \
            dist[i] = (uint32_t)(i % 40);                                                 \
        }                                                                                 \
        for (int j = 0; j < C; j++) cent[j] = code[j * 5] ^ (uint##W##_t)(1u << j);        \
        const int64_t changed = H->assign(3, N, code, valid, cent, C, lab);               \
        DUMP_AS("hamming" #W ".assign.lab", 'i', lab, N);                                 \
        DUMP_AS("hamming" #W ".assign.changed", 'i', &changed, 1);                        \
        uint64_t centers[C], pot[C];          /* every group size of the kernel */        \
        for (int j = 0; j < C; j++) centers[j] = (uint64_t)cent[(j + 2) % C];             \
        H->potential(1, N - 2, code, dist, centers, C, pot);                              \
        DUMP_AS("hamming" #W ".potential", 'i', pot, C);                                  \
        uint64_t block[(N + RA_HAMMING_BLOCK - 1) / RA_HAMMING_BLOCK];                    \
        const uint64_t total = H->min(0, N - 1, code, (uint64_t)cent[4], dist, block);    \
        DUMP_AS("hamming" #W ".min", 'i', dist, N);                                       \
        DUMP_AS("hamming" #W ".min.blocks", 'i', block, (N - 1 + RA_HAMMING_BLOCK - 1) / RA_HAMMING_BLOCK); \
        DUMP_AS("hamming" #W ".min.total", 'i', &total, 1);                               \
        /* the bit-sliced assign: planes of every bit, each centroid's input planes */     \
        static uint64_t planes[(3 * W + 4) * (N / 8 + 64) / 8] __attribute__((aligned(64))); \
        int32_t inputs[C * RA_SLICE_INPUTS(W)];                                           \
        const int plane_bytes = H->slice(N, code, W, planes);                             \
        for (int j = 0; j < C; j++)                                                       \
            ra_slice_inputs(cent[j], W, plane_bytes, inputs + j * RA_SLICE_INPUTS(W));    \
        for (int i = 0; i < N; i++) lab[i] = i % 3 - 1;                                   \
        const int64_t sliced = H->assign_sliced(0, N, planes, W, inputs, valid, C, lab);  \
        DUMP_AS("hamming" #W ".assign_sliced.lab", 'i', lab, N);                          \
        DUMP_AS("hamming" #W ".assign_sliced.changed", 'i', &sliced, 1);                  \
    }
HAMMING_CHECK(64)
HAMMING_CHECK(32)

static const RaKernels *table_named(const char *name)
{
    if (strcmp(name, "generic") == 0) return &ra_kernels_generic;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                       __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                       __builtin_cpu_supports("avx512bw");
    if (strcmp(name, "avx2") == 0 && avx2) return &ra_kernels_avx2;
    if (strcmp(name, "avx512") == 0 && avx512) return &ra_kernels_avx512;
    if (strcmp(name, "avx512-vpopcnt") == 0 && avx512 &&
        __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512vbmi2"))
        return &ra_kernels_avx512vp;
#endif
#if defined(__aarch64__)
    if (strcmp(name, "neon") == 0) return &ra_kernels_neon;
#endif
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s TABLE OUT.bin\n", argv[0]);
        return 2;
    }
    const RaKernels *K = table_named(argv[1]);
    if (!K) {
        fprintf(stderr, "kernel_check: no table '%s' on this build/CPU\n", argv[1]);
        return 3;
    }
    quiet_offers = strcmp(argv[1], "avx2") == 0 || strncmp(argv[1], "avx512", 6) == 0;
    out_file = fopen(argv[2], "wb");
    if (!out_file) {
        perror(argv[2]);
        return 2;
    }
    float probe_sum = 0;
    const double flops = K->fma_probe(1000, &probe_sum);
    if (!(flops > 0) || probe_sum != probe_sum) {
        fprintf(stderr, "kernel_check: fma_probe returned %g flops, checksum %g\n", flops,
                (double)probe_sum);
        return 1;
    }
    check32(&K->f32);
    check64(&K->f64);
    hamming_check64(&K->hamming64);
    hamming_check32(&K->hamming32);
    fclose(out_file);
    if (self_check_failures) return 1;
    printf("kernel_check: table %s: every entry run, dump in %s\n", K->name, argv[2]);
    return 0;
}
