/* module.c — the gufunc registration table, the loop adapters, and PyInit.
 *
 * Each adapter unpacks NumPy's (args, dimensions, steps) into named strided views and
 * calls a pure C driver (methods.h).  NumPy releases the GIL around the loops (no
 * object dtypes are involved); the adapters take it back only to raise an error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>

#include <numpy/arrayobject.h>
#include <numpy/ufuncobject.h>

#include "methods.h"

int ra_requested_threads = 0;

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
/* (n,d),(m,d),(m,e),(c,w),(c,u),(),(),(),()->(n,e),(n)
 * q, k, v, q_idx, k_idx, scale, causal, exclude_self, merge_lse -> out, lse */
#define ROUTING_FORWARD_LOOP(SUF)                                                         \
    static void routing_forward_loop_##SUF(char **args, npy_intp const *dims,            \
                                           npy_intp const *steps, void *data)            \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 7, "routing_attention")) return;       \
        /* operands 0..10, core strides from steps[11] on */                             \
        int st = ra_routing_forward_##SUF(                                                \
            dims[0], (int)dims[1], (int)dims[3], (int)dims[2], (int)dims[4], (int)dims[5], \
            (int)dims[6], (int)dims[7], BMAT(0, 11), BMAT(1, 13), BMAT(2, 15), BMAT(3, 17),\
            BMAT(4, 19), BSCALAR(5), BSCALAR(6), BSCALAR(7), BSCALAR(8), BMAT(9, 21),     \
            BVEC(10, 23));                                                                \
        ra_raise(st, "routing_attention");                                                \
    }
ROUTING_FORWARD_LOOP(f32)
ROUTING_FORWARD_LOOP(f64)

/* (n,e),(n,d),(m,d),(m,e),(c,w),(c,u),(),(),(),()->(n,d),(m,d),(m,e)
 * dout, q, k, v, q_idx, k_idx, scale, causal, exclude_self, merge_lse -> dq, dk, dv */
#define ROUTING_BACKWARD_LOOP(SUF)                                                        \
    static void routing_backward_loop_##SUF(char **args, npy_intp const *dims,           \
                                            npy_intp const *steps, void *data)           \
    {                                                                                     \
        (void)data;                                                                       \
        if (dims[0] == 0 || !ra_dims_fit(dims + 1, 7, "routing_attention_backward")) return;\
        /* operands 0..12, core strides from steps[13] on */                             \
        int st = ra_routing_backward_##SUF(                                               \
            dims[0], (int)dims[1], (int)dims[4], (int)dims[3], (int)dims[2], (int)dims[5], \
            (int)dims[6], (int)dims[7], BMAT(0, 13), BMAT(1, 15), BMAT(2, 17), BMAT(3, 19),\
            BMAT(4, 21), BMAT(5, 23), BSCALAR(6), BSCALAR(7), BSCALAR(8), BSCALAR(9),     \
            BMAT(10, 25), BMAT(11, 27), BMAT(12, 29));                                    \
        ra_raise(st, "routing_attention_backward");                                       \
    }
ROUTING_BACKWARD_LOOP(f32)
ROUTING_BACKWARD_LOOP(f64)
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
        /* operands 0..7, core strides from steps[8] on */                               \
        int st = ra_combiner_forward_##SUF(dims[0], n, d, e, BMAT(0, 8), BMAT(1, 10),      \
                                           BMAT(2, 12), BSCALAR(3), BSCALAR(4),           \
                                           BSCALAR(5), BSCALAR(6), BMAT(7, 14));          \
        ra_raise(st, "combiner_attention");                                               \
    }
COMBINER_FORWARD_LOOP(f32)
COMBINER_FORWARD_LOOP(f64)

/* (n,e),(n,d),(n,d),(n,e),(),(),(),()->(n,d),(n,d),(n,e)
 * dout, q, k, v, plan, block, causal, scale -> dq, dk, dv */
#define COMBINER_BACKWARD_LOOP(SUF)                                                       \
    static void combiner_backward_loop_##SUF(char **args, npy_intp const *dims,          \
                                             npy_intp const *steps, void *data)          \
    {                                                                                     \
        (void)data;                                                                       \
        if (!ra_dims_fit(dims + 1, 3, "combiner_attention_backward")) return;             \
        const int n = (int)dims[1], e = (int)dims[2], d = (int)dims[3];                   \
        if (dims[0] == 0) return;                                                         \
        /* operands 0..10, core strides from steps[11] on */                             \
        int st = ra_combiner_backward_##SUF(dims[0], n, d, e, BMAT(0, 11), BMAT(1, 13),    \
                                            BMAT(2, 15), BMAT(3, 17), BSCALAR(4),         \
                                            BSCALAR(5), BSCALAR(6), BSCALAR(7),           \
                                            BMAT(8, 19), BMAT(9, 21), BMAT(10, 23));      \
        ra_raise(st, "combiner_attention_backward");                                      \
    }
COMBINER_BACKWARD_LOOP(f32)
COMBINER_BACKWARD_LOOP(f64)

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
} RaGufunc;

#define F NPY_FLOAT
#define D NPY_DOUBLE
#define B NPY_BOOL
#define L NPY_INT64

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
    {"_routing_forward", "(n,d),(m,d),(m,e),(c,w),(c,u),(),(),(),()->(n,e),(n)", 9, 2,
     {routing_forward_loop_f32, routing_forward_loop_f64},
     (char[]){F, F, F, L, L, F, B, B, B, F, F, /**/ D, D, D, L, L, D, B, B, B, D, D},
     "_routing_forward(q, k, v, q_idx, k_idx, scale, causal, exclude_self, merge_lse)"
     " -> (out, lse)\n\nLow-level gufunc behind routing_attention.routing_attention."},
    {"_routing_backward", "(n,e),(n,d),(m,d),(m,e),(c,w),(c,u),(),(),(),()->(n,d),(m,d),(m,e)",
     10, 3, {routing_backward_loop_f32, routing_backward_loop_f64},
     (char[]){F, F, F, F, L, L, F, B, B, B, F, F, F, /**/ D, D, D, D, L, L, D, B, B, B, D, D, D},
     "_routing_backward(dout, q, k, v, q_idx, k_idx, scale, causal, exclude_self, merge_lse)"
     " -> (dq, dk, dv)\n\nLow-level gufunc behind routing_attention.routing_attention_backward."},
    /* ---- combiner attention */
    {"_combiner_forward", "(n,d),(n,d),(n,e),(),(),(),()->(n,e)", 7, 1,
     {combiner_forward_loop_f32, combiner_forward_loop_f64},
     (char[]){F, F, F, L, L, B, F, F, /**/ D, D, D, L, L, B, D, D},
     "_combiner_forward(q, k, v, plan, block, causal, scale) -> out\n\n"
     "plan: 0 fixed, 1 axial, 2 logsparse, 3 mixture.  Low-level gufunc behind "
     "routing_attention.combiner_attention; use that instead."},
    {"_engine_masked", "(n,d),(m,d),(m,e),(n,m),(n,e)->(n,e),(n),(n,d),(m,d),(m,e)", 5, 5,
     {engine_masked_loop_f32, engine_masked_loop_f64},
     (char[]){F, F, F, B, F, F, F, F, F, F, /**/ D, D, D, B, D, D, D, D, D, D},
     "_engine_masked(q, k, v, mask, dout) -> (out, lse, dq, dk, dv)\n\n"
     "Test hook: dense attention (logits q·k) under an explicit boolean mask, through the\n"
     "engine's visibility bitmap, single-threaded."},
    {"_combiner_backward", "(n,e),(n,d),(n,d),(n,e),(),(),(),()->(n,d),(n,d),(n,e)", 8, 3,
     {combiner_backward_loop_f32, combiner_backward_loop_f64},
     (char[]){F, F, F, F, L, L, B, F, F, F, F, /**/ D, D, D, D, L, L, B, D, D, D, D},
     "_combiner_backward(dout, q, k, v, plan, block, causal, scale) -> (dq, dk, dv)\n\n"
     "Low-level gufunc behind routing_attention.combiner_attention_backward."},
};

#undef F
#undef L
#undef D
#undef B

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
    const size_t count = sizeof(ra_gufuncs) / sizeof(ra_gufuncs[0]);
    for (size_t i = 0; i < count; i++) {
        const RaGufunc *g = &ra_gufuncs[i];
        /* NumPy keeps these pointers: they must outlive the ufunc (static storage) */
        PyObject *uf = PyUFunc_FromFuncAndDataAndSignature(
            (PyUFuncGenericFunction *)g->loops, NULL, g->types, 2, g->nin, g->nout,
            PyUFunc_None, g->name, g->doc, 0, g->signature);
        if (!uf || PyModule_AddObject(mod, g->name, uf) < 0) {
            Py_XDECREF(uf);
            Py_DECREF(mod);
            return NULL;
        }
    }
    return mod;
}
