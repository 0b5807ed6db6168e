/* module.c — the gufunc registration table, the loop adapters, and PyInit.
 *
 * Each adapter unpacks NumPy's (args, dimensions, steps) into named strided views and
 * calls a pure C driver (methods.h).  NumPy releases the GIL around the loops (no
 * object dtypes are involved); the adapters take it back only to raise an error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <pthread.h>

#include <numpy/arrayobject.h>
#include <numpy/ufuncobject.h>

#include "methods.h"
#include "gufuncs_gen.h"

int ra_requested_threads = 0;
int ra_omp_started = 0, ra_omp_broken = 0;

/* In a child forked after the parent used OpenMP, run single-threaded (see common.h). */
static void ra_after_fork_child(void)
{
    if (ra_omp_started) ra_omp_broken = 1;
}

/* ------------------------------------------------------------------ errors */
/* The floating-point flags NumPy reports (errstate: divide, over, under, invalid). */
#define RA_FE_REPORTED (FE_DIVBYZERO | FE_OVERFLOW | FE_UNDERFLOW | FE_INVALID)

/* After a driver ran: its workers' flags raised here, and its status turned into a Python
 * exception (taking the GIL to do so). */
static void ra_raise(int status, const char *where)
{
    ra_lift_worker_flags(ra_num_threads(), RA_FE_REPORTED);
    if (status == RA_OK) return;
    NPY_ALLOW_C_API_DEF
    NPY_ALLOW_C_API
    if (!PyErr_Occurred()) {
        if (status == RA_ERR_NOMEM)
            PyErr_Format(PyExc_MemoryError, "%s: not enough memory for the scratch buffers", where);
        else if (status == RA_ERR_INDEX)
            PyErr_Format(PyExc_ValueError, "%s: index out of range or repeated", where);
        else
            PyErr_Format(PyExc_ValueError, "%s: invalid argument", where);
    }
    NPY_DISABLE_C_API
}

/* Core sizes arrive as npy_intp; the kernels index tiles with int. */
static int ra_dims_fit(const npy_intp *dims, int count, const char *where)
{
    for (int i = 0; i < count; i++) {
        if (dims[i] > INT_MAX / 2) {
            NPY_ALLOW_C_API_DEF
            NPY_ALLOW_C_API
            PyErr_Format(PyExc_ValueError, "%s: a core dimension of %zd exceeds the supported "
                         "maximum %d", where, (Py_ssize_t)dims[i], INT_MAX / 2);
            NPY_DISABLE_C_API
            return 0;
        }
    }
    return 1;
}

/* Operands by name.  Each adapter is instantiated with GF defined as its gufunc's name;
 * gufuncs_gen.h (generated from the operand table in tools/gen_gufuncs.py) gives every
 * operand x of gufunc GF its index GF_x in args and steps, GF_x_core the index in steps of
 * its first core stride, and GF_dim_n the index in dims of core dimension n. */
#define RA_CAT_(a, b) a##_##b
#define RA_CAT(a, b) RA_CAT_(a, b)
#define OPND(x) RA_CAT(GF, x)
#define OPND_CORE(x) RA_CAT(GF, x##_core)
#define ARG(x) args[OPND(x)]
#define STEP(x) steps[OPND(x)]
#define CORE(x) (steps + OPND_CORE(x))
#define DIM(x) dims[RA_CAT(GF, dim_##x)]
#define MAT(x) ((RaBMat){ARG(x), STEP(x), steps[OPND_CORE(x)], steps[OPND_CORE(x) + 1]})
#define VEC(x) ((RaBVec){ARG(x), STEP(x), steps[OPND_CORE(x)]})
#define SCALAR(x) ((RaBVec){ARG(x), STEP(x), 0})
#define FLAG(x) (*(npy_bool *)ARG(x) != 0)

/* ------------------------------------------------------------------ pair terms */
/* The pair-term operands of gufunc GF (drop, drop_key, bias (r); dbias for a backward),
 * checked: r is 0 or n + m - 1, bias unit-stride in its core axis, every drop threshold
 * in [0, 2^24).  Returns 0 with a ValueError set otherwise. */
static int ra_pairs_check(const RaBPairs *p, npy_intp B, npy_intp r, npy_intp expect,
                          npy_intp item, const char *where)
{
    const char *bad = NULL;
    if (r != 0 && r != expect) bad = "bias must have n + m - 1 entries (or none)";
    else if (r > 1 && p->bias.s0 != item) bad = "bias must be contiguous in its last axis";
    for (npy_intp b = 0; b < B && !bad; b++) {
        const int64_t drop = RA_VEC_AT(int64_t, ra_vec_at(p->drop, b), 0);
        if (drop < 0 || drop >= RA_DROP_ONE) bad = "the dropout threshold must be in [0, 2^24)";
    }
    if (!bad) return 1;
    NPY_ALLOW_C_API_DEF
    NPY_ALLOW_C_API
    PyErr_Format(PyExc_ValueError, "%s: %s", where, bad);
    NPY_DISABLE_C_API
    return 0;
}
/* The forward's pair terms of gufunc GF (a backward adds .dbias = VEC(dbias) when r > 0) */
#define PAIRS() ((RaBPairs){SCALAR(drop), SCALAR(drop_key), DIM(r) ? VEC(bias) : (RaBVec){0}, {0}})
#define RA_ITEM_f32 4
#define RA_ITEM_f64 8
#define PAIRS_CHECK(p, SUF, where)                                                        \
    ra_pairs_check(&(p), dims[0], DIM(r), DIM(n) + DIM(m) - 1, RA_ITEM_##SUF, where)

/* ------------------------------------------------------------------ dense attention */
#define ATTENTION_FORWARD_LOOP(SUF)                                                       \
    static void attention_forward_loop_##SUF(char **args, npy_intp const *dims,           \
                                             npy_intp const *steps, void *data)           \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 5, "attention")) return;                               \
        const int n = (int)DIM(n), d = (int)DIM(d), m = (int)DIM(m), e = (int)DIM(e);     \
        if (dims[0] == 0) return;                                                         \
        /* use_mask is one scalar for the whole call (the wrapper passes a bool) */       \
        RaBVec mask = VEC(key_mask);                                                      \
        if (!*(npy_bool *)ARG(use_mask)) mask.data = NULL;                                \
        const RaBPairs pairs = PAIRS();                                                   \
        if (!PAIRS_CHECK(pairs, SUF, "attention")) return;                                     \
        int st = ra_attention_forward_##SUF(dims[0], n, m, d, e, MAT(q), MAT(k),          \
                                            MAT(v), mask, SCALAR(scale), SCALAR(causal),  \
                                            &pairs, MAT(out), VEC(lse));                  \
        ra_raise(st, "attention");                                                        \
    }
#define GF attention_forward
ATTENTION_FORWARD_LOOP(f32)
ATTENTION_FORWARD_LOOP(f64)
#undef GF

#define ATTENTION_BACKWARD_LOOP(SUF)                                                      \
    static void attention_backward_loop_##SUF(char **args, npy_intp const *dims,          \
                                              npy_intp const *steps, void *data)          \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 5, "attention_backward")) return;                      \
        const int n = (int)DIM(n), e = (int)DIM(e), d = (int)DIM(d), m = (int)DIM(m);     \
        if (dims[0] == 0) return;                                                         \
        RaBVec mask = VEC(key_mask);                                                      \
        if (!*(npy_bool *)ARG(use_mask)) mask.data = NULL;                                \
        RaBPairs pairs = PAIRS();                                                         \
        if (DIM(r)) pairs.dbias = VEC(dbias);                                             \
        if (!PAIRS_CHECK(pairs, SUF, "attention_backward")) return;                            \
        int st = ra_attention_backward_##SUF(dims[0], n, m, d, e, MAT(dout), MAT(q),      \
                                             MAT(k), MAT(v), mask, MAT(out),              \
                                             VEC(lse), SCALAR(scale), SCALAR(causal),     \
                                             &pairs, MAT(dq), MAT(dk), MAT(dv));          \
        ra_raise(st, "attention_backward");                                               \
    }
#define GF attention_backward
ATTENTION_BACKWARD_LOOP(f32)
ATTENTION_BACKWARD_LOOP(f64)
#undef GF

/* ------------------------------------------------------------------ routing attention */
/* Is a core block of `nd` axes with sizes dims and byte strides steps C-contiguous for
 * items of `item` bytes?  (Axes of size 1 may have any stride.) */
static int ra_core_contiguous(const npy_intp *dims, const npy_intp *steps, int nd, npy_intp item)
{
    npy_intp expect = item;
    for (int a = 0; a < nd; a++)
        if (dims[a] == 0) return 1;        /* no element: any steps will do */
    for (int a = nd - 1; a >= 0; a--) {
        if (dims[a] > 1 && steps[a] != expect) return 0;
        expect *= dims[a];
    }
    return 1;
}

static void ra_raise_layout(const char *where, const char *what)
{
    NPY_ALLOW_C_API_DEF
    NPY_ALLOW_C_API
    PyErr_Format(PyExc_ValueError, "%s: %s must be C-contiguous in their core axes", where, what);
    NPY_DISABLE_C_API
}

#define ROUTING_FORWARD_LOOP(SUF, T)                                                      \
    static void routing_forward_loop_##SUF(char **args, npy_intp const *dims,             \
                                           npy_intp const *steps, void *data)             \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 8, "routing_attention")) return;       \
        const npy_intp cwe[3] = {DIM(c), DIM(w), DIM(e)}, cw[2] = {DIM(c), DIM(w)};       \
        if (!ra_core_contiguous(cwe, CORE(slot_out), 3, sizeof(T)) ||                     \
            !ra_core_contiguous(cw, CORE(slot_lse), 2, sizeof(T)) ||                      \
            !ra_core_contiguous(cw, CORE(slot_self), 2, 1)) {                             \
            ra_raise_layout("routing_attention", "the slot statistics outputs");          \
            return;                                                                       \
        }                                                                                 \
        RaRoutingSlots slots = {ARG(slot_out), ARG(slot_lse), ARG(slot_self), STEP(slot_out), STEP(slot_lse), \
                                STEP(slot_self)};                                         \
        const RaBPairs pairs = PAIRS();                                                   \
        if (!PAIRS_CHECK(pairs, SUF, "routing_attention")) return;                        \
        int st = ra_routing_forward_##SUF(                                                \
            dims[0], (int)DIM(n), (int)DIM(m), (int)DIM(d), (int)DIM(e), (int)DIM(c),     \
            (int)DIM(w), (int)DIM(u), MAT(q), MAT(k), MAT(v), MAT(q_idx),                 \
            MAT(k_idx), SCALAR(scale), SCALAR(causal), SCALAR(exclude_self), SCALAR(merge_lse), \
            &pairs, MAT(out), VEC(lse), slots);                                           \
        ra_raise(st, "routing_attention");                                                \
    }
#define GF routing_forward
ROUTING_FORWARD_LOOP(f32, float)
ROUTING_FORWARD_LOOP(f64, double)
#undef GF

#define ROUTING_BACKWARD_LOOP(SUF, T)                                                     \
    static void routing_backward_loop_##SUF(char **args, npy_intp const *dims,            \
                                            npy_intp const *steps, void *data)            \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 8, "routing_attention_backward")) return; \
        RaRoutingSlots saved = {NULL, NULL, NULL, 0, 0, 0};                               \
        if (*(npy_bool *)ARG(use_saved)) {   /* use_saved: one scalar for the whole call */ \
            const npy_intp ne[2] = {DIM(n), DIM(e)}, n1[1] = {DIM(n)};                    \
            const npy_intp cwe[3] = {DIM(c), DIM(w), DIM(e)}, cw[2] = {DIM(c), DIM(w)};   \
            if (!ra_core_contiguous(ne, CORE(out), 2, sizeof(T)) ||                       \
                !ra_core_contiguous(n1, CORE(lse), 1, sizeof(T)) ||                       \
                !ra_core_contiguous(cwe, CORE(slot_out), 3, sizeof(T)) ||                 \
                !ra_core_contiguous(cw, CORE(slot_lse), 2, sizeof(T)) ||                  \
                !ra_core_contiguous(cw, CORE(slot_self), 2, 1)) {                         \
                ra_raise_layout("routing_attention_backward", "the saved statistics");    \
                return;                                                                   \
            }                                                                             \
            saved = (RaRoutingSlots){ARG(slot_out), ARG(slot_lse), ARG(slot_self), STEP(slot_out), STEP(slot_lse), \
                                     STEP(slot_self)};                                    \
        }                                                                                 \
        RaBPairs pairs = PAIRS();                                                         \
        if (DIM(r)) pairs.dbias = VEC(dbias);                                             \
        if (!PAIRS_CHECK(pairs, SUF, "routing_attention_backward")) return;               \
        int st = ra_routing_backward_##SUF(                                               \
            dims[0], (int)DIM(n), (int)DIM(m), (int)DIM(d), (int)DIM(e), (int)DIM(c),     \
            (int)DIM(w), (int)DIM(u), MAT(dout), MAT(q), MAT(k), MAT(v),                  \
            MAT(q_idx), MAT(k_idx), SCALAR(scale), SCALAR(causal), SCALAR(exclude_self), SCALAR(merge_lse), \
            MAT(out), VEC(lse), saved, &pairs, MAT(dq), MAT(dk), MAT(dv));                \
        ra_raise(st, "routing_attention_backward");                                       \
    }
#define GF routing_backward
ROUTING_BACKWARD_LOOP(f32, float)
ROUTING_BACKWARD_LOOP(f64, double)
#undef GF
/* ------------------------------------------------------------------ combiner attention */
#define COMBINER_FORWARD_LOOP(SUF)                                                        \
    static void combiner_forward_loop_##SUF(char **args, npy_intp const *dims,            \
                                            npy_intp const *steps, void *data)            \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 4, "combiner_attention")) return;                      \
        const int n = (int)DIM(n), d = (int)DIM(d), e = (int)DIM(e);                      \
        if (dims[0] == 0) return;                                                         \
        const RaBPairs pairs = PAIRS();   /* keys are the queries' positions: m = n */    \
        if (!ra_pairs_check(&pairs, dims[0], DIM(r), 2 * DIM(n) - 1, RA_ITEM_##SUF,       \
                            "combiner_attention")) return;                                \
        int st = ra_combiner_forward_##SUF(dims[0], n, d, e, MAT(q), MAT(k),              \
                                           MAT(v), SCALAR(plan), SCALAR(block),           \
                                           SCALAR(causal), SCALAR(scale), &pairs,         \
                                           MAT(out), VEC(lse));                           \
        ra_raise(st, "combiner_attention");                                               \
    }
#define GF combiner_forward
COMBINER_FORWARD_LOOP(f32)
COMBINER_FORWARD_LOOP(f64)
#undef GF

#define COMBINER_BACKWARD_LOOP(SUF)                                                       \
    static void combiner_backward_loop_##SUF(char **args, npy_intp const *dims,           \
                                             npy_intp const *steps, void *data)           \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 4, "combiner_attention_backward")) return;             \
        const int n = (int)DIM(n), e = (int)DIM(e), d = (int)DIM(d);                      \
        if (dims[0] == 0) return;                                                         \
        RaBMat so = MAT(out);                                                             \
        if (!*(npy_bool *)ARG(use_saved)) so.data = NULL;                                 \
        RaBPairs pairs = PAIRS();                                                         \
        if (DIM(r)) pairs.dbias = VEC(dbias);                                             \
        if (!ra_pairs_check(&pairs, dims[0], DIM(r), 2 * DIM(n) - 1, RA_ITEM_##SUF,       \
                            "combiner_attention_backward")) return;                       \
        int st = ra_combiner_backward_##SUF(dims[0], n, d, e, MAT(dout), MAT(q),          \
                                            MAT(k), MAT(v), so, VEC(lse),                 \
                                            SCALAR(plan), SCALAR(block), SCALAR(causal),  \
                                            SCALAR(scale), &pairs, MAT(dq), MAT(dk),      \
                                            MAT(dv));                                     \
        ra_raise(st, "combiner_attention_backward");                                      \
    }
#define GF combiner_backward
COMBINER_BACKWARD_LOOP(f32)
COMBINER_BACKWARD_LOOP(f64)
#undef GF
/* ------------------------------------------------------------------ clustered attention */
/* n_clusters and topk are one scalar each for the whole call (the wrapper passes ints);
 * topk = 0 selects the plain form.  topk is clamped to m, which changes nothing. */
static int clustered_scalars(const char *n_clusters, const char *topk_arg, int m, int *C, int *topk,
                             const char *where)
{
    const npy_int64 c = *(const npy_int64 *)n_clusters, t = *(const npy_int64 *)topk_arg;
    if (c < 1 || c > INT_MAX / 2 || t < 0) {
        NPY_ALLOW_C_API_DEF
        NPY_ALLOW_C_API
        PyErr_Format(PyExc_ValueError, "%s: need 1 <= n_clusters <= %d and topk >= 0; got "
                     "n_clusters=%lld, topk=%lld", where, INT_MAX / 2, (long long)c, (long long)t);
        NPY_DISABLE_C_API
        return 0;
    }
    *C = (int)c;
    *topk = (int)(t > m ? m : t);
    return 1;
}

/* The saved statistics' core dims (c, k) must be (n_clusters, min(topk, m)). */
static int clustered_saved_dims(npy_intp c, npy_intp k, int C, int kmax, const char *where)
{
    if (c == C && k == kmax) return 1;
    NPY_ALLOW_C_API_DEF
    NPY_ALLOW_C_API
    PyErr_Format(PyExc_ValueError, "%s: saved statistics of shape (%lld, %lld) do not match "
                 "n_clusters=%d, min(topk, m)=%d", where, (long long)c, (long long)k, C, kmax);
    NPY_DISABLE_C_API
    return 0;
}

#define CLUSTERED_FORWARD_LOOP(SUF)                                                       \
    static void clustered_forward_loop_##SUF(char **args, npy_intp const *dims,           \
                                             npy_intp const *steps, void *data)           \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 7, "clustered_attention")) return;                     \
        const int n = (int)DIM(n), d = (int)DIM(d), m = (int)DIM(m), e = (int)DIM(e);     \
        if (dims[0] == 0) return;                                                         \
        int C, topk;                                                                      \
        if (!clustered_scalars(ARG(n_clusters), ARG(topk), m, &C, &topk, "clustered_attention")) return;     \
        if (!clustered_saved_dims(DIM(c), DIM(k), C, topk, "clustered_attention")) return; \
        RaBVec mask = VEC(key_mask);                                                      \
        if (!*(npy_bool *)ARG(use_mask)) mask.data = NULL;                                \
        RaClusteredSaved saved = {MAT(centroid_out), MAT(topk_index), MAT(topk_weight), VEC(centroid_lse)}; \
        const RaBPairs pairs = PAIRS();                                                   \
        if (!PAIRS_CHECK(pairs, SUF, "clustered_attention")) return;                      \
        int st = ra_clustered_forward_##SUF(dims[0], n, m, d, e, C, topk, MAT(q),         \
                                            MAT(k), MAT(v), VEC(labels), mask,            \
                                            SCALAR(scale), &pairs, MAT(out), saved);      \
        ra_raise(st, "clustered_attention (labels must lie in [-1, n_clusters))");        \
    }
#define GF clustered_forward
CLUSTERED_FORWARD_LOOP(f32)
CLUSTERED_FORWARD_LOOP(f64)
#undef GF

#define CLUSTERED_BACKWARD_LOOP(SUF)                                                      \
    static void clustered_backward_loop_##SUF(char **args, npy_intp const *dims,          \
                                              npy_intp const *steps, void *data)          \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 7, "clustered_attention_backward")) return;            \
        const int n = (int)DIM(n), e = (int)DIM(e), d = (int)DIM(d), m = (int)DIM(m);     \
        if (dims[0] == 0) return;                                                         \
        int C, topk;                                                                      \
        if (!clustered_scalars(ARG(n_clusters), ARG(topk), m, &C, &topk, "clustered_attention_backward"))   \
            return;                                                                       \
        RaBVec mask = VEC(key_mask);                                                      \
        if (!*(npy_bool *)ARG(use_mask)) mask.data = NULL;                                \
        RaClusteredSaved saved = {MAT(centroid_out), MAT(topk_index), MAT(topk_weight), VEC(centroid_lse)}; \
        if (*(npy_bool *)ARG(use_saved)) {                                                \
            if (!clustered_saved_dims(DIM(c), DIM(k), C, topk,                            \
                                      "clustered_attention_backward")) return;            \
        } else {                                                                          \
            saved.o.data = saved.sel.data = saved.aw.data = saved.lse.data = NULL;        \
        }                                                                                 \
        RaBPairs pairs = PAIRS();                                                         \
        if (DIM(r)) pairs.dbias = VEC(dbias);                                             \
        if (!PAIRS_CHECK(pairs, SUF, "clustered_attention_backward")) return;             \
        int st = ra_clustered_backward_##SUF(dims[0], n, m, d, e, C, topk, MAT(dout),     \
                                             MAT(q), MAT(k), MAT(v),                      \
                                             VEC(labels), mask, SCALAR(scale), &pairs,    \
                                             saved, MAT(dq), MAT(dk), MAT(dv));           \
        ra_raise(st, "(improved_)clustered_attention_backward (labels must lie in "       \
                 "[-1, n_clusters); the saved topk_index must come from the same "        \
                 "forward)");                                                             \
    }
#define GF clustered_backward
CLUSTERED_BACKWARD_LOOP(f32)
CLUSTERED_BACKWARD_LOOP(f64)
#undef GF
/* ------------------------------------------------------------------ routing decisions */

#define SPHERICAL_KMEANS_LOOP(SUF)                                                        \
    static void spherical_kmeans_loop_##SUF(char **args, npy_intp const *dims,            \
                                            npy_intp const *steps, void *data)            \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "spherical_kmeans")) return;        \
        const int n = (int)DIM(n), d = (int)DIM(d), c = (int)DIM(c);                      \
        int st = ra_spherical_kmeans_##SUF(dims[0], n, d, c, MAT(x), VEC(mask),           \
                                           MAT(init), FLAG(use_init), SCALAR(iters),      \
                                           SCALAR(seed), MAT(centroids));                 \
        ra_raise(st, "spherical_kmeans");                                                 \
    }
#define GF spherical_kmeans
SPHERICAL_KMEANS_LOOP(f32)
SPHERICAL_KMEANS_LOOP(f64)
#undef GF

#define ASSIGN_CLUSTERS_LOOP(SUF)                                                         \
    static void assign_clusters_loop_##SUF(char **args, npy_intp const *dims,             \
                                           npy_intp const *steps, void *data)             \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "assign_clusters")) return;         \
        const RaBMat no_scores = {NULL, 0, 0, 0};                                         \
        const RaBVec no_best = {NULL, 0, 0};                                              \
        int st = ra_assign_clusters_##SUF(dims[0], (int)DIM(n), (int)DIM(d),              \
                                          (int)DIM(c), MAT(x), MAT(centroids),            \
                                          VEC(labels), no_scores, no_best);               \
        ra_raise(st, "assign_clusters");                                                  \
    }
#define GF assign_clusters
ASSIGN_CLUSTERS_LOOP(f32)
ASSIGN_CLUSTERS_LOOP(f64)
#undef GF

#define ASSIGN_SCORES_LOOP(SUF)                                                           \
    static void assign_scores_loop_##SUF(char **args, npy_intp const *dims,               \
                                         npy_intp const *steps, void *data)               \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "assign_clusters")) return;         \
        int st = ra_assign_clusters_##SUF(dims[0], (int)DIM(n), (int)DIM(d),              \
                                          (int)DIM(c), MAT(x), MAT(centroids),            \
                                          VEC(labels), MAT(scores), VEC(best));           \
        ra_raise(st, "assign_clusters");                                                  \
    }
#define GF assign_scores
ASSIGN_SCORES_LOOP(f32)
ASSIGN_SCORES_LOOP(f64)
#undef GF

#define ASSIGN_BEST_LOOP(SUF)                                                             \
    static void assign_best_loop_##SUF(char **args, npy_intp const *dims,                 \
                                       npy_intp const *steps, void *data)                 \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "assign_clusters")) return;         \
        const RaBMat no_scores = {NULL, 0, 0, 0};                                         \
        int st = ra_assign_clusters_##SUF(dims[0], (int)DIM(n), (int)DIM(d),              \
                                          (int)DIM(c), MAT(x), MAT(centroids),            \
                                          VEC(labels), no_scores, VEC(best));             \
        ra_raise(st, "assign_clusters");                                                  \
    }
#define GF assign_best
ASSIGN_BEST_LOOP(f32)
ASSIGN_BEST_LOOP(f64)
#undef GF

#define UPDATE_CENTROIDS_LOOP(SUF)                                                        \
    static void update_centroids_loop_##SUF(char **args, npy_intp const *dims,            \
                                            npy_intp const *steps, void *data)            \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "update_centroids")) return;        \
        const int c = (int)DIM(c), d = (int)DIM(d), n = (int)DIM(n);                      \
        int st = ra_update_centroids_##SUF(dims[0], n, d, c, MAT(centroids), MAT(x),      \
                                           VEC(labels), VEC(mask), SCALAR(decay),         \
                                           MAT(updated));                                 \
        ra_raise(st, "update_centroids: labels");                                         \
    }
#define GF update_centroids
UPDATE_CENTROIDS_LOOP(f32)
UPDATE_CENTROIDS_LOOP(f64)
#undef GF

#define COMMITMENT_LOSS_LOOP(SUF)                                                         \
    static void commitment_loss_loop_##SUF(char **args, npy_intp const *dims,             \
                                           npy_intp const *steps, void *data)             \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "commitment_loss")) return;         \
        int st = ra_commitment_loss_##SUF(dims[0], (int)DIM(n), (int)DIM(d),              \
                                          (int)DIM(c), MAT(x), MAT(centroids),            \
                                          VEC(labels), VEC(mask), SCALAR(loss));          \
        ra_raise(st, "commitment_loss: labels");                                          \
    }
#define GF commitment_loss
COMMITMENT_LOSS_LOOP(f32)
COMMITMENT_LOSS_LOOP(f64)
#undef GF

#define TOP_MEMBERS_LOOP(SUF)                                                             \
    static void top_members_loop_##SUF(char **args, npy_intp const *dims,                 \
                                       npy_intp const *steps, void *data)                 \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "top_members")) return;             \
        const int n = (int)DIM(n), c = (int)DIM(c), w = (int)DIM(w);                      \
        if (w < 1 || w > n) { ra_raise(RA_ERR_VALUE, "top_members: w must be in [1, n]"); return; } \
        ra_raise(ra_top_members_##SUF(dims[0], n, c, w, MAT(scores), MAT(idx)),           \
                 "top_members");                                                          \
    }
#define GF top_members
TOP_MEMBERS_LOOP(f32)
TOP_MEMBERS_LOOP(f64)
#undef GF

#define ASSIGN_TOP_LOOP(SUF)                                                              \
    static void assign_top_loop_##SUF(char **args, npy_intp const *dims,                  \
                                      npy_intp const *steps, void *data)                  \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 4, "assign_top_members")) return;      \
        const int n = (int)DIM(n), d = (int)DIM(d), c = (int)DIM(c), w = (int)DIM(w);     \
        if (w < 1 || w > n) {                                                             \
            ra_raise(RA_ERR_VALUE, "assign_top_members: w must be in [1, n]");            \
            return;                                                                       \
        }                                                                                 \
        ra_raise(ra_assign_top_##SUF(dims[0], n, d, c, w, MAT(x), MAT(centroids),         \
                                     VEC(labels), VEC(best), MAT(idx)),                   \
                 "assign_top_members");                                                   \
    }
#define GF assign_top
ASSIGN_TOP_LOOP(f32)
ASSIGN_TOP_LOOP(f64)
#undef GF

#define LSH_HASH_LOOP(SUF)                                                                \
    static void lsh_hash_loop_##SUF(char **args, npy_intp const *dims,                    \
                                    npy_intp const *steps, void *data)                    \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 4, "lsh_hash")) return;                \
        const int n = (int)DIM(n), d = (int)DIM(d), bits = (int)DIM(b);                   \
        if (DIM(e) != DIM(d) + 1 || bits > 64) {                                          \
            ra_raise(RA_ERR_VALUE, "lsh_hash: planes must be (bits <= 64, d + 1)");       \
            return;                                                                       \
        }                                                                                 \
        ra_raise(ra_lsh_hash_##SUF(dims[0], n, d, bits, MAT(x), MAT(planes),              \
                                   VEC(codes)), "lsh_hash");                              \
    }
#define GF lsh_hash
LSH_HASH_LOOP(f32)
LSH_HASH_LOOP(f64)
#undef GF

#define NORMALIZE_ROWS_LOOP(SUF)                                                          \
    static void normalize_rows_loop_##SUF(char **args, npy_intp const *dims,              \
                                          npy_intp const *steps, void *data)              \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 2, "normalize_rows")) return;          \
        ra_raise(ra_normalize_rows_##SUF(dims[0], (int)DIM(n), (int)DIM(d), MAT(x),       \
                                         MAT(xhat), VEC(norm), VEC(sq)),                  \
                 "normalize_rows");                                                       \
    }
#define GF normalize_rows
NORMALIZE_ROWS_LOOP(f32)
NORMALIZE_ROWS_LOOP(f64)
#undef GF

#define GF members_from_labels
static void members_from_labels_loop(char **args, npy_intp const *dims, npy_intp const *steps,
                                     void *data)
{
    (void)data;
    if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "members_from_labels")) return;
    ra_raise(ra_members_from_labels(dims[0], (int)DIM(n), (int)DIM(c), (int)DIM(s),
                                    VEC(labels), MAT(members)),
             "members_from_labels: labels");
}
#undef GF

#define GF hamming_kmeans
static void hamming_kmeans_loop(char **args, npy_intp const *dims, npy_intp const *steps,
                                void *data)
{
    (void)data;
    if (dims[0] == 0 || !ra_dims_fit(dims + 1, 2, "hamming_kmeans")) return;
    ra_raise(ra_hamming_kmeans(dims[0], (int)DIM(n), (int)DIM(c), VEC(codes), VEC(mask),
                               SCALAR(iters), SCALAR(seed), VEC(labels), VEC(centroids)),
             "hamming_kmeans");
}
#undef GF

/* ------------------------------------------------------------------ engine test hook */
#define ENGINE_MASKED_LOOP(SUF)                                                           \
    static void engine_masked_loop_##SUF(char **args, npy_intp const *dims,              \
                                         npy_intp const *steps, void *data)              \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 4, "_engine_masked")) return;                          \
        const int n = (int)DIM(n), d = (int)DIM(d), m = (int)DIM(m), e = (int)DIM(e);     \
        int st = RA_OK;                                                                   \
        for (npy_intp b = 0; b < dims[0] && st == RA_OK; b++)                             \
            st = ra_engine_masked_##SUF(n, m, d, e, ra_mat_at(MAT(q), b),                 \
                                        ra_mat_at(MAT(k), b), ra_mat_at(MAT(v), b),       \
                                        ra_mat_at(MAT(mask), b), ra_mat_at(MAT(dout), b), \
                                        ra_mat_at(MAT(out), b), ra_vec_at(VEC(lse), b),   \
                                        ra_mat_at(MAT(dq), b), ra_mat_at(MAT(dk), b),     \
                                        ra_mat_at(MAT(dv), b));                           \
        ra_raise(st, "_engine_masked");                                                   \
    }
#define GF engine_masked
ENGINE_MASKED_LOOP(f32)
ENGINE_MASKED_LOOP(f64)
#undef GF

/* ------------------------------------------------------------------ registration table */
typedef struct {
    const char *name;
    const char *signature;
    int nin, nout;
    PyUFuncGenericFunction loops[2];            /* float32, float64 */
    char *types;                                /* float32 loop's types, then float64's */
    const char *doc;
    int nloops;                                 /* 0 means 2: float32 and float64 */
} RaGufunc;

static const RaGufunc ra_gufuncs[] = {
RA_GUFUNC_ROWS
};

/* ------------------------------------------------------------------ module functions */
static PyObject *ra_build_info(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
#ifdef _OPENMP
    const int has_openmp = 1;
#else
    const int has_openmp = 0;
#endif
    return Py_BuildValue("{s:O,s:i,s:s,s:i,s:i,s:s}", "openmp", has_openmp ? Py_True : Py_False,
                         "num_threads", ra_num_threads(), "simd", ra_kernels()->name,
                         "block_q", RA_BQ, "block_k", RA_BK, "compiler", __VERSION__);
}

static PyObject *ra_set_num_threads(PyObject *self, PyObject *arg)
{
    (void)self;
    long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred()) return NULL;
    if (k < 0) {
        PyErr_SetString(PyExc_ValueError, "set_num_threads: n must be >= 0 (0 = OpenMP default)");
        return NULL;
    }
    ra_requested_threads = (int)(k > 4096 ? 4096 : k);
    Py_RETURN_NONE;
}

static PyObject *ra_get_num_threads(PyObject *self, PyObject *noargs)
{
    (void)self; (void)noargs;
    return PyLong_FromLong(ra_num_threads());
}

/* _fma_peak(iters, threads) -> flops: every thread runs the SIMD path's FMA probe;
 * the caller times the call (GIL released) to get the machine's fp32 peak. */
static PyObject *ra_fma_peak(PyObject *self, PyObject *args)
{
    (void)self;
    long iters;
    int threads;
    if (!PyArg_ParseTuple(args, "li", &iters, &threads)) return NULL;
    if (ra_omp_broken) threads = 1;   /* a child forked after OpenMP ran (common.h) */
    if (iters < 0 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "_fma_peak: iters >= 0 and threads >= 1 required");
        return NULL;
    }
    double flops = 0;
    float sink = 0;
    const RaKernels *K = ra_kernels();
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel num_threads(threads) reduction(+ : flops, sink)
    {
        float c;
        flops += K->fma_probe(iters, &c);
        sink += c;
    }
    (void)ra_worker_flags(threads, RA_FE_REPORTED);   /* the probe's flags: nobody's */
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dd)", flops, (double)sink);
}

static PyMethodDef ra_methods[] = {
    {"_fma_peak", ra_fma_peak, METH_VARARGS,
     "_fma_peak(iters, threads) -> (flops, checksum): fp32 FMA peak probe for benchmarks."},
    {"build_info", ra_build_info, METH_NOARGS,
     "build_info() -> dict: OpenMP support, thread count, SIMD path, tile sizes, compiler."},
    {"set_num_threads", ra_set_num_threads, METH_O,
     "set_num_threads(n): threads used by every kernel (0 = the OpenMP default)."},
    {"get_num_threads", ra_get_num_threads, METH_NOARGS,
     "get_num_threads() -> int: threads every kernel will use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ra_module = {
    PyModuleDef_HEAD_INIT, "_ext", "C kernels of routing_attention (private; use the package).",
    -1, ra_methods,
};

PyMODINIT_FUNC PyInit__ext(void)
{
    import_array();
    import_umath();
    PyObject *mod = PyModule_Create(&ra_module);
    if (!mod) return NULL;
    ra_kernels();   /* resolve the SIMD path once, before any thread runs */
#if defined(_OPENMP) && defined(KMP_VERSION_MAJOR)
    /* LLVM's libomp (clang builds) reloads the calling thread's floating-point control
       word, status flags masked off, at the end of a region (KMP_INHERIT_FP_CONTROL), so
       the flags a one-thread region raised never reached NumPy; off (before the runtime
       starts, unless the user chose), the flags behave as with GNU libgomp */
    if (!getenv("KMP_INHERIT_FP_CONTROL")) kmp_set_defaults("KMP_INHERIT_FP_CONTROL=false");
#endif
    static int atfork_done = 0;
    if (!atfork_done && pthread_atfork(NULL, NULL, ra_after_fork_child) == 0) atfork_done = 1;
    const size_t count = sizeof(ra_gufuncs) / sizeof(ra_gufuncs[0]);
    for (size_t i = 0; i < count; i++) {
        const RaGufunc *g = &ra_gufuncs[i];
        /* NumPy keeps these pointers: they must outlive the ufunc (static storage) */
        PyObject *uf = PyUFunc_FromFuncAndDataAndSignature(
            (PyUFuncGenericFunction *)g->loops, NULL, g->types, g->nloops ? g->nloops : 2,
            g->nin, g->nout,
            PyUFunc_None, g->name, g->doc, 0, g->signature);
        if (!uf || PyModule_AddObject(mod, g->name, uf) < 0) {
            Py_XDECREF(uf);
            Py_DECREF(mod);
            return NULL;
        }
    }
    return mod;
}
