"""Per-call overhead of routing_attention.jax under jax.jit vs the NumPy call it wraps.

For n in {64, 4096} (d = e = 64, one head, float32, causal) it times, on the same arrays:
  numpy fwd      = ra.X(q, k, v, ...)                                (NumPy arrays)
  jit fwd        = jax.jit(rj.X)(q, k, v).block_until_ready()        (JAX arrays)
  numpy f+b      = ra.X(..., return_saved/lse) then ra.X_backward(ones, ..., saved)
  jit grad       = jax.jit(jax.grad(sum of rj.X))(q, k, v), blocked
for X = attention and routing_attention (c = sqrt(n) clusters of w = n / c queries and
keys from top_members of random scores).

Overhead, per call, is measured in the same call: the jitted call's time minus the time
spent inside the NumPy functions it runs (timed inside the host callback).  That is what
the bridge adds (dispatch of the jitted function, the callback, copies in and out of XLA
buffers), free of the run-to-run noise of the kernels themselves.  "buffer" is the
module as shipped (jax.experimental.buffer_callback); "pure" is the same module with its
one transport function swapped for a jax.pure_callback equivalent, to show why the module
does not use that.  Every case runs once per round, rounds interleaved (machine noise
hits all alike); medians of `repeats` rounds, one process.

    python benchmarks/bench_jax_overhead.py [--threads T] [--repeats R] [--sizes N ...]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_description  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import routing_attention as ra  # noqa: E402
import routing_attention.jax as rj  # noqa: E402

SHIPPED = rj._callback


def methods(n, rng):
    """{name: (numpy forward, numpy forward + backward, jax function)} of (q, k, v)."""
    c = max(1, int(round(np.sqrt(n))))
    idx = ra.top_members(rng.standard_normal((n, c)).astype(np.float32), n // c)

    def attention_fb(q, k, v):
        out, lse = ra.attention(q, k, v, causal=True, return_lse=True)
        return ra.attention_backward(np.ones_like(out), q, k, v, causal=True, lse=lse,
                                     output=out)

    def routing_fb(q, k, v):
        out, saved = ra.routing_attention(q, k, v, idx, idx, causal=True, return_saved=True)
        saved = {key: val for key, val in saved.items() if key != "keywords"}
        return ra.routing_attention_backward(np.ones_like(out), q, k, v, idx, idx, causal=True,
                                             **saved)

    return {
        "attention": (lambda q, k, v: ra.attention(q, k, v, causal=True), attention_fb,
                      lambda q, k, v: rj.attention(q, k, v, causal=True)),
        "routing_attention": (lambda q, k, v: ra.routing_attention(q, k, v, idx, idx, causal=True),
                              routing_fb,
                              lambda q, k, v: rj.routing_attention(q, k, v, idx, idx,
                                                                   causal=True)),
    }


# ------------------------------------------------------------------ transports
INSIDE = [0.0]      # seconds spent inside NumPy functions by host callbacks since reset


def _timed(fn):
    def run(**kwargs):
        t0 = time.perf_counter()
        try:
            return fn(**kwargs)
        finally:
            INSIDE[0] += time.perf_counter() - t0
    return run


def buffer_transport(fn, specs, arrays, vmap_method="expand_dims", out_first=False):
    """The shipped transport, with the NumPy work timed."""
    return SHIPPED(_timed(fn), specs, arrays, vmap_method, out_first)


def pure_transport(fn, specs, arrays, vmap_method="expand_dims", out_first=False):
    """The same transport written with jax.pure_callback (which has no output buffer to
    offer: `out_first` does not apply), with the NumPy work timed."""
    names, fn = tuple(arrays), _timed(fn)

    def host(*values):
        results = fn(**{name: np.asarray(x) for name, x in zip(names, values)})
        return tuple(np.asarray(r, spec.dtype) for r, spec in zip(results, specs))

    return jax.pure_callback(host, tuple(specs), *arrays.values(), vmap_method=vmap_method)


def jitted(jax_fn, transport, args):
    """(jit forward, jit grad of the sum) of jax_fn, traced (and run once) with
    `transport` as routing_attention.jax's callback transport."""
    rj._callback = transport
    try:
        fwd = jax.jit(lambda q, k, v: jax_fn(q, k, v))    # a new function: its own trace cache
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax_fn(q, k, v)), argnums=(0, 1, 2)))
        jax.block_until_ready((fwd(*args), grad(*args)))
        return fwd, grad
    finally:
        rj._callback = SHIPPED


def timings(cases, repeats):
    """{name: (median seconds per call, median seconds per call outside NumPy)}; a case is
    (name, run), every case once per round, rounds interleaved."""
    total = {name: [] for name, _ in cases}
    outside = {name: [] for name, _ in cases}
    for r in range(repeats):
        for name, run in cases if r % 2 == 0 else cases[::-1]:
            INSIDE[0] = 0.0
            t0 = time.perf_counter()
            run()
            t = time.perf_counter() - t0
            total[name].append(t)
            outside[name].append(t - INSIDE[0])
    return {name: (float(np.median(total[name])), float(np.median(outside[name])))
            for name in total}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="kernel threads (0 = OpenMP default)")
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 4096])
    args = ap.parse_args()
    ra.set_num_threads(args.threads)
    print(machine_description())
    print(f"jax {jax.__version__} ({jax.default_backend()}), routing_attention {ra.__version__}, "
          f"threads={ra.get_num_threads()}, float32, d=e=64, one head, causal, "
          f"median of {args.repeats}, microseconds per call")
    print("ovh = the jitted call minus its time inside NumPy (same call): buffer = as "
          "shipped, pure = with jax.pure_callback")
    hdr = (f"{'method':>17} {'n':>5} | {'numpy fwd':>10} {'jit fwd':>10} {'ovh buffer':>10} "
           f"{'ovh pure':>9} | {'numpy f+b':>10} {'jit grad':>10} {'ovh buffer':>10} "
           f"{'ovh pure':>9}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    for n in args.sizes:
        q, k, v = (rng.standard_normal((1, n, 64)).astype(np.float32) for _ in range(3))
        qkv = tuple(jnp.asarray(x) for x in (q, k, v))
        for name, (np_fwd, np_fb, jax_fn) in methods(n, rng).items():
            fwd, grad = jitted(jax_fn, buffer_transport, qkv)
            pure_fwd, pure_grad = jitted(jax_fn, pure_transport, qkv)
            for f in (fwd, pure_fwd):
                np.testing.assert_array_equal(np.asarray(f(*qkv)), np_fwd(q, k, v))
            t = timings([
                ("np_fwd", lambda: np_fwd(q, k, v)),
                ("fwd", lambda: fwd(*qkv).block_until_ready()),
                ("pure_fwd", lambda: pure_fwd(*qkv).block_until_ready()),
                ("np_fb", lambda: np_fb(q, k, v)),
                ("grad", lambda: jax.block_until_ready(grad(*qkv))),
                ("pure_grad", lambda: jax.block_until_ready(pure_grad(*qkv))),
            ], args.repeats)
            us = {key: (tot * 1e6, out * 1e6) for key, (tot, out) in t.items()}
            print(f"{name:>17} {n:>5} | {us['np_fwd'][0]:>10.1f} {us['fwd'][0]:>10.1f} "
                  f"{us['fwd'][1]:>10.1f} {us['pure_fwd'][1]:>9.1f} | {us['np_fb'][0]:>10.1f} "
                  f"{us['grad'][0]:>10.1f} {us['grad'][1]:>10.1f} {us['pure_grad'][1]:>9.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
