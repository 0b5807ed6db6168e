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

int ra_requested_threads = 0;
int ra_omp_started = 0, ra_omp_broken = 0;

/* In a child forked after the parent used OpenMP, run single-threaded (see common.h). */
static void ra_after_fork_child(void)
{
    if (ra_omp_started) ra_omp_broken = 1;
}

/* ------------------------------------------------------------------ errors */
/* Turn a driver's status into a Python exception (taking the GIL to do so). */
static void ra_raise(int status, const char *where)
{
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

/* Views over operand `a` of the loop: outer stride steps[a], core strides from `core`. */
#define BMAT(a, core) ((RaBMat){args[a], steps[a], steps[core], steps[(core) + 1]})
#define BVEC(a, core) ((RaBVec){args[a], steps[a], steps[core]})
#define BSCALAR(a) ((RaBVec){args[a], steps[a], 0})

/* ------------------------------------------------------------------ dense attention */
/* (n,d),(m,d),(m,e),(m),(),(),()->(n,e),(n)
 * q, k, v, key_mask, use_mask, scale, causal -> out, lse */
#define ATTENTION_FORWARD_LOOP(SUF)                                                       \
    static void attention_forward_loop_##SUF(char **args, npy_intp const *dims,          \
                                             npy_intp const *steps, void *data)          \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 4, "attention")) return;                               \
        const int n = (int)dims[1], d = (int)dims[2], m = (int)dims[3], e = (int)dims[4]; \
        /* operands 0..8, core strides from steps[9] on */                               \
        if (dims[0] == 0) return;                                                         \
        /* use_mask is one scalar for the whole call (the wrapper passes a bool) */       \
        RaBVec mask = BVEC(3, 15);                                                        \
        if (!*(npy_bool *)args[4]) mask.data = NULL;                                      \
        int st = ra_attention_forward_##SUF(dims[0], n, m, d, e, BMAT(0, 9), BMAT(1, 11), \
                                            BMAT(2, 13), mask, BSCALAR(5), BSCALAR(6),    \
                                            BMAT(7, 16), BVEC(8, 18));                    \
        ra_raise(st, "attention");                                                        \
    }
ATTENTION_FORWARD_LOOP(f32)
ATTENTION_FORWARD_LOOP(f64)

/* (n,e),(n,d),(m,d),(m,e),(m),(),(n,e),(n),(),()->(n,d),(m,d),(m,e)
 * dout, q, k, v, key_mask, use_mask, out, lse, scale, causal -> dq, dk, dv */
#define ATTENTION_BACKWARD_LOOP(SUF)                                                      \
    static void attention_backward_loop_##SUF(char **args, npy_intp const *dims,         \
                                              npy_intp const *steps, void *data)         \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 4, "attention_backward")) return;                      \
        const int n = (int)dims[1], e = (int)dims[2], d = (int)dims[3], m = (int)dims[4]; \
        /* operands 0..12, core strides from steps[13] on */                             \
        if (dims[0] == 0) return;                                                         \
        RaBVec mask = BVEC(4, 21);                                                        \
        if (!*(npy_bool *)args[5]) mask.data = NULL;                                      \
        int st = ra_attention_backward_##SUF(dims[0], n, m, d, e, BMAT(0, 13), BMAT(1, 15),\
                                             BMAT(2, 17), BMAT(3, 19), mask, BMAT(6, 22), \
                                             BVEC(7, 24), BSCALAR(8), BSCALAR(9),         \
                                             BMAT(10, 25), BMAT(11, 27), BMAT(12, 29));   \
        ra_raise(st, "attention_backward");                                               \
    }
ATTENTION_BACKWARD_LOOP(f32)
ATTENTION_BACKWARD_LOOP(f64)

/* ------------------------------------------------------------------ routing attention */
/* Is a core block of `nd` axes with sizes dims and byte strides steps C-contiguous for
 * items of `item` bytes?  (Axes of size 1 may have any stride.) */
static int ra_core_contiguous(const npy_intp *dims, const npy_intp *steps, int nd, npy_intp item)
{
    npy_intp expect = item;
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

/* (n,d),(m,d),(m,e),(c,w),(c,u),(),(),(),()->(n,e),(n),(c,w,e),(c,w),(c,w)
 * q, k, v, q_idx, k_idx, scale, causal, exclude_self, merge_lse
 *   -> out, lse, slot_out, slot_lse, slot_self */
#define ROUTING_FORWARD_LOOP(SUF, T)                                                      \
    static void routing_forward_loop_##SUF(char **args, npy_intp const *dims,            \
                                           npy_intp const *steps, void *data)            \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 7, "routing_attention")) return;       \
        /* operands 0..13, core strides from steps[14] on; dims n d m e c w u */          \
        const npy_intp cwe[3] = {dims[5], dims[6], dims[4]}, cw[2] = {dims[5], dims[6]};   \
        if (!ra_core_contiguous(cwe, steps + 27, 3, sizeof(T)) ||                         \
            !ra_core_contiguous(cw, steps + 30, 2, sizeof(T)) ||                          \
            !ra_core_contiguous(cw, steps + 32, 2, 1)) {                                  \
            ra_raise_layout("routing_attention", "the slot statistics outputs");          \
            return;                                                                       \
        }                                                                                 \
        RaRoutingSlots slots = {args[11], args[12], args[13], steps[11], steps[12],       \
                                steps[13]};                                               \
        int st = ra_routing_forward_##SUF(                                                \
            dims[0], (int)dims[1], (int)dims[3], (int)dims[2], (int)dims[4], (int)dims[5], \
            (int)dims[6], (int)dims[7], BMAT(0, 14), BMAT(1, 16), BMAT(2, 18), BMAT(3, 20),\
            BMAT(4, 22), BSCALAR(5), BSCALAR(6), BSCALAR(7), BSCALAR(8), BMAT(9, 24),     \
            BVEC(10, 26), slots);                                                         \
        ra_raise(st, "routing_attention");                                                \
    }
ROUTING_FORWARD_LOOP(f32, float)
ROUTING_FORWARD_LOOP(f64, double)

/* (n,e),(n,d),(m,d),(m,e),(c,w),(c,u),(n,e),(n),(c,w,e),(c,w),(c,w),(),(),(),(),()
 *   ->(n,d),(m,d),(m,e)
 * dout, q, k, v, q_idx, k_idx, out, lse, slot_out, slot_lse, slot_self, use_saved,
 * scale, causal, exclude_self, merge_lse -> dq, dk, dv */
#define ROUTING_BACKWARD_LOOP(SUF, T)                                                     \
    static void routing_backward_loop_##SUF(char **args, npy_intp const *dims,           \
                                            npy_intp const *steps, void *data)           \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 7, "routing_attention_backward")) return;\
        /* operands 0..18, core strides from steps[19] on; dims n e d m c w u */          \
        RaRoutingSlots saved = {NULL, NULL, NULL, 0, 0, 0};                               \
        if (*(npy_bool *)args[11]) {   /* use_saved: one scalar for the whole call */     \
            const npy_intp ne[2] = {dims[1], dims[2]}, n1[1] = {dims[1]};                  \
            const npy_intp cwe[3] = {dims[5], dims[6], dims[2]}, cw[2] = {dims[5], dims[6]};\
            if (!ra_core_contiguous(ne, steps + 31, 2, sizeof(T)) ||                      \
                !ra_core_contiguous(n1, steps + 33, 1, sizeof(T)) ||                      \
                !ra_core_contiguous(cwe, steps + 34, 3, sizeof(T)) ||                     \
                !ra_core_contiguous(cw, steps + 37, 2, sizeof(T)) ||                      \
                !ra_core_contiguous(cw, steps + 39, 2, 1)) {                              \
                ra_raise_layout("routing_attention_backward", "the saved statistics");    \
                return;                                                                   \
            }                                                                             \
            saved = (RaRoutingSlots){args[8], args[9], args[10], steps[8], steps[9],       \
                                     steps[10]};                                          \
        }                                                                                 \
        int st = ra_routing_backward_##SUF(                                               \
            dims[0], (int)dims[1], (int)dims[4], (int)dims[3], (int)dims[2], (int)dims[5], \
            (int)dims[6], (int)dims[7], BMAT(0, 19), BMAT(1, 21), BMAT(2, 23), BMAT(3, 25),\
            BMAT(4, 27), BMAT(5, 29), BSCALAR(12), BSCALAR(13), BSCALAR(14), BSCALAR(15), \
            BMAT(6, 31), BVEC(7, 33), saved, BMAT(16, 41), BMAT(17, 43), BMAT(18, 45));   \
        ra_raise(st, "routing_attention_backward");                                       \
    }
ROUTING_BACKWARD_LOOP(f32, float)
ROUTING_BACKWARD_LOOP(f64, double)
/* ------------------------------------------------------------------ combiner attention */
/* (n,d),(n,d),(n,e),(),(),(),()->(n,e)
 * q, k, v, plan, block, causal, scale -> out */
#define COMBINER_FORWARD_LOOP(SUF)                                                        \
    static void combiner_forward_loop_##SUF(char **args, npy_intp const *dims,           \
                                            npy_intp const *steps, void *data)           \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 3, "combiner_attention")) return;                      \
        const int n = (int)dims[1], d = (int)dims[2], e = (int)dims[3];                   \
        if (dims[0] == 0) return;                                                         \
        /* operands 0..8, core strides from steps[9] on */                               \
        int st = ra_combiner_forward_##SUF(dims[0], n, d, e, BMAT(0, 9), BMAT(1, 11),      \
                                           BMAT(2, 13), BSCALAR(3), BSCALAR(4),           \
                                           BSCALAR(5), BSCALAR(6), BMAT(7, 15),           \
                                           BVEC(8, 17));                                  \
        ra_raise(st, "combiner_attention");                                               \
    }
COMBINER_FORWARD_LOOP(f32)
COMBINER_FORWARD_LOOP(f64)

/* (n,e),(n,d),(n,d),(n,e),(n,e),(n),(),(),(),(),()->(n,d),(n,d),(n,e)
 * dout, q, k, v, saved out, saved lse, use_saved, plan, block, causal, scale -> dq, dk, dv */
#define COMBINER_BACKWARD_LOOP(SUF)                                                       \
    static void combiner_backward_loop_##SUF(char **args, npy_intp const *dims,          \
                                             npy_intp const *steps, void *data)          \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 3, "combiner_attention_backward")) return;             \
        const int n = (int)dims[1], e = (int)dims[2], d = (int)dims[3];                   \
        if (dims[0] == 0) return;                                                         \
        /* operands 0..13, core strides from steps[14] on */                             \
        RaBMat so = BMAT(4, 22);                                                          \
        if (!*(npy_bool *)args[6]) so.data = NULL;                                        \
        int st = ra_combiner_backward_##SUF(dims[0], n, d, e, BMAT(0, 14), BMAT(1, 16),    \
                                            BMAT(2, 18), BMAT(3, 20), so, BVEC(5, 24),    \
                                            BSCALAR(7), BSCALAR(8), BSCALAR(9),           \
                                            BSCALAR(10), BMAT(11, 25), BMAT(12, 27),      \
                                            BMAT(13, 29));                                \
        ra_raise(st, "combiner_attention_backward");                                      \
    }
COMBINER_BACKWARD_LOOP(f32)
COMBINER_BACKWARD_LOOP(f64)
/* ------------------------------------------------------------------ clustered attention */
/* n_clusters and topk are one scalar each for the whole call (the wrapper passes ints);
 * topk = 0 selects the plain form.  topk is clamped to m, which changes nothing. */
static int clustered_scalars(char **args, int ic, int m, int *C, int *topk, const char *where)
{
    const npy_int64 c = *(npy_int64 *)args[ic], t = *(npy_int64 *)args[ic + 1];
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

/* (n,d),(m,d),(m,e),(n),(m),(),(),(),()->(n,e),(c,e),(c),(c,k),(c,k)
 * q, k, v, labels, key_mask, use_mask, n_clusters, topk, scale
 *   -> out, saved centroid output, centroid lse, top-k positions, top-k weights */
#define CLUSTERED_FORWARD_LOOP(SUF)                                                       \
    static void clustered_forward_loop_##SUF(char **args, npy_intp const *dims,          \
                                             npy_intp const *steps, void *data)          \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 6, "clustered_attention")) return;                     \
        const int n = (int)dims[1], d = (int)dims[2], m = (int)dims[3], e = (int)dims[4]; \
        /* operands 0..13, core strides from steps[14] on */                             \
        if (dims[0] == 0) return;                                                         \
        int C, topk;                                                                      \
        if (!clustered_scalars(args, 6, m, &C, &topk, "clustered_attention")) return;     \
        if (!clustered_saved_dims(dims[5], dims[6], C, topk, "clustered_attention")) return; \
        RaBVec mask = BVEC(4, 21);                                                        \
        if (!*(npy_bool *)args[5]) mask.data = NULL;                                      \
        RaClusteredSaved saved = {BMAT(10, 24), BMAT(12, 27), BMAT(13, 29), BVEC(11, 26)}; \
        int st = ra_clustered_forward_##SUF(dims[0], n, m, d, e, C, topk, BMAT(0, 14),    \
                                            BMAT(1, 16), BMAT(2, 18), BVEC(3, 20), mask,  \
                                            BSCALAR(8), BMAT(9, 22), saved);              \
        ra_raise(st, "clustered_attention (labels must lie in [-1, n_clusters))");        \
    }
CLUSTERED_FORWARD_LOOP(f32)
CLUSTERED_FORWARD_LOOP(f64)

/* (n,e),(n,d),(m,d),(m,e),(n),(m),(c,e),(c),(c,k),(c,k),(),(),(),(),()->(n,d),(m,d),(m,e)
 * dout, q, k, v, labels, key_mask, saved (4), use_mask, use_saved, n_clusters, topk, scale
 *   -> dq, dk, dv */
#define CLUSTERED_BACKWARD_LOOP(SUF)                                                      \
    static void clustered_backward_loop_##SUF(char **args, npy_intp const *dims,         \
                                              npy_intp const *steps, void *data)         \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 6, "clustered_attention_backward")) return;            \
        const int n = (int)dims[1], e = (int)dims[2], d = (int)dims[3], m = (int)dims[4]; \
        /* operands 0..17, core strides from steps[18] on */                             \
        if (dims[0] == 0) return;                                                         \
        int C, topk;                                                                      \
        if (!clustered_scalars(args, 12, m, &C, &topk, "clustered_attention_backward"))   \
            return;                                                                       \
        RaBVec mask = BVEC(5, 27);                                                        \
        if (!*(npy_bool *)args[10]) mask.data = NULL;                                     \
        RaClusteredSaved saved = {BMAT(6, 28), BMAT(8, 31), BMAT(9, 33), BVEC(7, 30)};    \
        if (*(npy_bool *)args[11]) {                                                      \
            if (!clustered_saved_dims(dims[5], dims[6], C, topk,                          \
                                      "clustered_attention_backward")) return;            \
        } else {                                                                          \
            saved.o.data = saved.sel.data = saved.aw.data = saved.lse.data = NULL;        \
        }                                                                                 \
        int st = ra_clustered_backward_##SUF(dims[0], n, m, d, e, C, topk, BMAT(0, 18),   \
                                             BMAT(1, 20), BMAT(2, 22), BMAT(3, 24),       \
                                             BVEC(4, 26), mask, BSCALAR(14), saved,       \
                                             BMAT(15, 35), BMAT(16, 37), BMAT(17, 39));   \
        ra_raise(st, "clustered_attention_backward (labels must lie in [-1, n_clusters); "   \
                 "saved top-k positions must come from the same forward)");               \
    }
CLUSTERED_BACKWARD_LOOP(f32)
CLUSTERED_BACKWARD_LOOP(f64)
/* ------------------------------------------------------------------ routing decisions */
/* Scalars read once per call (the wrappers pass a Python bool). */
#define ARG_FLAG(a) (*(npy_bool *)args[a] != 0)

/* (n,d),(n),(c,d),(),(),()->(c,d)
 * x, mask, init, use_init, iters, seed -> centroids */
#define SPHERICAL_KMEANS_LOOP(SUF)                                                        \
    static void spherical_kmeans_loop_##SUF(char **args, npy_intp const *dims,           \
                                            npy_intp const *steps, void *data)           \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "spherical_kmeans")) return;        \
        const int n = (int)dims[1], d = (int)dims[2], c = (int)dims[3];                   \
        /* operands 0..6, core strides from steps[7] on */                               \
        int st = ra_spherical_kmeans_##SUF(dims[0], n, d, c, BMAT(0, 7), BVEC(1, 9),      \
                                           BMAT(2, 10), ARG_FLAG(3), BSCALAR(4),          \
                                           BSCALAR(5), BMAT(6, 12));                      \
        ra_raise(st, "spherical_kmeans");                                                 \
    }
SPHERICAL_KMEANS_LOOP(f32)
SPHERICAL_KMEANS_LOOP(f64)

/* (n,d),(c,d)->(n)  x, centroids -> labels */
#define ASSIGN_CLUSTERS_LOOP(SUF)                                                         \
    static void assign_clusters_loop_##SUF(char **args, npy_intp const *dims,            \
                                           npy_intp const *steps, void *data)            \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "assign_clusters")) return;         \
        const RaBMat no_scores = {NULL, 0, 0, 0};                                         \
        const RaBVec no_best = {NULL, 0, 0};                                              \
        int st = ra_assign_clusters_##SUF(dims[0], (int)dims[1], (int)dims[2],            \
                                          (int)dims[3], BMAT(0, 3), BMAT(1, 5),           \
                                          BVEC(2, 7), no_scores, no_best);                \
        ra_raise(st, "assign_clusters");                                                  \
    }
ASSIGN_CLUSTERS_LOOP(f32)
ASSIGN_CLUSTERS_LOOP(f64)

/* (n,d),(c,d)->(n),(n,c),(n)  x, centroids -> labels, scores, best */
#define ASSIGN_SCORES_LOOP(SUF)                                                           \
    static void assign_scores_loop_##SUF(char **args, npy_intp const *dims,              \
                                         npy_intp const *steps, void *data)              \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "assign_clusters")) return;         \
        /* operands 0..4, core strides from steps[5] on */                               \
        int st = ra_assign_clusters_##SUF(dims[0], (int)dims[1], (int)dims[2],            \
                                          (int)dims[3], BMAT(0, 5), BMAT(1, 7),           \
                                          BVEC(2, 9), BMAT(3, 10), BVEC(4, 12));          \
        ra_raise(st, "assign_clusters");                                                  \
    }
ASSIGN_SCORES_LOOP(f32)
ASSIGN_SCORES_LOOP(f64)

/* (n,d),(c,d)->(n),(n)  x, centroids -> labels, best */
#define ASSIGN_BEST_LOOP(SUF)                                                             \
    static void assign_best_loop_##SUF(char **args, npy_intp const *dims,                \
                                       npy_intp const *steps, void *data)                \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "assign_clusters")) return;         \
        const RaBMat no_scores = {NULL, 0, 0, 0};                                         \
        /* operands 0..3, core strides from steps[4] on */                               \
        int st = ra_assign_clusters_##SUF(dims[0], (int)dims[1], (int)dims[2],            \
                                          (int)dims[3], BMAT(0, 4), BMAT(1, 6),           \
                                          BVEC(2, 8), no_scores, BVEC(3, 9));             \
        ra_raise(st, "assign_clusters");                                                  \
    }
ASSIGN_BEST_LOOP(f32)
ASSIGN_BEST_LOOP(f64)

/* (c,d),(n,d),(n),(n),()->(c,d)  centroids, x, labels, mask, decay -> out */
#define UPDATE_CENTROIDS_LOOP(SUF)                                                        \
    static void update_centroids_loop_##SUF(char **args, npy_intp const *dims,           \
                                            npy_intp const *steps, void *data)           \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "update_centroids")) return;        \
        const int c = (int)dims[1], d = (int)dims[2], n = (int)dims[3];                   \
        int st = ra_update_centroids_##SUF(dims[0], n, d, c, BMAT(0, 6), BMAT(1, 8),      \
                                           BVEC(2, 10), BVEC(3, 11), BSCALAR(4),          \
                                           BMAT(5, 12));                                  \
        ra_raise(st, "update_centroids: labels");                                         \
    }
UPDATE_CENTROIDS_LOOP(f32)
UPDATE_CENTROIDS_LOOP(f64)

/* (n,d),(c,d),(n),(n)->()  x, centroids, labels, mask -> loss */
#define COMMITMENT_LOSS_LOOP(SUF)                                                         \
    static void commitment_loss_loop_##SUF(char **args, npy_intp const *dims,            \
                                           npy_intp const *steps, void *data)            \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "commitment_loss")) return;         \
        int st = ra_commitment_loss_##SUF(dims[0], (int)dims[1], (int)dims[2],            \
                                          (int)dims[3], BMAT(0, 5), BMAT(1, 7),           \
                                          BVEC(2, 9), BVEC(3, 10), BSCALAR(4));           \
        ra_raise(st, "commitment_loss: labels");                                          \
    }
COMMITMENT_LOSS_LOOP(f32)
COMMITMENT_LOSS_LOOP(f64)

/* (n,c)->(c,w)  scores -> idx */
#define TOP_MEMBERS_LOOP(SUF)                                                             \
    static void top_members_loop_##SUF(char **args, npy_intp const *dims,                \
                                       npy_intp const *steps, void *data)                \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "top_members")) return;             \
        const int n = (int)dims[1], c = (int)dims[2], w = (int)dims[3];                   \
        if (w < 1 || w > n) { ra_raise(RA_ERR_VALUE, "top_members: w must be in [1, n]"); return; } \
        ra_raise(ra_top_members_##SUF(dims[0], n, c, w, BMAT(0, 2), BMAT(1, 4)),          \
                 "top_members");                                                          \
    }
TOP_MEMBERS_LOOP(f32)
TOP_MEMBERS_LOOP(f64)

/* (n,d),(c,d)->(n),(n),(c,w)  x, centroids -> labels, best, idx */
#define ASSIGN_TOP_LOOP(SUF)                                                              \
    static void assign_top_loop_##SUF(char **args, npy_intp const *dims,                 \
                                      npy_intp const *steps, void *data)                 \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 4, "assign_top_members")) return;      \
        const int n = (int)dims[1], d = (int)dims[2], c = (int)dims[3], w = (int)dims[4]; \
        if (w < 1 || w > n) {                                                             \
            ra_raise(RA_ERR_VALUE, "assign_top_members: w must be in [1, n]");            \
            return;                                                                       \
        }                                                                                 \
        /* operands 0..4, core strides from steps[5] on */                               \
        ra_raise(ra_assign_top_##SUF(dims[0], n, d, c, w, BMAT(0, 5), BMAT(1, 7),         \
                                     BVEC(2, 9), BVEC(3, 10), BMAT(4, 11)),              \
                 "assign_top_members");                                                   \
    }
ASSIGN_TOP_LOOP(f32)
ASSIGN_TOP_LOOP(f64)

/* (n,d),(b,e)->(n)  x, planes -> codes; e must be d + 1 */
#define LSH_HASH_LOOP(SUF)                                                                \
    static void lsh_hash_loop_##SUF(char **args, npy_intp const *dims,                   \
                                    npy_intp const *steps, void *data)                   \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 4, "lsh_hash")) return;                \
        const int n = (int)dims[1], d = (int)dims[2], bits = (int)dims[3];                \
        if (dims[4] != dims[2] + 1 || bits > 64) {                                        \
            ra_raise(RA_ERR_VALUE, "lsh_hash: planes must be (bits <= 64, d + 1)");       \
            return;                                                                       \
        }                                                                                 \
        ra_raise(ra_lsh_hash_##SUF(dims[0], n, d, bits, BMAT(0, 3), BMAT(1, 5),           \
                                   BVEC(2, 7)), "lsh_hash");                              \
    }
LSH_HASH_LOOP(f32)
LSH_HASH_LOOP(f64)

/* (n,d)->(n,d),(n),(n)  x -> xhat, norm, |xhat|² */
#define NORMALIZE_ROWS_LOOP(SUF)                                                          \
    static void normalize_rows_loop_##SUF(char **args, npy_intp const *dims,             \
                                          npy_intp const *steps, void *data)             \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 2, "normalize_rows")) return;          \
        ra_raise(ra_normalize_rows_##SUF(dims[0], (int)dims[1], (int)dims[2], BMAT(0, 4),  \
                                         BMAT(1, 6), BVEC(2, 8), BVEC(3, 9)),             \
                 "normalize_rows");                                                       \
    }
NORMALIZE_ROWS_LOOP(f32)
NORMALIZE_ROWS_LOOP(f64)

/* (n)->(c,s)  labels -> members */
static void members_from_labels_loop(char **args, npy_intp const *dims, npy_intp const *steps,
                                     void *data)
{
    (void)data;
    if (dims[0] == 0 || !ra_dims_fit(dims + 1, 3, "members_from_labels")) return;
    ra_raise(ra_members_from_labels(dims[0], (int)dims[1], (int)dims[2], (int)dims[3],
                                    BVEC(0, 2), BMAT(1, 3)),
             "members_from_labels: labels");
}

/* (n),(n),(),()->(n),(c)  codes, mask, iters, seed -> labels, centroids */
static void hamming_kmeans_loop(char **args, npy_intp const *dims, npy_intp const *steps,
                                void *data)
{
    (void)data;
    if (dims[0] == 0 || !ra_dims_fit(dims + 1, 2, "hamming_kmeans")) return;
    ra_raise(ra_hamming_kmeans(dims[0], (int)dims[1], (int)dims[2], BVEC(0, 6), BVEC(1, 7),
                               BSCALAR(2), BSCALAR(3), BVEC(4, 8), BVEC(5, 9)),
             "hamming_kmeans");
}
#undef ARG_FLAG

/* ------------------------------------------------------------------ engine test hook */
/* (n,d),(m,d),(m,e),(n,m),(n,e)->(n,e),(n),(n,d),(m,d),(m,e)
 * q, k, v, mask, dout -> out, lse, dq, dk, dv */
#define ENGINE_MASKED_LOOP(SUF)                                                           \
    static void engine_masked_loop_##SUF(char **args, npy_intp const *dims,              \
                                         npy_intp const *steps, void *data)              \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 4, "_engine_masked")) return;                          \
        const int n = (int)dims[1], d = (int)dims[2], m = (int)dims[3], e = (int)dims[4]; \
        int st = RA_OK;                                                                   \
        for (npy_intp b = 0; b < dims[0] && st == RA_OK; b++) {                           \
            /* operands 0..9, core strides from steps[10] on */                          \
            RaMat M[10];                                                                  \
            static const int core[10] = {10, 12, 14, 16, 18, 20, 22, 23, 25, 27};        \
            for (int a = 0; a < 10; a++)                                                  \
                M[a] = (RaMat){args[a] + b * steps[a], steps[core[a]],                    \
                               a == 6 ? 0 : steps[core[a] + 1]};                          \
            const RaVec lse = {M[6].data, M[6].s0};                                       \
            st = ra_engine_masked_##SUF(n, m, d, e, M[0], M[1], M[2], M[3], M[4], M[5],   \
                                        lse, M[7], M[8], M[9]);                           \
        }                                                                                 \
        ra_raise(st, "_engine_masked");                                                   \
    }
ENGINE_MASKED_LOOP(f32)
ENGINE_MASKED_LOOP(f64)

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

#define F NPY_FLOAT
#define D NPY_DOUBLE
#define B NPY_BOOL
#define L NPY_INT64
#define U NPY_UINT64

static const RaGufunc ra_gufuncs[] = {
    {"_attention_forward", "(n,d),(m,d),(m,e),(m),(),(),()->(n,e),(n)", 7, 2,
     {attention_forward_loop_f32, attention_forward_loop_f64},
     (char[]){F, F, F, B, B, F, B, F, F, /**/ D, D, D, B, B, D, B, D, D},
     "_attention_forward(q, k, v, key_mask, use_mask, scale, causal) -> (out, lse)\n\n"
     "Low-level gufunc behind routing_attention.attention; use that instead."},
    {"_attention_backward", "(n,e),(n,d),(m,d),(m,e),(m),(),(n,e),(n),(),()->(n,d),(m,d),(m,e)",
     10, 3, {attention_backward_loop_f32, attention_backward_loop_f64},
     (char[]){F, F, F, F, B, B, F, F, F, B, F, F, F, /**/ D, D, D, D, B, B, D, D, D, B, D, D, D},
     "_attention_backward(dout, q, k, v, key_mask, use_mask, out, lse, scale, causal)"
     " -> (dq, dk, dv)\n\nLow-level gufunc behind routing_attention.attention_backward."},
    {"_routing_forward",
     "(n,d),(m,d),(m,e),(c,w),(c,u),(),(),(),()->(n,e),(n),(c,w,e),(c,w),(c,w)", 9, 5,
     {routing_forward_loop_f32, routing_forward_loop_f64},
     (char[]){F, F, F, L, L, F, B, B, B, F, F, F, F, B, /**/ D, D, D, L, L, D, B, B, B, D, D, D, D, B},
     "_routing_forward(q, k, v, q_idx, k_idx, scale, causal, exclude_self, merge_lse)"
     " -> (out, lse, slot_out, slot_lse, slot_self)\n\n"
     "Low-level gufunc behind routing_attention.routing_attention."},
    {"_routing_backward",
     "(n,e),(n,d),(m,d),(m,e),(c,w),(c,u),(n,e),(n),(c,w,e),(c,w),(c,w),(),(),(),(),()"
     "->(n,d),(m,d),(m,e)", 16, 3, {routing_backward_loop_f32, routing_backward_loop_f64},
     (char[]){F, F, F, F, L, L, F, F, F, F, B, B, F, B, B, B, F, F, F,
              /**/ D, D, D, D, L, L, D, D, D, D, B, B, D, B, B, B, D, D, D},
     "_routing_backward(dout, q, k, v, q_idx, k_idx, out, lse, slot_out, slot_lse, slot_self,"
     " use_saved, scale, causal, exclude_self, merge_lse) -> (dq, dk, dv)\n\n"
     "Low-level gufunc behind routing_attention.routing_attention_backward."},
    /* ---- combiner attention */
    {"_combiner_forward", "(n,d),(n,d),(n,e),(),(),(),()->(n,e),(n)", 7, 2,
     {combiner_forward_loop_f32, combiner_forward_loop_f64},
     (char[]){F, F, F, L, L, B, F, F, F, /**/ D, D, D, L, L, B, D, D, D},
     "_combiner_forward(q, k, v, plan, block, causal, scale) -> (out, lse)\n\n"
     "plan: 0 fixed, 1 axial, 2 logsparse, 3 mixture.  Low-level gufunc behind "
     "routing_attention.combiner_attention; use that instead."},
    {"_engine_masked", "(n,d),(m,d),(m,e),(n,m),(n,e)->(n,e),(n),(n,d),(m,d),(m,e)", 5, 5,
     {engine_masked_loop_f32, engine_masked_loop_f64},
     (char[]){F, F, F, B, F, F, F, F, F, F, /**/ D, D, D, B, D, D, D, D, D, D},
     "_engine_masked(q, k, v, mask, dout) -> (out, lse, dq, dk, dv)\n\n"
     "Test hook: dense attention (logits q·k) under an explicit boolean mask, through the\n"
     "engine's visibility bitmap, single-threaded."},
    {"_combiner_backward", "(n,e),(n,d),(n,d),(n,e),(n,e),(n),(),(),(),(),()->(n,d),(n,d),(n,e)",
     11, 3, {combiner_backward_loop_f32, combiner_backward_loop_f64},
     (char[]){F, F, F, F, F, F, B, L, L, B, F, F, F, F,
              /**/ D, D, D, D, D, D, B, L, L, B, D, D, D, D},
     "_combiner_backward(dout, q, k, v, out, lse, use_saved, plan, block, causal, scale)"
     " -> (dq, dk, dv)\n\n"
     "Low-level gufunc behind routing_attention.combiner_attention_backward."},
    /* ---- clustered attention */
    {"_clustered_forward", "(n,d),(m,d),(m,e),(n),(m),(),(),(),()->(n,e),(c,e),(c),(c,k),(c,k)",
     9, 5, {clustered_forward_loop_f32, clustered_forward_loop_f64},
     (char[]){F, F, F, L, B, B, L, L, F, F, F, F, L, F, /**/ D, D, D, L, B, B, L, L, D, D, D, D, L, D},
     "_clustered_forward(q, k, v, labels, key_mask, use_mask, n_clusters, topk, scale,\n"
     "                   out=(out, centroid_out, centroid_lse, topk_index, topk_weight))\n\n"
     "Low-level gufunc behind routing_attention.clustered_attention (topk = 0) and\n"
     "improved_clustered_attention (topk >= 1); use those instead.  The out tuple must be\n"
     "given: c = n_clusters and k = min(topk, m) come from it."},
    {"_clustered_backward",
     "(n,e),(n,d),(m,d),(m,e),(n),(m),(c,e),(c),(c,k),(c,k),(),(),(),(),()->(n,d),(m,d),(m,e)",
     15, 3, {clustered_backward_loop_f32, clustered_backward_loop_f64},
     (char[]){F, F, F, F, L, B, F, F, L, F, B, B, L, L, F, F, F, F,
              /**/ D, D, D, D, L, B, D, D, L, D, B, B, L, L, D, D, D, D},
     "_clustered_backward(dout, q, k, v, labels, key_mask, centroid_out, centroid_lse,\n"
     "                    topk_index, topk_weight, use_mask, use_saved, n_clusters, topk,\n"
     "                    scale) -> (dq, dk, dv)\n\n"
     "Low-level gufunc behind the clustered attention backward functions."},

    /* ---- routing decisions (clustering.c) ---- */
    {"_spherical_kmeans", "(n,d),(n),(c,d),(),(),()->(c,d)", 6, 1,
     {spherical_kmeans_loop_f32, spherical_kmeans_loop_f64},
     (char[]){F, B, F, B, L, U, F, /**/ D, B, D, B, L, U, D},
     "_spherical_kmeans(x, mask, init, use_init, iters, seed, out=centroids) -> centroids\n\n"
     "Low-level gufunc behind routing_attention.spherical_kmeans; use that instead."},
    {"_assign_clusters", "(n,d),(c,d)->(n)", 2, 1,
     {assign_clusters_loop_f32, assign_clusters_loop_f64},
     (char[]){F, F, L, /**/ D, D, L},
     "_assign_clusters(x, centroids) -> labels\n\n"
     "Low-level gufunc behind routing_attention.assign_clusters."},
    {"_assign_scores", "(n,d),(c,d)->(n),(n,c),(n)", 2, 3,
     {assign_scores_loop_f32, assign_scores_loop_f64},
     (char[]){F, F, L, F, F, /**/ D, D, L, D, D},
     "_assign_scores(x, centroids) -> (labels, scores, best)\n\n"
     "Low-level gufunc behind routing_attention.assign_clusters(..., return_scores=True)."},
    {"_assign_best", "(n,d),(c,d)->(n),(n)", 2, 2,
     {assign_best_loop_f32, assign_best_loop_f64},
     (char[]){F, F, L, F, /**/ D, D, L, D},
     "_assign_best(x, centroids) -> (labels, best)\n\n"
     "Labels and each row's best score (NaN where the label is -1), without the scores;\n"
     "behind the RoutingAttention layer's argmax membership."},
    {"_update_centroids", "(c,d),(n,d),(n),(n),()->(c,d)", 5, 1,
     {update_centroids_loop_f32, update_centroids_loop_f64},
     (char[]){F, F, L, B, F, F, /**/ D, D, L, B, D, D},
     "_update_centroids(centroids, x, labels, mask, decay) -> centroids\n\n"
     "Low-level gufunc behind routing_attention.update_centroids."},
    {"_commitment_loss", "(n,d),(c,d),(n),(n)->()", 4, 1,
     {commitment_loss_loop_f32, commitment_loss_loop_f64},
     (char[]){F, F, L, B, F, /**/ D, D, L, B, D},
     "_commitment_loss(x, centroids, labels, mask) -> loss\n\n"
     "Low-level gufunc behind routing_attention.commitment_loss."},
    {"_top_members", "(n,c)->(c,w)", 1, 1, {top_members_loop_f32, top_members_loop_f64},
     (char[]){F, L, /**/ D, L},
     "_top_members(scores, out=idx) -> idx\n\n"
     "Low-level gufunc behind routing_attention.top_members."},
    {"_assign_top", "(n,d),(c,d)->(n),(n),(c,w)", 2, 3,
     {assign_top_loop_f32, assign_top_loop_f64},
     (char[]){F, F, L, F, L, /**/ D, D, L, D, L},
     "_assign_top(x, centroids, out=(labels, best, idx)) -> (labels, best, idx)\n\n"
     "Low-level gufunc behind routing_attention.assign_top_members."},
    {"_normalize_rows", "(n,d)->(n,d),(n),(n)", 1, 3,
     {normalize_rows_loop_f32, normalize_rows_loop_f64}, (char[]){F, F, F, F, /**/ D, D, D, D},
     "_normalize_rows(x) -> (xhat, norm, sq)\n\n"
     "Rows scaled to unit L2 norm (a row whose norm is not > 0 is divided by 1), their\n"
     "norms and |xhat|²; behind the RoutingAttention layer."},
    {"_lsh_hash", "(n,d),(b,e)->(n)", 2, 1, {lsh_hash_loop_f32, lsh_hash_loop_f64},
     (char[]){F, F, L, /**/ D, D, L},
     "_lsh_hash(x, planes) -> codes\n\nLow-level gufunc behind routing_attention.lsh_hash."},
    {"_members_from_labels", "(n)->(c,s)", 1, 1, {members_from_labels_loop, NULL},
     (char[]){L, L},
     "_members_from_labels(labels, out=members) -> members\n\n"
     "Low-level gufunc behind routing_attention.members_from_labels.", 1},
    {"_hamming_kmeans", "(n),(n),(),()->(n),(c)", 4, 2, {hamming_kmeans_loop, NULL},
     (char[]){L, B, L, U, L, L},
     "_hamming_kmeans(codes, mask, iters, seed, out=(labels, centroids)) -> (labels, centroids)\n\n"
     "Low-level gufunc behind routing_attention.hamming_kmeans.", 1},
};

#undef F
#undef L
#undef D
#undef B
#undef U

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
